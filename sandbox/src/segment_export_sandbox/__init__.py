"""segment_export_sandbox: a local HTTP emulator of the Klaviyo and Mailchimp APIs.

No machine here reaches the real APIs, so the exporter is developed and tested
against this server, which speaks the subset of both APIs the exporter uses,
following the official specs (Klaviyo OpenAPI revision 2026-07-15, Mailchimp
Marketing API 3.0.55).  The standard library and msgspec (request bodies are decoded with it); it never imports the product.

Python API::

    from segment_export_sandbox import Sandbox, SandboxConfig
    with Sandbox(SandboxConfig()) as sb:      # binds 127.0.0.1, free port
        sb.url              # "http://127.0.0.1:PORT"
        sb.klaviyo_host     # == sb.url            (Klaviyo under /api/...)
        sb.mailchimp_host   # == sb.url + "/3.0"   (Mailchimp under /3.0/...)
        sb.state(); sb.reset(); sb.configure(latency={"mailchimp_batch": 0.2})
        sb.seed_mailchimp_member(audience_id, email, status, merge_fields=None, tags=None)
        sb.forget_mailchimp_email(audience_id, email)
        sb.add_klaviyo_list(list_id, name, account_id=None)
        sb.suppress_klaviyo_email(email, account_id=None)

Control API (no auth)::

    GET  /_sandbox/state                   -> the state below
    GET  /_sandbox/requests                -> its "requests" part only (cheap whatever the store holds)
    POST /_sandbox/reset
    GET  /_sandbox/config                  -> runtime knobs
    PUT  /_sandbox/config                  {"latency": {...}, "klaviyo_profiles_per_second": N,
                                            "klaviyo_job_queue_seconds": S, "rate_limits": bool,
                                            "rate_limit_scale": F, "mailchimp_max_connections": N,
                                            "behaviour": {<key>: <value>, ...}}   (config.BEHAVIOURS)
    POST /_sandbox/mailchimp/audiences/{id}/members    {"email_address", "status", "merge_fields"?, "tags"?}
    POST /_sandbox/mailchimp/audiences/{id}/forgotten  {"email_address"}
    POST /_sandbox/mailchimp/audiences/{id}/untag      {"email_address", "tag"}  (a tag removed by hand)
    POST /_sandbox/klaviyo/lists                        {"id", "name", "account_id"?}
    POST /_sandbox/klaviyo/suppressed                   {"email", "account_id"?}
    POST /_sandbox/klaviyo/lists/{id}/members           {"email", "action": "add"|"remove", "account_id"?}  (by hand)
    GET  /_sandbox/mailchimp/batch-results/{id}.tar.gz  -> a finished Mailchimp batch's results (its response_body_url)
    POST /_sandbox/klaviyo/confirm                      {"email", "account_id"?}  (double opt-in confirmation)

State layout (``GET /_sandbox/state`` == ``Sandbox.state()``); accounts are keyed
by account id, never by API key::

    {
      "klaviyo": {"accounts": {<account id>: {
          "lists": {<list id>: {"name": str, "profile_ids": [<profile id>, ...]}},
          "profiles": {<profile id>: {
              "email", "phone_number", "external_id", "first_name", "last_name",
              "organization", "locale", "title", "image",
              "location": {...}, "properties": {...}, "created", "updated",
              "suppressed": bool, "consent": "NEVER_SUBSCRIBED" | "SUBSCRIBED" | "UNSUBSCRIBED",
              "consent_timestamp", "consent_source",
              "consent_pending": null | {"list_id", "source", "consented_at"}}},
          "jobs": {<job id>: {
              "status": "queued" | "processing" | "complete",
              "total_count", "completed_count", "failed_count",
              "list_ids": [...], "profile_ids": [...],
              "errors": [{"code", "detail", "pointer"}], "created_at"}},
          "deletions": [{"identifier": "email" | "phone_number" | "id", "status": "pending" | "done",
                         "deleted": <profiles deleted>}]}}},
      "mailchimp": {"accounts": {<account id>: {"audiences": {<audience id>: {
          "name": str,
          "members": {<subscriber hash>: {"email_address", "status", "merge_fields": {...}, "tags": [names]}},
          "merge_fields": [{"tag", "name", "type", "required"}],
          "segments": {<segment id as str>: {"name", "type": "static", "member_count", "members": [emails]}},
          "forgotten": [lower-cased emails]}},
          "batches": {<batch id>: {"status": "pending" | "finished", "total_operations", "errored_operations"}}}}},
      "requests": {"count": N,
                   "by_endpoint": {"POST /api/profile-bulk-import-jobs": {"count": n, "status": {"202": n, "429": m}}, ...},
                   "max_in_flight": {"klaviyo": n, "mailchimp": n},
                   "by_account": {"<api> <account id>": {  # per API key: what its limits admitted and refused
                       "refused": {<endpoint>: n},  # 429s for going over the key's limit (not injected faults)
                       "admitted": {<endpoint>: {"count": n, "first": t, "last": t}},  # t: time.time() at admission
                       "max_in_flight": n, "busy_seconds": s,  # connection-seconds of admitted requests
                       "first": t, "last": t}}}  # first admission, last end
    }

Endpoint names in ``by_endpoint`` are "METHOD <route template>", e.g.
``"GET /api/profile-bulk-import-jobs/{job_id}"``, ``"POST /3.0/lists/{list_id}"``;
control requests are not counted.  The behaviour of each API, and every place
where it goes beyond the specs, is documented in :mod:`.klaviyo` and
:mod:`.mailchimp`; rate limits in :mod:`.ratelimit`.
"""

from .config import (
    KLAVIYO_ACCOUNT_ID,
    KLAVIYO_API_KEY,
    KLAVIYO_LIST_ID,
    KLAVIYO_LIST_NAME,
    KLAVIYO_REVISION,
    KLAVIYO_SECOND_LIST_ID,
    LATENCY_KINDS,
    MAILCHIMP_ACCOUNT_ID,
    MAILCHIMP_API_KEY,
    MAILCHIMP_AUDIENCE_ID,
    MAILCHIMP_AUDIENCE_NAME,
    AudienceConfig,
    KlaviyoAccountConfig,
    KlaviyoListConfig,
    MailchimpAccountConfig,
    MergeFieldConfig,
    SandboxConfig,
)
from .mailchimp import subscriber_hash
from .server import Sandbox

__all__ = [
    "Sandbox",
    "SandboxConfig",
    "AudienceConfig",
    "KlaviyoAccountConfig",
    "KlaviyoListConfig",
    "MailchimpAccountConfig",
    "MergeFieldConfig",
    "KLAVIYO_ACCOUNT_ID",
    "KLAVIYO_API_KEY",
    "KLAVIYO_LIST_ID",
    "KLAVIYO_LIST_NAME",
    "KLAVIYO_REVISION",
    "KLAVIYO_SECOND_LIST_ID",
    "LATENCY_KINDS",
    "MAILCHIMP_ACCOUNT_ID",
    "MAILCHIMP_API_KEY",
    "MAILCHIMP_AUDIENCE_ID",
    "MAILCHIMP_AUDIENCE_NAME",
    "subscriber_hash",
]
