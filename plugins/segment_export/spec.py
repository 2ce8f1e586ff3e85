"""The export spec: what a data engineer writes in YAML, validated before any DAG is built.

Pure: no Airflow, no network, no segment data. Parsing a DAG file only ever reads YAML through this module.
Every model forbids unknown keys, so a typo is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The destinations' documented per-export caps (the seed product's limits), used when a spec gives none.
DEFAULT_MAX_PROFILES = {"klaviyo": 100_000, "mailchimp": 1_000_000}
DEFAULT_CONN_IDS = {"klaviyo": "klaviyo_default", "mailchimp": "mailchimp_default"}

_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
# Mailchimp merge tags: letters, digits and underscores, at most 10 characters.
_MERGE_TAG_RE = re.compile(r"^[A-Z0-9_]{1,10}$")
# Airflow asset URIs: a scheme, '://', something after it; no whitespace.
_ASSET_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")
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


class _DestinationBase(_Strict):
    conn_id: str | None = Field(None, description="Airflow connection id; defaults to '<type>_default'.")

    @property
    def connection_id(self) -> str:
        return self.conn_id or DEFAULT_CONN_IDS[self.type]  # type: ignore[attr-defined]


class KlaviyoDestinationSpec(_DestinationBase):
    type: Literal["klaviyo"]
    list_id: str | None = Field(None, min_length=1, description="The Klaviyo list that receives every profile.")
    lists: dict[str, str] | None = Field(
        None, description="One list per segment instead: segment name → list id (profiles move with their segments)."
    )
    subscribe: bool = Field(
        False,
        description=(
            "Explicit opt-in: subscribe rows whose mapping.consent column is true to email marketing (Bulk Subscribe "
            "Profiles), unless Klaviyo suppresses them or they unsubscribed. Without it, profiles only join the list, "
            "which is not consent. Nobody is ever unsubscribed by an export."
        ),
    )
    report_suppressed: bool | None = Field(
        None,
        description=(
            "After each import job, look up the accepted profiles (one request per 100, at Klaviyo's 750/min) and "
            "report the ones Klaviyo suppresses as skipped with its reason. Default: only with subscribe, which "
            "needs it; on a large first run the lookups, not the imports, bound the export (a minute per 75,000 "
            "profiles), so it is opt-in otherwise. Without it suppressed profiles are counted as accepted."
        ),
    )

    @property
    def checks_suppression(self) -> bool:
        return self.subscribe if self.report_suppressed is None else self.report_suppressed

    @model_validator(mode="after")
    def _one_way(self) -> KlaviyoDestinationSpec:
        if (self.list_id is None) == (self.lists is None):
            raise ValueError("give either 'list_id' (one list for the export) or 'lists' (one list per segment)")
        if self.lists is not None and not self.lists:
            raise ValueError("'lists' needs at least one segment: list id pair")
        if self.subscribe and self.report_suppressed is False:
            raise ValueError(
                "'subscribe' needs 'report_suppressed' (the lookup that keeps suppressed and unsubscribed profiles "
                "from being subscribed again)"
            )
        return self

    @property
    def target_id(self) -> str:
        """The list, or the lists joined with '+': the state and the asset are kept per target."""
        return self.list_id or "+".join(sorted(set((self.lists or {}).values())))


class MailchimpDestinationSpec(_DestinationBase):
    type: Literal["mailchimp"]
    audience_id: str = Field(min_length=1, description="The Mailchimp audience (list) id.")
    new_member_status: Literal["subscribed", "pending", "unsubscribed", "transactional"] = Field(
        description=(
            "Status given to members the export creates. Required: adding a person to an audience is a consent "
            "decision. Existing members' status is never changed by an export."
        )
    )
    status_without_consent: Literal["pending", "unsubscribed", "transactional"] = Field(
        "transactional",
        description="With mapping.consent: the status of a new member whose consent column is not true.",
    )

    @property
    def target_id(self) -> str:
        return self.audience_id


DestinationSpec = Annotated[KlaviyoDestinationSpec | MailchimpDestinationSpec, Field(discriminator="type")]


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

    def columns(self) -> list[str]:
        """Every source column the mapping reads, in a stable order, without repeats."""
        cols = [self.email, self.first_name, self.last_name, self.phone_number, self.external_id, self.consent]
        cols += list(self.attributes.values())
        return list(dict.fromkeys(c for c in cols if c))


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
            "export manages (the Klaviyo list; the Mailchimp tags of its segments), or for Mailchimp 'unsubscribe' "
            "it (explicit opt-in). Default: keep for Klaviyo, remove for Mailchimp. Nothing is ever deleted."
        ),
    )
    dry_run: bool = Field(False, description="Every run only plans and reports; nothing is sent.")
    max_leave_share: float | None = Field(
        0.2, ge=0, le=1,
        description="Stop before any removal when a run would remove, untag or unsubscribe more than this share of "
        "the export's remembered profiles (and always when the segment comes back empty); null: no share limit.",
    )
    allow_mass_leave: bool = Field(False, description="Let every run remove any share of the remembered profiles.")


class ExportSpec(_Strict):
    """One export: one destination fed by one source; becomes one DAG whose dag_id is ``id``."""

    id: str
    name: str | None = None
    description: str | None = None
    owner: str = "segment-export"
    tags: list[str] = Field(default_factory=list)
    schedule: str | None = Field(None, description="Cron expression or preset; null for on-demand only.")
    pool: str | None = Field(
        None, description="Airflow pool for the export task, e.g. one single-slot pool per Mailchimp API key so "
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
    destination: DestinationSpec
    mapping: MappingSpec
    limit: LimitSpec = Field(default_factory=LimitSpec)
    sync: SyncSpec = Field(default_factory=SyncSpec)
    schedule_on_source_asset: bool = Field(
        False, description="Run whenever the source's asset is updated (instead of 'schedule')."
    )
    alerts: AlertsSpec | None = None
    access_control: dict[str, list[Literal["read", "trigger", "edit", "delete"]]] | None = Field(
        None,
        description="Airflow roles allowed to use this export's DAG, e.g. {Marketing: [read, trigger]} (FAB auth manager).",
    )

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
        if not _ID_RE.match(v):
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

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, v: str | None) -> str | None:
        if v is None or v.startswith("@"):
            return v
        if len(v.split()) not in (5, 6):
            raise ValueError(f"{v!r} is neither a cron expression (5 fields) nor a preset such as '@daily'")
        return v

    @model_validator(mode="after")
    def _destination_rules(self) -> ExportSpec:
        if self.schedule_on_source_asset:
            if self.schedule is not None:
                raise ValueError("schedule_on_source_asset: give either 'schedule' or this option, not both")
            if self.source.asset_uri is None:
                raise ValueError("schedule_on_source_asset: the source has no asset; set 'source.asset' (a URI)")
        if self.destination.type == "klaviyo" and self.destination.lists is not None:
            missing = sorted(set(self.source.segments or []) - set(self.destination.lists))
            if not self.source.segment_column or missing:
                raise ValueError(
                    "destination.lists: every exported segment needs a list "
                    + (f"(no list for {missing})" if missing else "(and source.segment_column/segments must be set)")
                )
        if self.destination.type == "klaviyo" and bool(self.mapping.consent) != self.destination.subscribe:
            raise ValueError(
                "mapping.consent: a Klaviyo export subscribes people only when asked twice: set both "
                "'destination.subscribe: true' and 'mapping.consent' (the column that is true where the person "
                "consented), or neither (profiles then only join the list, which is not consent)"
            )
        if self.destination.type == "klaviyo" and self.sync.on_leave == "unsubscribe":
            raise ValueError(
                "sync.on_leave: 'unsubscribe' is for Mailchimp; for Klaviyo use 'remove' (list membership only, "
                "consent untouched) or 'keep'"
            )
        if self.destination.type == "mailchimp":
            if self.mapping.external_id:
                raise ValueError(
                    "mapping.external_id: Mailchimp has no external id; map the column to a merge field in "
                    "'mapping.attributes' instead"
                )
            bad = [tag for tag in self.mapping.attributes if not _MERGE_TAG_RE.match(tag)]
            if bad:
                raise ValueError(
                    f"mapping.attributes: {bad} are not Mailchimp merge tags (A-Z, 0-9, '_', at most 10 characters)"
                )
        return self

    @property
    def on_leave(self) -> str:
        return self.sync.on_leave or ("remove" if self.destination.type == "mailchimp" else "keep")

    @property
    def state_conn_id(self) -> str | None:
        return self.sync.state_conn_id or self.source.conn_id

    @property
    def max_profiles(self) -> int:
        return self.limit.max_profiles or DEFAULT_MAX_PROFILES[self.destination.type]

    @property
    def display_name(self) -> str:
        return self.name or self.id


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
    # Drop pydantic's discriminator tags ("klaviyo"/"mailchimp") so the path reads as the YAML does.
    parts = [str(p) for p in loc if p not in ("klaviyo", "mailchimp")]
    return ".".join(parts)


def _errors_from_validation(file: Path, export_id: str | None, exc: ValidationError) -> list[SpecError]:
    errors = []
    for err in exc.errors(include_url=False):
        field = _field_path(err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the export spec; check its spelling)"
        errors.append(SpecError(file, export_id, field, msg))
    return errors


def parse_spec_file(path: Path) -> tuple[list[ExportSpec], list[SpecError]]:
    """Parse one YAML file holding ``exports: [...]``; return the valid exports and one error per problem.

    Each export is validated on its own, so one bad export does not hide the good ones in the same file.
    """
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return [], [SpecError(path, None, None, f"malformed YAML{where}: {getattr(exc, 'problem', exc)}")]
    except (OSError, UnicodeDecodeError) as exc:
        return [], [SpecError(path, None, None, f"cannot read the file: {exc}")]
    if not isinstance(doc, dict) or set(doc) != {"exports"} or not isinstance(doc["exports"], list):
        return [], [SpecError(path, None, "exports", "the file must hold one top-level key 'exports' with a list")]
    specs: list[ExportSpec] = []
    errors: list[SpecError] = []
    for index, raw in enumerate(doc["exports"]):
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
        specs.append(spec)
    return specs, errors


def load_specs(folder: str | Path) -> tuple[list[ExportSpec], list[SpecError]]:
    """Read every ``*.yaml``/``*.yml`` under ``folder``; an id used twice is an error for each later use."""
    folder = Path(folder)
    if not folder.is_dir():
        return [], [SpecError(folder, None, None, "the export specs folder does not exist")]
    specs: list[ExportSpec] = []
    errors: list[SpecError] = []
    seen: dict[str, Path] = {}
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    for file in files:
        file_specs, file_errors = parse_spec_file(file)
        errors.extend(file_errors)
        for spec in file_specs:
            if spec.id in seen:
                errors.append(SpecError(file, spec.id, "id", f"export id already used in {seen[spec.id]}"))
                continue
            seen[spec.id] = file
            specs.append(spec)
    return specs, errors
