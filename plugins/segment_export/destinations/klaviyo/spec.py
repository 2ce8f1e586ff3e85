"""The ``destination`` block of a Klaviyo export (``type: klaviyo``). Pure: pydantic only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from segment_export.spec import DestinationSpec

if TYPE_CHECKING:
    from segment_export.spec import ExportSpec


class KlaviyoDestinationSpec(DestinationSpec):
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

    @property
    def targets(self) -> list[str]:
        return sorted(set(self.lists.values())) if self.lists else [self.target_id]

    def describe_targets(self) -> tuple[str, str]:
        if not self.lists:
            return super().describe_targets()
        return "lists", ", ".join(f"`{list_id}` (segment `{segment}`)" for segment, list_id in self.lists.items())

    def check_export(self, export: ExportSpec) -> None:
        if self.lists is not None:
            missing = sorted(set(export.source.segments or []) - set(self.lists))
            if not export.source.segment_column or missing:
                raise ValueError(
                    "destination.lists: every exported segment needs a list "
                    + (f"(no list for {missing})" if missing else "(and source.segment_column/segments must be set)")
                )
        if export.deferrable and self.subscribe:
            raise ValueError(
                "deferrable: a subscribing Klaviyo export cannot defer yet: which profiles consented is not kept "
                "with a job in flight, so the resumed task would send them again; remove 'deferrable' or 'subscribe'"
            )
        if bool(export.mapping.consent) != self.subscribe:
            raise ValueError(
                "mapping.consent: a Klaviyo export subscribes people only when asked twice: set both "
                "'destination.subscribe: true' and 'mapping.consent' (the column that is true where the person "
                "consented), or neither (profiles then only join the list, which is not consent)"
            )
