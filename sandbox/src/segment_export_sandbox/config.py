"""Sandbox configuration: accounts, lists/audiences, latency, job speed, rate limits.

Why a dataclass tree: tests, the demo and benchmarks build configs in Python,
the CLI loads the same tree from a JSON file (``SandboxConfig.from_dict``), and a
running server can be retuned through ``PUT /_sandbox/config`` with a subset of
the runtime knobs (``SandboxConfig.apply_runtime``).  One shape for the three.

The defaults are the credentials and lists the exporter's own tests and the demo
DAGs expect, so they are module-level constants too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# --- default credentials and resources -------------------------------------------------

KLAVIYO_API_KEY = "pk_sandbox_0123456789abcdef0123456789abcdef"
KLAVIYO_ACCOUNT_ID = "SbxK01"  # Klaviyo account ids are the 6-char public key
KLAVIYO_LIST_ID = "Y6nRLr"
KLAVIYO_LIST_NAME = "Sandbox list"
KLAVIYO_SECOND_LIST_ID = "XyZ123"
KLAVIYO_SECOND_LIST_NAME = "Second sandbox list"
KLAVIYO_REVISION = "2026-07-15"

MAILCHIMP_API_KEY = "0123456789abcdef0123456789abcdef-us6"
MAILCHIMP_ACCOUNT_ID = "sbx0mc0account0000000001"
MAILCHIMP_AUDIENCE_ID = "a1b2c3d4e5"
MAILCHIMP_AUDIENCE_NAME = "Sandbox audience"

# Endpoint kinds that latency can be set for (seconds added per request).
LATENCY_KINDS = (
    "klaviyo_job",  # POST /api/profile-bulk-import-jobs
    "klaviyo_write",  # other Klaviyo writes (profile-import, list relationships)
    "klaviyo_read",  # Klaviyo GETs
    "mailchimp_batch",  # POST /3.0/lists/{list_id} (batch subscribe)
    "mailchimp_batch_operations",  # not a request's: how long a POST /3.0/batches job takes before it is finished
    "mailchimp_write",  # other Mailchimp writes (segments, tags)
    "mailchimp_read",  # Mailchimp GETs
    # not a request's: how long after its request a Klaviyo profile deletion is carried out, under behaviour
    # klaviyo_profile_deletion: deferred (default 0: at the next request)
    "klaviyo_deletion",
)


@dataclass
class MergeFieldConfig:
    """One Mailchimp merge field (audience field) definition."""

    tag: str
    name: str
    type: str = "text"
    required: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def default_merge_fields() -> list[MergeFieldConfig]:
    """The fields Mailchimp creates for a new audience, none required."""
    return [
        MergeFieldConfig("FNAME", "First Name", "text", options={"size": 25}),
        MergeFieldConfig("LNAME", "Last Name", "text", options={"size": 25}),
        MergeFieldConfig("ADDRESS", "Address", "address", options={"default_country": 164}),
        MergeFieldConfig("PHONE", "Phone Number", "phone", options={"phone_format": "none"}),
        MergeFieldConfig("BIRTHDAY", "Birthday", "birthday", options={"date_format": "MM/DD"}),
    ]


@dataclass
class AudienceConfig:
    """A Mailchimp audience (API name: list) that exists when the sandbox starts."""

    id: str
    name: str
    merge_fields: list[MergeFieldConfig] = field(default_factory=default_merge_fields)


@dataclass
class MailchimpAccountConfig:
    """One Mailchimp account: its API key (never shown in state) and audiences."""

    api_key: str
    account_id: str
    audiences: list[AudienceConfig] = field(default_factory=list)


@dataclass
class KlaviyoListConfig:
    id: str
    name: str


@dataclass
class KlaviyoAccountConfig:
    """One Klaviyo account: private key (never shown in state), id, lists."""

    api_key: str
    account_id: str
    lists: list[KlaviyoListConfig] = field(default_factory=list)


def default_klaviyo_accounts() -> list[KlaviyoAccountConfig]:
    return [
        KlaviyoAccountConfig(
            KLAVIYO_API_KEY,
            KLAVIYO_ACCOUNT_ID,
            [
                KlaviyoListConfig(KLAVIYO_LIST_ID, KLAVIYO_LIST_NAME),
                KlaviyoListConfig(KLAVIYO_SECOND_LIST_ID, KLAVIYO_SECOND_LIST_NAME),
            ],
        )
    ]


def default_mailchimp_accounts() -> list[MailchimpAccountConfig]:
    return [
        MailchimpAccountConfig(
            MAILCHIMP_API_KEY,
            MAILCHIMP_ACCOUNT_ID,
            [AudienceConfig(MAILCHIMP_AUDIENCE_ID, MAILCHIMP_AUDIENCE_NAME)],
        )
    ]


# --- where the vendors' documents are silent ---------------------------------------------
#
# Each key is one undocumented behaviour, with every value the real API plausibly has. The first value is the
# sandbox's default (its behaviour before the switch existed); the exporter's tests run under every value
# (README, "Where the vendors' documents are silent"). The module that implements a switch cites the document.
BEHAVIOURS: dict[str, tuple[Any, ...]] = {
    # true: a batch-subscribe member without ``status`` fails the whole request (400 naming members.item:N.status)
    "mailchimp_batch_update_requires_status": (False, True),
    # true: a bulk import job's completed_count counts its failed profiles too
    "klaviyo_completed_count_includes_failed": (False, True),
    # reject: an imported profile whose phone or external id belongs to another profile is an import error
    # (duplicate_profile) instead of being merged into that profile
    "klaviyo_identifier_conflict": ("merge", "reject"),
    # the status Mailchimp throttles with (too many simultaneous connections)
    "mailchimp_throttle_status": (429, 403),
    # double: Bulk Subscribe sends a confirmation; the profile is subscribed only once it confirms
    "klaviyo_list_opt_in": ("single", "double"),
    # false: a static-segment (tag) add leaves members that already had the tag out of ``members_added``
    "mailchimp_tag_add_lists_already_tagged": (True, False),
    # the status a list relationship call (add/remove profiles) answers when it names a profile id Klaviyo does
    # not have: the spec lists only 4XX
    "klaviyo_unknown_profile_id": (400, 404),
    # how many bulk profile import jobs may be in progress at once: the documents name no cap (other bulk jobs
    # say "The maximum number of jobs in progress at one time is 500"); beyond a cap a new job either waits
    # ``queued`` until one finishes, or is refused with 429 and Retry-After
    "klaviyo_jobs_in_progress": ("unlimited", "queue_beyond_2", "refuse_beyond_2"),
    # the order of an unsorted GET /api/lists/{id}/profiles: oldest membership first, or newest first
    "klaviyo_list_profiles_order": ("joined", "newest"),
    # GET /lists/{id}/segments/{segment_id}/members without include_cleaned/include_transactional/
    # include_unsubscribed: false leaves those members out (the parameters' names), true lists them anyway
    "mailchimp_segment_members_include_by_default": (False, True),
    # when Request Profile Deletion (POST /api/data-privacy-deletion-jobs) deletes the profile: at once, or
    # later ("The deletion occurs asynchronously"; how long it takes is not documented): latency.klaviyo_deletion
    # seconds after the request, at the first request after that
    "klaviyo_profile_deletion": ("immediate", "deferred"),
}


def default_behaviour() -> dict[str, Any]:
    return {key: values[0] for key, values in BEHAVIOURS.items()}


def check_behaviour(data: Any) -> dict[str, Any]:
    """A ``behaviour`` object's keys and values, refused with the allowed ones when unknown."""
    if not isinstance(data, dict):
        raise ValueError("behaviour must be an object")
    for key, value in data.items():
        if key not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {key!r}; known: {sorted(BEHAVIOURS)}")
        allowed = BEHAVIOURS[key]
        if value not in allowed or type(value) is not type(allowed[0]):
            raise ValueError(f"behaviour {key} must be one of {list(allowed)}, not {value!r}")
    return dict(data)


# Fields that PUT /_sandbox/config may change on a running server.
RUNTIME_FIELDS = (
    "behaviour",
    "latency",
    "klaviyo_profiles_per_second",
    "klaviyo_job_queue_seconds",
    "rate_limits",
    "rate_limit_scale",
    "mailchimp_max_connections",
)


@dataclass
class SandboxConfig:
    """Everything the sandbox can be told.  All fields have working defaults.

    ``rate_limit_scale`` multiplies every rate-limit *count* (burst and steady),
    never below 1 per window, so ``0.1`` turns Klaviyo's 10/s into 1/s and a test
    can provoke a 429 with two requests.
    """

    host: str = "127.0.0.1"
    port: int = 0
    klaviyo_accounts: list[KlaviyoAccountConfig] = field(default_factory=default_klaviyo_accounts)
    mailchimp_accounts: list[MailchimpAccountConfig] = field(default_factory=default_mailchimp_accounts)
    latency: dict[str, float] = field(default_factory=dict)
    klaviyo_profiles_per_second: float = 200_000.0
    klaviyo_job_queue_seconds: float = 0.0
    rate_limits: bool = True
    rate_limit_scale: float = 1.0
    mailchimp_max_connections: int = 10
    #: one value per undocumented behaviour (``BEHAVIOURS``); missing keys take their default
    behaviour: dict[str, Any] = field(default_factory=default_behaviour)

    def latency_for(self, kind: str) -> float:
        return float(self.latency.get(kind, 0.0))

    # --- (de)serialisation ----------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SandboxConfig":
        """Build a config from JSON-like data (CLI ``--config`` file)."""
        cfg = cls()
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        for key in ("host", "port"):
            if key in data:
                setattr(cfg, key, data[key])
        if "klaviyo_accounts" in data:
            cfg.klaviyo_accounts = [
                KlaviyoAccountConfig(
                    a["api_key"],
                    a["account_id"],
                    [KlaviyoListConfig(lst["id"], lst["name"]) for lst in a.get("lists", [])],
                )
                for a in data["klaviyo_accounts"]
            ]
        if "mailchimp_accounts" in data:
            cfg.mailchimp_accounts = [
                MailchimpAccountConfig(
                    a["api_key"],
                    a["account_id"],
                    [
                        AudienceConfig(
                            au["id"],
                            au["name"],
                            [MergeFieldConfig(**mf) for mf in au["merge_fields"]]
                            if "merge_fields" in au
                            else default_merge_fields(),
                        )
                        for au in a.get("audiences", [])
                    ],
                )
                for a in data["mailchimp_accounts"]
            ]
        cfg.apply_runtime({k: v for k, v in data.items() if k in RUNTIME_FIELDS})
        return cfg

    def apply_runtime(self, data: dict[str, Any]) -> None:
        """Apply the runtime subset (used by ``PUT /_sandbox/config``); validates types."""
        unknown = set(data) - set(RUNTIME_FIELDS)
        if unknown:
            raise ValueError(f"not runtime-configurable: {sorted(unknown)}")
        if "latency" in data:
            lat = data["latency"]
            if not isinstance(lat, dict) or set(lat) - set(LATENCY_KINDS):
                raise ValueError(f"latency must be an object with keys among {LATENCY_KINDS}")
            self.latency = {**self.latency, **{k: float(v) for k, v in lat.items()}}
        for key in ("klaviyo_profiles_per_second", "klaviyo_job_queue_seconds", "rate_limit_scale"):
            if key in data:
                value = float(data[key])
                if value < 0 or (key != "klaviyo_job_queue_seconds" and value == 0):
                    raise ValueError(f"{key} must be positive")
                setattr(self, key, value)
        if "behaviour" in data:
            self.behaviour = {**self.behaviour, **check_behaviour(data["behaviour"])}
        if "rate_limits" in data:
            if not isinstance(data["rate_limits"], bool):
                raise ValueError("rate_limits must be a boolean")
            self.rate_limits = data["rate_limits"]
        if "mailchimp_max_connections" in data:
            value = int(data["mailchimp_max_connections"])
            if value < 1:
                raise ValueError("mailchimp_max_connections must be >= 1")
            self.mailchimp_max_connections = value

    def runtime_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RUNTIME_FIELDS}
