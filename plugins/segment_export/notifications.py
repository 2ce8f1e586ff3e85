"""Failure alerting from the spec's ``alerts``: Airflow's own mechanisms, nothing new.

- ``email``: an :class:`~airflow.providers.smtp.notifications.smtp.SmtpNotifier` through ``smtp_conn_id``.
- ``callback``: a function of yours, given by import path, called with the task's context.

Both become the export task's ``on_failure_callback``. The message names the export, the run and the log; it
never carries profile data (the summary holds counts only).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from segment_export.spec import ExportSpec

SUBJECT = "[segment-export] {{ dag.dag_id }} failed ({{ run_id }})"
BODY = (
    "<p>The export <b>{{ dag.dag_id }}</b> failed in run <code>{{ run_id }}</code>, try {{ ti.try_number }}.</p>"
    "<p>Error: {{ exception }}</p><p>Task log: <a href=\"{{ ti.log_url }}\">{{ ti.log_url }}</a></p>"
)


class AlertConfigError(ValueError):
    """The spec's alerts cannot be set up (for example, the callback does not import): ``field`` says which."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


def import_callable(path: str) -> Callable[..., Any]:
    """``package.module.function`` or ``package.module:function`` -> the function; a clear error otherwise."""
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a configuration error here
        raise AlertConfigError("alerts.callback", f"cannot import module {module_name!r}: {exc}") from exc
    func = getattr(module, attr, None)
    if not callable(func):
        raise AlertConfigError("alerts.callback", f"{module_name!r} has no function {attr!r}")
    return func


def failure_callbacks(spec: ExportSpec) -> list[Any]:
    """The export task's ``on_failure_callback`` list (empty when the spec sets no alerts)."""
    alerts = spec.alerts
    if alerts is None:
        return []
    callbacks: list[Any] = []
    if alerts.email:
        try:
            from airflow.providers.smtp.notifications.smtp import SmtpNotifier
        except ImportError as exc:
            raise AlertConfigError(
                "alerts.email", f"e-mail alerts need the package apache-airflow-providers-smtp ({exc})"
            ) from exc

        callbacks.append(
            SmtpNotifier(to=list(alerts.email), smtp_conn_id=alerts.smtp_conn_id, subject=SUBJECT, html_content=BODY)
        )
    if alerts.callback:
        callbacks.append(import_callable(alerts.callback))
    return callbacks
