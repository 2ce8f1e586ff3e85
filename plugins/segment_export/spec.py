"""The export spec: what a data engineer writes in YAML, validated before any DAG is built.

Pure: no Airflow, no network, no segment data. Parsing a DAG file only ever reads YAML through this module.
Every model forbids unknown keys, so a typo is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import os
import re
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from croniter import croniter
from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, SerializeAsAny, ValidationError, field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from segment_export.destinations.registry import DestinationType

#: the standard profile fields every destination may take, in the order a Profile holds them (mapping.Profile)
PROFILE_FIELDS = ("email", "first_name", "last_name", "phone_number", "external_id")

# What Airflow refuses, restated so the spec stays free of Airflow imports (tests/test_dag_factory.py checks each one
# against the installed Airflow, so a new Airflow that changes them fails a test instead of a parse):
# - tags: the DAG constructor refuses a tag over airflow.sdk.definitions.dag.TAG_MAX_LEN characters;
# - schedules: ``@once``, ``@continuous``, or a croniter expression after Airflow's preset aliases
#   (airflow.sdk.definitions.timetables._cron.CRON_PRESETS); anything else is AirflowTimetableInvalid;
# - the metadata database's column sizes: dag_display_name and owners String(2000), pool String(256).
AIRFLOW_TAG_MAX_LEN = 100
AIRFLOW_SCHEDULE_PRESETS = frozenset({"@once", "@continuous"})
AIRFLOW_CRON_PRESETS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@quarterly": "0 0 1 */3 *",
    "@yearly": "0 0 1 1 *",
}
AIRFLOW_TEXT_MAX_LEN = 2000
AIRFLOW_POOL_MAX_LEN = 256

# Spec files larger than this are refused before they are read: a DAG file is parsed within Airflow's
# dagbag_import_timeout (30 s by default), and one huge spec must not make every export disappear.
SPEC_MAX_BYTES_ENV = "SEGMENT_EXPORT_SPEC_MAX_BYTES"
DEFAULT_SPEC_MAX_BYTES = 10 * 1024 * 1024

# The C (libyaml) loader is several times faster than the pure-Python one; same safe subset of YAML.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# A dag_id: Airflow allows word characters, '.' and '-' up to 250 (airflow.sdk.definitions._internal.node
# validate_key); ASCII and 200 keep ids portable (URLs, log paths, the state table's key).
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")
# Airflow asset URIs: a scheme, '://', something after it; no whitespace.
_ASSET_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")
# ISO 3166-1 alpha-2, as the phonenumbers library names regions.
_REGION_RE = re.compile(r"[A-Z]{2}")
# A callback given by its import path: 'package.module.function' or 'package.module:function'.
_CALLABLE_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*[.:][A-Za-z_][A-Za-z0-9_]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    """Where the segment comes from: a table (optionally filtered by segment), a SQL query, or a CSV/Parquet file."""

    conn_id: str | None = Field(None, description="Airflow SQL connection id (table or query sources).")
    table: str | None = Field(None, description="Table name, optionally schema-qualified (quoted as an identifier).")
    query: str | None = Field(None, description="A SELECT statement whose rows are the segment.")
    path: str | None = Field(None, description="CSV or Parquet file (relative paths are relative to the spec file).")
    format: Literal["csv", "parquet"] | None = Field(None, description="File format; inferred from the suffix.")
    segment_column: str | None = None
    segments: list[str] | None = None
    chunk_size: int = Field(10_000, ge=1, le=1_000_000, description="Rows read per chunk; bounds memory.")
    asset: str | None = Field(
        None,
        description=(
            "URI of the Airflow asset the segment is (the export's inlet). Default: 'sql://<conn_id>/<table>' for "
            "a table, 'file://<path>' for a file, none for a query."
        ),
    )

    @field_validator("table", "segment_column")
    @classmethod
    def _identifier(cls, v: str | None) -> str | None:
        # Names are quoted as identifiers at run time, so nothing here could run as SQL; but a name carrying
        # SQL is a mistake worth a clear error now rather than a "no such table" later.
        if v is not None and (not v.strip() or any(bad in v for bad in (";", "--", "/*", "'", '"', "`", "\x00"))):
            raise ValueError(
                f"{v!r} is not a table or column name (it contains SQL punctuation); to filter or join, use 'query'"
            )
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> SourceSpec:
        kinds = [k for k in ("table", "query", "path") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of 'table', 'query' or 'path' (got {kinds or 'none'})")
        if self.path is None and not self.conn_id:
            raise ValueError(f"'conn_id' is required with '{kinds[0]}' (the Airflow SQL connection to read from)")
        if self.path is not None and self.conn_id:
            raise ValueError("'conn_id' does not apply to a file source ('path')")
        if self.segments is not None and not self.segment_column:
            raise ValueError("'segments' needs 'segment_column' (the column holding each row's segment name)")
        if self.segment_column and not self.segments:
            raise ValueError("'segment_column' needs 'segments' (the segment names to export)")
        if self.path is not None and self.format is None:
            suffix = Path(self.path).suffix.lower()
            if suffix not in (".csv", ".parquet", ".pq"):
                raise ValueError(f"cannot infer the file format of {self.path!r}; set 'format: csv|parquet'")
        return self

    @field_validator("asset")
    @classmethod
    def _asset_uri(cls, v: str | None) -> str | None:
        if v is not None and not _ASSET_URI_RE.match(v):
            raise ValueError(f"{v!r} is not an asset URI such as 'sql://warehouse/analytics.segment_members'")
        if v is not None and v.lower().startswith("airflow:"):
            raise ValueError("the asset scheme 'airflow' is reserved by Airflow")
        return v

    @property
    def asset_uri(self) -> str | None:
        """The inlet asset's URI: the spec's ``asset``, else one derived from the table or file."""
        if self.asset:
            return self.asset
        if self.table:
            return f"sql://{self.conn_id}/{self.table}"
        if self.path:
            return f"file://{self.path}" if self.path.startswith("/") else None
        return None

    @property
    def kind(self) -> Literal["table", "query", "file"]:
        return "table" if self.table else "query" if self.query else "file"

    @property
    def file_format(self) -> Literal["csv", "parquet"]:
        if self.format:
            return self.format
        return "csv" if Path(self.path or "").suffix.lower() == ".csv" else "parquet"


class DestinationSpec(_Strict):
    """The spec's ``destination`` block: ``type`` picks the destination (see ``destinations/registry.py``), whose
    own model (a subclass declared in its package) holds the rest of the block."""

    type: str = Field(description="The destination: one of the registered destination types.")
    conn_id: str | None = Field(None, description="Airflow connection id; defaults to '<type>_default'.")

    @property
    def kind(self) -> DestinationType:
        from segment_export.destinations.registry import destination_type

        return destination_type(self.type)

    @property
    def connection_id(self) -> str:
        return self.conn_id or self.kind.default_conn_id

    @property
    def target_id(self) -> str:
        """What the export writes to (a list id, an audience id): the state and the outcomes are kept per target."""
        raise NotImplementedError

    @property
    def targets(self) -> list[str]:
        """Every id the export writes to (its outlets' assets): one, unless the destination spreads segments."""
        return [self.target_id]

    def describe_targets(self) -> tuple[str, str]:
        """(kind, Markdown text) of the targets, for the DAG's documentation."""
        return self.kind.target_kind, f"`{self.target_id}`"

    def doc_rows(self) -> list[tuple[str, str]]:
        """Extra rows for the DAG's documentation table (settings a reader of the DAG must see)."""
        return []

    def check_export(self, export: ExportSpec) -> None:
        """Rules across the export (mapping, source, sync) this destination imposes: raise ValueError naming the
        field, as the YAML spells it."""


def _destination_block(value: Any) -> DestinationSpec:
    """Validate a ``destination`` block with its type's model: errors keep the block's own field paths."""
    if isinstance(value, DestinationSpec):
        return value
    from segment_export.destinations.registry import destination_types

    known = destination_types()
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in known:
        names = ", ".join(repr(name) for name in known)
        what = "is missing" if kind is None else f"{kind!r} is not a destination"
        raise ValueError(f"destination.type {what}; give one of {names}")
    return known[kind].spec_model.model_validate(value)


class MappingSpec(_Strict):
    """Which source column feeds each profile field. Only mapped fields ever leave the warehouse."""

    email: str = Field(min_length=1)
    first_name: str | None = None
    last_name: str | None = None
    phone_number: str | None = None
    external_id: str | None = None
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description="Extra attributes: Klaviyo custom properties, or Mailchimp merge fields keyed by merge tag.",
    )
    consent: str | None = Field(
        None,
        description="Column that is true where the person consented to marketing (Mailchimp: chooses a new "
        "member's status; Klaviyo, with destination.subscribe: who is subscribed). Never sent itself.",
    )
    phone_region: str | None = Field(
        None,
        description="ISO 3166 alpha-2 region (e.g. 'US') assumed for phone numbers written without a country "
        "code; without it such numbers are invalid.",
    )

    @field_validator("phone_region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None and not _REGION_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not an ISO 3166 alpha-2 region code: two upper-case letters such as 'US'")
        if v is not None and _unknown_phone_region(v):
            raise ValueError(f"{v!r} is not a region the phone number library knows (e.g. 'US', 'GB', 'DE')")
        return v

    @model_validator(mode="after")
    def _region_needs_phone(self) -> MappingSpec:
        if self.phone_region is not None and not self.phone_number:
            raise ValueError("'phone_region' applies to 'phone_number', which is not mapped")
        return self

    def fields(self) -> list[tuple[str, str]]:
        """(profile field, source column) of every mapped field that is sent: the standard fields
        (``PROFILE_FIELDS``), then ``attributes.<name>``. ``consent`` is read, never sent, so it is not here."""
        pairs = [(name, getattr(self, name)) for name in PROFILE_FIELDS]
        pairs += [(f"attributes.{name}", column) for name, column in self.attributes.items()]
        return [(name, column) for name, column in pairs if column]

    def columns(self) -> list[str]:
        """Every source column the mapping reads, in a stable order, without repeats."""
        cols = [column for _, column in self.fields()]
        if self.consent:
            cols.insert(len([n for n in PROFILE_FIELDS if getattr(self, n)]), self.consent)
        return list(dict.fromkeys(cols))


class LimitSpec(_Strict):
    max_profiles: int | None = Field(None, ge=1, description="Defaults to the destination's documented cap.")
    on_exceed: Literal["fail", "truncate"] = "fail"
    order_by: str | None = Field(None, description="Column that orders rows when truncating (deterministic).")
    max_rejected_share: float | None = Field(
        0.05, ge=0, le=1,
        description="Fail the task after the run when more than this share of the segment's rows was invalid or "
        "rejected (null: never), so alerting fires. Default 5%.",
    )

    @model_validator(mode="after")
    def _truncate_needs_key(self) -> LimitSpec:
        if self.on_exceed == "truncate" and not self.order_by:
            raise ValueError("'order_by' is required with 'on_exceed: truncate', so every run keeps the same rows")
        return self


class AlertsSpec(_Strict):
    """Who hears about a failed export run: e-mail through an SMTP connection, and/or a callable of yours."""

    email: list[str] = Field(default_factory=list, description="Addresses told when a run fails (SMTP notifier).")
    smtp_conn_id: str = Field("smtp_default", description="The Airflow SMTP connection the e-mail goes through.")
    callback: str | None = Field(
        None,
        description="Import path of a function called with the task's context when a run fails, e.g. 'my_alerts.page'.",
    )

    @field_validator("email")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if not re.match(r"^[^@\s]+@[^@\s]+\.[^@\s]+$", a)]
        if bad:
            raise ValueError(f"{len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not an e-mail address")
        return v

    @field_validator("callback")
    @classmethod
    def _callable_path(cls, v: str | None) -> str | None:
        if v is not None and not _CALLABLE_PATH_RE.match(v):
            raise ValueError(f"{v!r} is not an import path such as 'my_package.alerts.on_export_failure'")
        return v


# What a role may do with an export's DAG, and the Airflow permissions each grants (FAB auth manager).
ACCESS_LEVELS: dict[str, dict[str, set[str]]] = {
    "read": {"DAGs": {"can_read"}, "DAG Runs": {"can_read"}},
    "trigger": {"DAGs": {"can_read"}, "DAG Runs": {"can_read", "can_create"}},
    "edit": {"DAGs": {"can_read", "can_edit"}, "DAG Runs": {"can_read", "can_create", "can_edit"}},
    "delete": {"DAGs": {"can_read", "can_delete"}, "DAG Runs": {"can_read", "can_delete"}},
}


class SyncSpec(_Strict):
    """How runs after the first stay in step with the segment (changed rows only, members who left)."""

    state_conn_id: str | None = Field(
        None, description="SQL connection for the state and outcomes tables; default: the source's connection "
        "(an embedded SQLite file for file sources)."
    )
    on_leave: Literal["keep", "remove", "unsubscribe"] | None = Field(
        None,
        description=(
            "A profile exported before that is no longer in the segment: 'keep' it, 'remove' it from what the "
            "export manages (a list; the tags of its segments), or 'unsubscribe' it (explicit opt-in, where the "
            "destination supports it). The default and the choices are the destination's. Nothing is ever deleted."
        ),
    )
    dry_run: bool = Field(False, description="Every run only plans and reports; nothing is sent.")
    max_leave_share: float | None = Field(
        0.2, ge=0, le=1,
        description="Mass-removal guard: a run that would remove, untag or unsubscribe more than this share of the "
        "export's remembered profiles (or all of them, when the segment comes back empty) stops before any "
        "removal is sent; additions still go out. Default 20%; null disables the share check.",
    )
    allow_mass_leave: bool = Field(
        False, description="Let every run remove more than 'max_leave_share' (one run: the trigger form's option)."
    )
    warehouse_diff: bool = Field(
        True, description="On SQLite and PostgreSQL sources whose state lives beside the segment, runs after the first "
        "read only the rows that changed: the database compares the segment with a snapshot the last run left in "
        "a table of the export target's own, 'segment_export_snapshot_<digest>' (about the size of the segment's "
        "mapped columns). false: every run reads the whole segment and keeps no snapshot.",
    )


class VerifySpec(_Strict):
    """``verify``: after each run, compare the destination's real membership with the export's state (drift).

    ``verify: true`` is ``verify: {}``; ``verify: false`` (or leaving it out) is no verify pass."""

    repair: bool = Field(
        False,
        description="Let the next run put back what the export owns: profiles found removed outside the export are "
        "forgotten by the state, so the next run sends them again. Nobody is ever re-subscribed: unsubscribed and "
        "suppressed profiles are only reported.",
    )


def _verify_block(value: Any) -> Any:
    """``verify: true | false | {repair: ...}``."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


class ExportSpec(_Strict):
    """One export: one destination fed by one source; becomes one DAG whose dag_id is ``id``."""

    id: str
    name: str | None = Field(None, min_length=1, max_length=AIRFLOW_TEXT_MAX_LEN, description="The DAG's display name.")
    description: str | None = None
    owner: str = Field("segment-export", min_length=1, max_length=AIRFLOW_TEXT_MAX_LEN)
    tags: list[str] = Field(default_factory=list)
    schedule: str | None = Field(
        None, description="Cron expression or preset ('@daily', '@once', ...); null for on-demand only."
    )
    pool: str | None = Field(
        None, min_length=1, max_length=AIRFLOW_POOL_MAX_LEN,
        description="Airflow pool for the export task, e.g. one single-slot pool per Mailchimp API key so "
        "exports sharing the key never exceed its 10 connections together."
    )
    start_date: date = date(2024, 1, 1)
    privacy_acknowledged: bool = Field(
        description=(
            "Must be true: the person responsible acknowledges that the mapped fields leave the compliance "
            "boundary for a third-party marketing platform."
        )
    )
    source: SourceSpec
    destination: SerializeAsAny[DestinationSpec]  # its type's own model: see _destination_block
    mapping: MappingSpec
    limit: LimitSpec = Field(default_factory=LimitSpec)
    sync: SyncSpec = Field(default_factory=SyncSpec)
    schedule_on_source_asset: bool = Field(
        False, description="Run whenever the source's asset is updated (instead of 'schedule')."
    )
    deferrable: bool = Field(
        False,
        description="Wait for the destination's jobs on Airflow's triggerer, not in the task: the task submits its "
        "batches, frees its worker slot while the destination works, and resumes to record outcomes, tags and "
        "leavers. Needs a running triggerer, and a destination whose batches are jobs.",
    )
    alerts: AlertsSpec | None = None
    verify: Annotated[VerifySpec | None, BeforeValidator(_verify_block)] = Field(
        None,
        description="Drift: after each run, read the destination's membership (the list's profiles; the members "
        "with the export's tags) and report what differs from the export's state: true, or {repair: true}.",
    )
    access_control: dict[str, list[Literal["read", "trigger", "edit", "delete"]]] | None = Field(
        None,
        description="Airflow roles allowed to use this export's DAG, e.g. {Marketing: [read, trigger]} (FAB auth manager).",
    )
    # The YAML file the export was read from (None when built in code): errors found later, while its DAG is
    # built, name it. Not a field, so it is not part of the spec the operator carries.
    _spec_file: str | None = PrivateAttr(None)

    @property
    def spec_file(self) -> str | None:
        return self._spec_file

    @field_validator("access_control")
    @classmethod
    def _roles(cls, v: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        for role, levels in (v or {}).items():
            if not role.strip():
                raise ValueError("role names must not be empty")
            if not levels:
                raise ValueError(f"role {role!r}: give at least one of read, trigger, edit, delete")
        return v

    @property
    def dag_access_control(self) -> dict[str, dict[str, set[str]]] | None:
        """``access_control`` as Airflow's DAG argument: role -> resource -> permissions."""
        if self.access_control is None:
            return None
        out: dict[str, dict[str, set[str]]] = {}
        for role, levels in self.access_control.items():
            perms: dict[str, set[str]] = {}
            for level in levels:
                for resource, actions in ACCESS_LEVELS[level].items():
                    perms.setdefault(resource, set()).update(actions)
            out[role] = perms
        return out

    @field_validator("id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        if not _ID_RE.fullmatch(v):
            raise ValueError("must be 1-200 letters, digits, '_', '.' or '-' (it becomes the dag_id)")
        return v

    @field_validator("privacy_acknowledged")
    @classmethod
    def _acknowledged(cls, v: bool) -> bool:
        if v is not True:
            raise ValueError(
                "must be true: an export sends personal data to a third party; set it only once the person "
                "responsible for the data has agreed that it may leave the compliance boundary"
            )
        return v

    @field_validator("tags")
    @classmethod
    def _valid_tags(cls, v: list[str]) -> list[str]:
        for number, tag in enumerate(v, 1):
            if not tag.strip():
                raise ValueError(f"tag {number} is empty")
            if len(tag) > AIRFLOW_TAG_MAX_LEN:
                raise ValueError(
                    f"tag {number} has {len(tag)} characters; Airflow allows at most {AIRFLOW_TAG_MAX_LEN}"
                )
        return v

    @field_validator("destination", mode="wrap")
    @classmethod
    def _destination_by_type(cls, value: Any, handler: Any) -> DestinationSpec:
        return _destination_block(value)

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, v: str | None) -> str | None:
        if v is not None:
            check_schedule(v)
        return v

    @model_validator(mode="after")
    def _destination_rules(self) -> ExportSpec:
        if self.schedule_on_source_asset:
            if self.schedule is not None:
                raise ValueError("schedule_on_source_asset: give either 'schedule' or this option, not both")
            if self.source.asset_uri is None:
                raise ValueError("schedule_on_source_asset: the source has no asset; set 'source.asset' (a URI)")
        choices = self.destination.kind.on_leave
        if self.sync.on_leave is not None and self.sync.on_leave not in choices:
            raise ValueError(
                f"sync.on_leave: {self.destination.kind.display_name} exports take {' or '.join(map(repr, choices))}, "
                f"not {self.sync.on_leave!r}"
            )
        if self.deferrable and self.destination.kind.async_hook is None:
            raise ValueError(
                f"deferrable: {self.destination.kind.display_name} sends each batch and has its answer at once; there "
                "are no jobs to wait for on the triggerer (remove 'deferrable')"
            )
        if self.verify is not None and not self.destination.kind.verifies:
            raise ValueError(
                f"verify: {self.destination.kind.display_name} cannot list its {self.destination.kind.target_kind}'s "
                "membership (remove 'verify')"
            )
        self.destination.check_export(self)
        return self

    @property
    def on_leave(self) -> str:
        return self.sync.on_leave or self.destination.kind.on_leave[0]

    @property
    def state_conn_id(self) -> str | None:
        return self.sync.state_conn_id or self.source.conn_id

    @property
    def max_profiles(self) -> int:
        return self.limit.max_profiles or self.destination.kind.max_profiles

    @property
    def display_name(self) -> str:
        return self.name or self.id


class ErasureMappingSpec(_Strict):
    """The erasure source's columns: one row per request."""

    email: str = Field(description="Column holding the address to erase.")
    request_id: str = Field(description="Column holding the request's id (a receipt per request and target).")
    requested_at: str | None = Field(None, description="Column holding when the person asked (kept on the receipt).")

    def columns(self) -> list[str]:
        return list(dict.fromkeys(c for c in (self.email, self.request_id, self.requested_at) if c))


class ErasureSpec(_Strict):
    """A spec file's ``erasure`` block: where erasure requests come from. It becomes its own DAG, which sends each
    new request to every destination connection the exports of the specs folder write to (one receipt per
    request and target, in ``segment_export_erasures`` next to each export's state), and from then on every
    export on that connection skips the address."""

    id: str | None = Field(None, description="The DAG's dag_id; default '<file name>_erasures'.")
    name: str | None = Field(None, min_length=1, max_length=AIRFLOW_TEXT_MAX_LEN)
    description: str | None = None
    owner: str = Field("segment-export", min_length=1, max_length=AIRFLOW_TEXT_MAX_LEN)
    schedule: str | None = Field(None, description="Cron expression or preset, as an export's; null: on demand.")
    start_date: date = date(2024, 1, 1)
    source: SourceSpec = Field(description="A table, query or file with one row per request.")
    mapping: ErasureMappingSpec

    @field_validator("id")
    @classmethod
    def _valid_id(cls, v: str | None) -> str | None:
        if v is not None and not _ID_RE.fullmatch(v):
            raise ValueError("must be 1-200 letters, digits, '_', '.' or '-' (it becomes the dag_id)")
        return v

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, v: str | None) -> str | None:
        if v is not None:
            check_schedule(v)
        return v

    @field_validator("source")
    @classmethod
    def _no_segments(cls, v: SourceSpec) -> SourceSpec:
        if v.segment_column:
            raise ValueError("an erasure source has no segments: every row is a request (filter with 'query')")
        return v

    _spec_file: str | None = PrivateAttr(None)

    @property
    def spec_file(self) -> str | None:
        return self._spec_file

    @property
    def dag_id(self) -> str:
        return self.id or f"{Path(self._spec_file or 'segment_export').stem}_erasures"

    @property
    def display_name(self) -> str:
        return self.name or self.dag_id


def check_schedule(schedule: str) -> None:
    """Refuse a schedule Airflow would refuse, with the reason; also one that can never fire (31 February).

    Airflow turns a string schedule into a cron timetable after resolving its preset aliases, and validates it by
    building a ``croniter``; the same parser is asked here, so the spec accepts exactly what Airflow accepts.
    """
    if schedule in AIRFLOW_SCHEDULE_PRESETS:
        return
    presets = ", ".join([*AIRFLOW_CRON_PRESETS, *sorted(AIRFLOW_SCHEDULE_PRESETS)])
    try:
        cron = croniter(AIRFLOW_CRON_PRESETS.get(schedule, schedule))
    except (ValueError, KeyError, TypeError) as exc:  # croniter's own errors are ValueErrors
        if schedule.startswith("@"):
            raise ValueError(f"{schedule!r} is not a schedule preset Airflow knows ({presets})") from None
        raise ValueError(
            f"{schedule!r} is not a cron expression Airflow accepts ({exc}); write 'minute hour day month weekday', "
            f"e.g. '0 6 * * *', or a preset ({presets})"
        ) from None
    try:
        cron.get_next(datetime)
    except ValueError:
        raise ValueError(f"{schedule!r} never fires (no such date); Airflow could never schedule a run") from None


def _unknown_phone_region(region: str) -> bool:
    """True when the phone number library is installed and does not know the region (it then could not use it)."""
    try:
        import phonenumbers
    except ImportError:  # pragma: no cover - the exporter needs it; the spec only narrows its check with it
        return False
    return region not in phonenumbers.SUPPORTED_REGIONS


class SpecError(ValueError):
    """A spec that cannot become a DAG. The message names the file, the export and the field."""

    def __init__(self, file: str | Path, export_id: str | None, field: str | None, message: str):
        self.file, self.export_id, self.field, self.reason = str(file), export_id, field, message
        where = [f"file {self.file}"]
        if export_id:
            where.append(f"export {export_id!r}")
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}")


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _errors_from_validation(file: Path, export_id: str | None, exc: ValidationError) -> list[SpecError]:
    errors = []
    for err in exc.errors(include_url=False):
        field = _field_path(err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the export spec; check its spelling)"
        errors.append(SpecError(file, export_id, field, msg))
    return errors


def spec_max_bytes() -> int:
    """The size cap of one spec file: ``SEGMENT_EXPORT_SPEC_MAX_BYTES`` (bytes), default 10 MiB."""
    raw = os.environ.get(SPEC_MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_SPEC_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{SPEC_MAX_BYTES_ENV} must be a positive number of bytes, not {raw!r}")
    return value


def _read_yaml(path: Path, max_bytes: int | None) -> tuple[Any, SpecError | None]:
    """The file's YAML document, or the error that names the file: unreadable, over the size cap, malformed.

    At most ``cap + 1`` bytes are read, so a file over the cap is never read whole.
    """
    try:
        cap = spec_max_bytes() if max_bytes is None else max_bytes
    except ValueError as exc:
        return None, SpecError(path, None, None, str(exc))
    try:
        with path.open("rb") as f:
            data = f.read(cap + 1)
        if len(data) > cap:
            return None, SpecError(
                path, None, None,
                f"the file is larger than the spec size cap of {cap:,} bytes (set {SPEC_MAX_BYTES_ENV} to raise it; "
                "a spec this large is usually generated data, which belongs in the source, not in the spec)",
            )
        return yaml.load(data.decode("utf-8"), Loader=_YAML_LOADER), None  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return None, SpecError(path, None, None, f"malformed YAML{where}: {getattr(exc, 'problem', exc)}")
    except (OSError, UnicodeDecodeError) as exc:
        return None, SpecError(path, None, None, f"cannot read the file: {exc}")


def parse_spec_file(path: Path, max_bytes: int | None = None) -> tuple[list[ExportSpec], list[SpecError]]:
    """Parse one YAML file holding ``exports: [...]``; return the valid exports and one error per problem.

    Each export is validated on its own, so one bad export does not hide the good ones in the same file.
    ``max_bytes`` (default :func:`spec_max_bytes`) caps the file's size: parsing a DAG file has a time limit.
    (:func:`parse_spec_document` also returns the file's ``erasure`` block.)
    """
    specs, _, errors = parse_spec_document(path, max_bytes)
    return specs, errors


def parse_spec_document(path: Path, max_bytes: int | None = None) -> tuple[list[ExportSpec], ErasureSpec | None, list[SpecError]]:
    """:func:`parse_spec_file`, with the file's optional ``erasure`` block (None when absent or invalid)."""
    doc, error = _read_yaml(path, max_bytes)
    if error:
        return [], None, [error]
    if (not isinstance(doc, dict) or "exports" not in doc or set(doc) - {"exports", "erasure"}
            or not isinstance(doc["exports"], list)):
        return [], None, [SpecError(path, None, "exports", "the file must hold one top-level key 'exports' with a list "
                                    "(and optionally 'erasure')")]
    erasure, errors = _parse_erasure(path, doc.get("erasure"))
    specs, export_errors = _parse_exports(path, doc["exports"])
    return specs, erasure, errors + export_errors


def _parse_erasure(path: Path, raw: Any) -> tuple[ErasureSpec | None, list[SpecError]]:
    if raw is None:
        return None, []
    if not isinstance(raw, dict):
        return None, [SpecError(path, None, "erasure", "the erasure block must be a mapping")]
    try:
        erasure = ErasureSpec.model_validate(raw)
    except ValidationError as exc:
        return None, [SpecError(path, None, f"erasure.{e.field}" if e.field else "erasure",
                                e.reason.replace("the export spec", "the erasure block"))
                      for e in _errors_from_validation(path, None, exc)]
    if erasure.source.path and not Path(erasure.source.path).is_absolute():
        source = erasure.source.model_copy(update={"path": str((path.parent / erasure.source.path).resolve())})
        erasure = erasure.model_copy(update={"source": source})
    erasure._spec_file = str(path)
    return erasure, []


def _parse_exports(path: Path, exports: list[Any]) -> tuple[list[ExportSpec], list[SpecError]]:
    specs: list[ExportSpec] = []
    errors: list[SpecError] = []
    for index, raw in enumerate(exports):
        export_id = str(raw.get("id")) if isinstance(raw, dict) and raw.get("id") else f"#{index + 1}"
        if not isinstance(raw, dict):
            errors.append(SpecError(path, export_id, None, "each export must be a mapping"))
            continue
        try:
            spec = ExportSpec.model_validate(raw)
        except ValidationError as exc:
            errors.extend(_errors_from_validation(path, export_id, exc))
            continue
        if spec.source.path and not Path(spec.source.path).is_absolute():
            source = spec.source.model_copy(update={"path": str((path.parent / spec.source.path).resolve())})
            spec = spec.model_copy(update={"source": source})
        spec._spec_file = str(path)
        specs.append(spec)
    return specs, errors


def load_specs(folder: str | Path) -> tuple[list[ExportSpec], list[SpecError]]:
    """Read every ``*.yaml``/``*.yml`` under ``folder``; an id used twice is an error for each later use."""
    specs, _, errors = load_spec_folder(folder)
    return specs, errors


def load_spec_folder(folder: str | Path) -> tuple[list[ExportSpec], list[ErasureSpec], list[SpecError]]:
    """:func:`load_specs`, with the ``erasure`` block of each file that has one. An erasure DAG's id is unique among
    every DAG id of the folder, exports' included."""
    return load_spec_paths(sorted(p for p in Path(folder).rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
                           if Path(folder).is_dir() else None, folder)


def load_spec_paths(files: list[Path] | None, folder: str | Path | None = None
                    ) -> tuple[list[ExportSpec], list[ErasureSpec], list[SpecError]]:
    """The exports, erasure blocks and errors of these spec files, as :func:`load_spec_folder` reads a folder's
    (``files`` None: ``folder`` does not exist)."""
    if files is None:
        return [], [], [SpecError(folder or ".", None, None, "the export specs folder does not exist")]
    specs: list[ExportSpec] = []
    erasures: list[ErasureSpec] = []
    errors: list[SpecError] = []
    seen: dict[str, Path] = {}
    for file in files:
        file_specs, erasure, file_errors = parse_spec_document(file)
        errors.extend(file_errors)
        for spec in file_specs:
            if spec.id in seen:
                errors.append(SpecError(file, spec.id, "id", f"export id already used in {seen[spec.id]}"))
                continue
            seen[spec.id] = file
            specs.append(spec)
        if erasure is not None:
            erasures.append(erasure)
    kept: list[ErasureSpec] = []
    for erasure in erasures:
        file = Path(erasure.spec_file or ".")
        if erasure.dag_id in seen:
            errors.append(SpecError(file, None, "erasure.id", f"dag_id {erasure.dag_id!r} already used in {seen[erasure.dag_id]}"))
            continue
        seen[erasure.dag_id] = file
        kept.append(erasure)
    return specs, kept, errors
