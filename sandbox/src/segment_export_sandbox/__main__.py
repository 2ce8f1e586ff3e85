"""CLI: ``segment-export-sandbox`` / ``python -m segment_export_sandbox``.

Prints exactly one line ``SANDBOX_URL=http://HOST:PORT`` (flushed) once the
socket is bound, so scripts can start it with ``--port 0`` and read the port,
then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any, Optional, Sequence

from .config import SandboxConfig
from .server import Sandbox


def build_config(args: argparse.Namespace) -> SandboxConfig:
    if args.config:
        with open(args.config, encoding="utf-8") as fh:
            cfg = SandboxConfig.from_dict(json.load(fh))
    else:
        cfg = SandboxConfig()
    if args.host is not None:
        cfg.host = args.host
    if args.port is not None:
        cfg.port = args.port
    runtime: dict[str, Any] = {}
    latency = {}
    if args.latency_klaviyo_job is not None:
        latency["klaviyo_job"] = args.latency_klaviyo_job
    if args.latency_mailchimp_batch is not None:
        latency["mailchimp_batch"] = args.latency_mailchimp_batch
    if latency:
        runtime["latency"] = latency
    if args.klaviyo_profiles_per_second is not None:
        runtime["klaviyo_profiles_per_second"] = args.klaviyo_profiles_per_second
    if args.no_rate_limits:
        runtime["rate_limits"] = False
    cfg.apply_runtime(runtime)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="segment-export-sandbox", description="Local Klaviyo + Mailchimp API sandbox.")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 0: a free port)")
    parser.add_argument("--config", help="JSON file with SandboxConfig fields")
    parser.add_argument("--latency-klaviyo-job", type=float, metavar="S", help="seconds added to each bulk import job POST")
    parser.add_argument("--latency-mailchimp-batch", type=float, metavar="S", help="seconds added to each Mailchimp batch subscribe")
    parser.add_argument("--klaviyo-profiles-per-second", type=float, metavar="N", help="bulk import job processing speed")
    parser.add_argument("--no-rate-limits", action="store_true", help="disable Klaviyo windows and the Mailchimp connection cap")
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"bad configuration: {exc}")

    sandbox = Sandbox(cfg)
    sandbox.start()
    stopped = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"SANDBOX_URL={sandbox.url}", flush=True)
    try:
        while not stopped.wait(0.5):
            pass
    finally:
        sandbox.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
