"""Fixtures for the sandbox tests: a started Sandbox per module, reset before each test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for sandbox_testlib, whatever the import mode

# tests/conftest.py has put this checkout's sandbox on sys.path if it is not installed.
from segment_export_sandbox import Sandbox, SandboxConfig  # noqa: E402


@pytest.fixture(scope="module")
def sandbox_module():
    """One server per test module; rate limits off so functional tests never see 429."""
    with Sandbox(SandboxConfig(rate_limits=False)) as sb:
        yield sb


@pytest.fixture
def sb(sandbox_module):
    sandbox_module.reset()
    sandbox_module.configure(latency={k: 0.0 for k in ("klaviyo_job", "klaviyo_write", "klaviyo_read", "mailchimp_batch", "mailchimp_write", "mailchimp_read")},
                             klaviyo_profiles_per_second=200_000.0, klaviyo_job_queue_seconds=0.0, rate_limits=False)
    return sandbox_module
