"""The deployment's ``[segment_export]`` settings: an environment variable ``AIRFLOW__SEGMENT_EXPORT__<OPTION>``, else
Airflow's configuration (``airflow.cfg``), else None. Declared, with their defaults, in ``provider.py``."""

from __future__ import annotations

import os

SECTION = "segment_export"


def setting(option: str) -> str | None:
    """The deployment's ``[segment_export] <option>``, or None where it is not set (or no configuration can be read:
    a plain script)."""
    value = os.environ.get(f"AIRFLOW__{SECTION.upper()}__{option.upper()}")
    if value is not None:
        return value
    try:
        from airflow.sdk.configuration import conf

        return conf.get(SECTION, option, fallback=None)
    except Exception:  # noqa: BLE001 - no configuration to read: no deployment setting
        return None
