"""The end-to-end rate budget exports (tests/airflow): shared by the deployment fixture and its tests."""

from __future__ import annotations

#: four exports on one API key at once, per destination (test_celery_deployment's rate budget tests): one per
#: segment of a larger table, each to a list or audience of its own
BUDGET_PROFILES = 16_000  # ~4,400 rows a segment: 44 profile lookups per Klaviyo export, 9 Mailchimp batch calls
#: the Klaviyo budget exports' connection uses this share of the documented limits, and the test scales the
#: sandbox's limits by it, so the key's steady limit binds within seconds (profile reads: 30/s, 300/min)
BUDGET_LIMIT_SHARE = 0.4
BUDGET_SEGMENTS = ("vip", "newsletter", "churn_risk", "winback")
BUDGET_LISTS = {segment: f"BgtK0{i}" for i, segment in enumerate(BUDGET_SEGMENTS, 1)}
BUDGET_AUDIENCES = {segment: f"b0d6e7000{i}" for i, segment in enumerate(BUDGET_SEGMENTS, 1)}
BUDGET_SPEC = """
  - id: e2e_budget_klaviyo_%(segment)s
    privacy_acknowledged: true
    source: {conn_id: warehouse, table: budget_members, segment_column: segment, segments: [%(segment)s]}
    destination: {type: klaviyo, conn_id: klaviyo_budget, list_id: %(list)s}
    mapping: {email: email, first_name: first_name}
    sync: {on_leave: remove}
  - id: e2e_budget_mailchimp_%(segment)s
    privacy_acknowledged: true
    source: {conn_id: warehouse, table: budget_members, segment_column: segment, segments: [%(segment)s]}
    destination: {type: mailchimp, audience_id: %(audience)s, new_member_status: subscribed}
    mapping: {email: email, first_name: first_name}
"""
