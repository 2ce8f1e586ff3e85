"""HTTP plumbing: one threaded server, one port, both APIs plus the control API.

Paths: Klaviyo under ``/api/...``, Mailchimp under ``/3.0/...``, control under
``/_sandbox/...`` (no auth).  Each API request goes through the same pipeline,
written once here (:meth:`Sandbox.process`):

    authenticate -> API precheck (Klaviyo: revision, media type) -> route (404/405)
    -> connection cap (Mailchimp) -> fixed-window rate limit (Klaviyo)
    -> latency sleep -> handler under the API's lock -> request log

The latency sleep happens while the request holds its connection slot and
outside the store lock, so concurrency limits see slow requests as in flight and
concurrent requests really overlap.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Protocol
from urllib.parse import parse_qs, urlsplit

from .common import ApiError, ApiRequest, ApiResponse, RequestLog, Route, match_route
from .faults import GARBAGE_BODY, Faults
from .config import SandboxConfig
from .klaviyo import KlaviyoService
from .mailchimp import MailchimpService
from .ratelimit import FixedWindowLimiter, InFlightLimiter, window_limits

MAX_BODY_BYTES = 64 * 1024 * 1024


class ApiService(Protocol):
    """What the pipeline needs from an emulated API (Klaviyo and Mailchimp both)."""

    name: str
    prefix: str
    lock: Any

    def routes(self) -> list[Route]: ...
    def authenticate(self, req: ApiRequest) -> Optional[ApiResponse]: ...
    def precheck(self, req: ApiRequest) -> Optional[ApiResponse]: ...
    def account_key(self, req: ApiRequest) -> str: ...
    def connection_limit(self) -> Optional[int]: ...
    def throttled(self, retry_after: Optional[int]) -> ApiResponse: ...
    def not_found_response(self, req: ApiRequest) -> ApiResponse: ...
    def method_not_allowed(self, req: ApiRequest) -> ApiResponse: ...
    def server_error(self, req: ApiRequest) -> ApiResponse: ...
    def tick(self) -> None: ...
    def reset(self) -> None: ...
    def state(self) -> dict[str, Any]: ...


#: returned by the pipeline when a fault drops the connection without an answer
DROP = ApiResponse(599, {})


class Sandbox:
    """The API sandbox.  ``Sandbox(cfg).start()`` serves on a daemon thread.

    Usable as a context manager.  All seeding helpers are also reachable over
    HTTP under ``/_sandbox/`` (see the package docstring).
    """

    def __init__(self, config: Optional[SandboxConfig] = None) -> None:
        self.config = config or SandboxConfig()
        self.faults = Faults()
        self.klaviyo = KlaviyoService(self.config)
        self.mailchimp = MailchimpService(self.config)
        self.services: list[ApiService] = [self.klaviyo, self.mailchimp]
        self._routes = {svc.name: svc.routes() for svc in self.services}
        self.log = RequestLog()
        self.windows = FixedWindowLimiter()
        self.connections = InFlightLimiter()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> "Sandbox":
        if self._server is not None:
            return self
        self._server = _Server((self.config.host, self.config.port), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="segment-export-sandbox", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on the calling thread (CLI).  Returns after :meth:`stop`."""
        if self._server is None:
            self._server = _Server((self.config.host, self.config.port), _Handler, self)
        self._server.serve_forever()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "Sandbox":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("sandbox not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def klaviyo_host(self) -> str:
        return self.url

    @property
    def mailchimp_host(self) -> str:
        return self.url + "/3.0"

    # --- control ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The whole store as JSON-able data (layout in the package docstring)."""
        return {"klaviyo": self.klaviyo.state(), "mailchimp": self.mailchimp.state(), "requests": self.log.snapshot()}

    def reset(self) -> None:
        """Back to the configured accounts and lists; forget every request and window.

        Runtime knobs changed with :meth:`configure` (latency, speed, limits) are kept:
        they describe the simulated service, not what it received.
        """
        for svc in self.services:
            svc.reset()
        self.log.reset()
        self.windows.reset()
        self.faults.set([])

    def reset_requests(self) -> None:
        """Forget what was received (the request log, per-key admissions and refusals, the rate windows' counts);
        what the sandbox holds stays. A test of one key's limits starts from an unused window this way."""
        self.log.reset()
        self.windows.reset()

    def configure(self, **runtime: Any) -> dict[str, Any]:
        """Change runtime knobs (latency, job speed, rate limits) of a running sandbox."""
        self.config.apply_runtime(runtime)
        return self.config.runtime_dict()

    def set_faults(self, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Inject faults (see :mod:`.faults`); an empty list clears them. Returns the rules as set."""
        return self.faults.set(rules)

    def seed_mailchimp_member(
        self, audience_id: str, email: str, status: str, merge_fields: Optional[dict[str, Any]] = None, tags: Optional[list[str]] = None
    ) -> dict[str, Any]:
        return self.mailchimp.seed_member(audience_id, email, status, merge_fields, tags)

    def forget_mailchimp_email(self, audience_id: str, email: str) -> dict[str, Any]:
        return self.mailchimp.forget_email(audience_id, email)

    def add_klaviyo_list(self, list_id: str, name: str, account_id: Optional[str] = None) -> dict[str, Any]:
        return self.klaviyo.add_list(list_id, name, account_id)

    def edit_klaviyo_list(self, list_id: str, email: str, action: str = "add", account_id: Optional[str] = None) -> dict[str, Any]:
        """A Klaviyo list edited by hand: ``action`` ``add`` or ``remove`` one profile (consent untouched)."""
        return self.klaviyo.edit_list(list_id, email, action, account_id)

    def untag_mailchimp_member(self, audience_id: str, email: str, tag: str) -> dict[str, Any]:
        """A tag removed from a Mailchimp member by hand."""
        return self.mailchimp.untag(audience_id, email, tag)

    def suppress_klaviyo_email(self, email: str, account_id: Optional[str] = None) -> dict[str, Any]:
        return self.klaviyo.suppress(email, account_id)

    def confirm_klaviyo_email(self, email: str, account_id: Optional[str] = None) -> dict[str, Any]:
        """A double opt-in confirmation clicked (behaviour ``klaviyo_list_opt_in = double``)."""
        return self.klaviyo.confirm(email, account_id)

    # --- the request pipeline --------------------------------------------------------

    def service_for(self, path: str) -> Optional[ApiService]:
        for svc in self.services:
            if path == svc.prefix or path.startswith(svc.prefix + "/"):
                return svc
        return None

    def process(self, svc: ApiService, req: ApiRequest) -> tuple[str, ApiResponse]:
        """Run one API request through the pipeline; returns (endpoint name, response)."""
        route, path_exists, params = match_route(self._routes[svc.name], req.method, req.path)
        req.path_params = params
        endpoint = route.name if route else f"{req.method} {svc.prefix}/* (unmatched)"
        self.log.enter(svc.name)
        try:
            response = self._process(svc, route, path_exists, req)
        finally:
            self.log.leave(svc.name)
        self.log.record(endpoint, response.status)
        return endpoint, response

    def _process(self, svc: ApiService, route: Optional[Route], path_exists: bool, req: ApiRequest) -> ApiResponse:
        response = svc.authenticate(req) or svc.precheck(req)
        if response is not None:
            return response
        if route is None:
            return svc.method_not_allowed(req) if path_exists else svc.not_found_response(req)
        fault = self.faults.take(route.name)
        if fault is not None and fault.phase == "before":
            if fault.kind == "429":
                return svc.throttled(int(fault.seconds))
            if fault.kind in ("500", "502", "503"):
                response = svc.server_error(req)
                response.status = int(fault.kind)
                return response
            if fault.kind == "drop":
                return DROP
            if fault.kind == "garbage":
                return ApiResponse(200, GARBAGE_BODY, "text/html")
            if fault.kind == "slow":
                time.sleep(fault.seconds)
        response = self._handle(svc, route, req)
        if fault is not None and fault.phase == "after" and fault.kind == "drop":
            return DROP
        if fault is not None and fault.phase == "after" and fault.kind == "garbage":
            return ApiResponse(200, GARBAGE_BODY, "text/html")
        return response

    def _handle(self, svc: ApiService, route: Route, req: ApiRequest) -> ApiResponse:
        limits_on = self.config.rate_limits
        account = svc.account_key(req)
        slot_key = (svc.name, account)
        limit = svc.connection_limit() if limits_on else None
        if limit is not None and not self.connections.try_acquire(slot_key, limit):
            self.log.refuse(svc.name, account, route.name)
            return svc.throttled(None)
        started = None
        try:
            extra_headers: dict[str, str] = {}
            if limits_on and route.rate_limit:
                decision = self.windows.hit((slot_key, route.name), window_limits(route.rate_limit, self.config.rate_limit_scale))
                if not decision.allowed:
                    self.log.refuse(svc.name, account, route.name)
                    return svc.throttled(decision.retry_after)
                extra_headers = {
                    "RateLimit-Limit": str(decision.limit),
                    "RateLimit-Remaining": str(decision.remaining),
                    "RateLimit-Reset": str(decision.reset),
                }
            started = self.log.admit(svc.name, account, route.name)
            delay = self.config.latency_for(route.kind)
            if delay > 0:
                time.sleep(delay)
            with svc.lock:
                svc.tick()
                try:
                    response = route.handler(req)
                except ApiError as exc:
                    response = exc.response
                except Exception:  # a sandbox bug must still answer, and loudly
                    traceback.print_exc(file=sys.stderr)
                    response = svc.server_error(req)
            response.headers = {**extra_headers, **response.headers}
            return response
        finally:
            if started is not None:
                self.log.done(svc.name, account, started)
            if limit is not None:
                self.connections.release(slot_key)

    # --- control API over HTTP -------------------------------------------------------

    def control(self, method: str, path: str, body: bytes) -> ApiResponse:
        parts = [p for p in path.split("/") if p][1:]  # drop "_sandbox"
        try:
            payload = json.loads(body) if body.strip() else {}
        except json.JSONDecodeError as exc:
            return ApiResponse(400, {"error": f"invalid JSON: {exc}"})
        try:
            if method == "GET" and parts == ["state"]:
                return ApiResponse(200, self.state())
            if method == "GET" and parts == ["requests"]:  # the request log alone: cheap with millions held
                return ApiResponse(200, self.log.snapshot())
            if method == "POST" and parts == ["reset"]:
                self.reset()
                return ApiResponse(200, {"reset": True})
            if parts == ["faults"] and method == "GET":
                return ApiResponse(200, {"faults": self.faults.describe()})
            if parts == ["faults"] and method == "PUT":
                return ApiResponse(200, {"faults": self.faults.set(payload if isinstance(payload, list) else payload.get("faults", []))})
            if parts == ["config"] and method == "GET":
                return ApiResponse(200, self.config.runtime_dict())
            if parts == ["config"] and method in ("PUT", "PATCH"):
                return ApiResponse(200, self.configure(**payload))
            if method == "GET" and len(parts) == 3 and parts[:2] == ["mailchimp", "batch-results"]:
                # a Mailchimp batch's response_body_url (on the real service, a pre-signed download: no API key)
                archive = self.mailchimp.batch_archive(parts[2])
                if archive is None:
                    return ApiResponse(404, {"error": f"no finished Mailchimp batch {parts[2]!r}"})
                return ApiResponse(200, archive, "application/x-tar")
            if method == "POST" and len(parts) == 4 and parts[:2] == ["mailchimp", "audiences"]:
                audience_id, action = parts[2], parts[3]
                if action == "members":
                    return ApiResponse(
                        201,
                        self.seed_mailchimp_member(audience_id, payload["email_address"], payload.get("status", "subscribed"), payload.get("merge_fields"), payload.get("tags")),
                    )
                if action == "untag":
                    return ApiResponse(200, self.mailchimp.untag(audience_id, payload["email_address"], payload["tag"]))
                if action == "forgotten":
                    return ApiResponse(201, self.forget_mailchimp_email(audience_id, payload["email_address"]))
            if method == "POST" and parts == ["klaviyo", "lists"]:
                return ApiResponse(201, self.add_klaviyo_list(payload["id"], payload["name"], payload.get("account_id")))
            if method == "POST" and len(parts) == 4 and parts[:2] == ["klaviyo", "lists"] and parts[3] == "members":
                return ApiResponse(200, self.edit_klaviyo_list(parts[2], payload["email"], payload.get("action", "add"), payload.get("account_id")))
            if method == "POST" and parts == ["klaviyo", "suppressed"]:
                return ApiResponse(201, self.suppress_klaviyo_email(payload["email"], payload.get("account_id")))
            if method == "POST" and parts == ["klaviyo", "confirm"]:
                return ApiResponse(200, self.confirm_klaviyo_email(payload["email"], payload.get("account_id")))
        except KeyError as exc:
            return ApiResponse(404 if "unknown" in str(exc) else 400, {"error": f"missing or unknown: {exc}"})
        except (ValueError, TypeError) as exc:
            return ApiResponse(400, {"error": str(exc)})
        return ApiResponse(404, {"error": f"no control endpoint {method} {path}"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away (killed task, timeout) is part of what the sandbox simulates, not a bug.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)
    request_queue_size = 128  # the exporter opens many connections at once

    def __init__(self, address: tuple[str, int], handler: type, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real API clients use
    server_version = "segment-export-sandbox"
    timeout = 120  # Mailchimp's documented request timeout; also reaps idle sockets

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # the request log in state() is the record; stderr stays quiet

    def _read_body(self) -> Optional[bytes]:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            return None
        return self.rfile.read(length) if length else b""

    def _send(self, response: ApiResponse) -> None:
        payload = response.encoded()
        self.send_response(response.status)
        if response.status != 204:
            self.send_header("Content-Type", response.content_type + "; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if response.status != 204 and self.command != "HEAD":
            self.wfile.write(payload)

    def _dispatch(self) -> None:
        sandbox = self.server.sandbox
        body = self._read_body()
        if body is None:
            self.close_connection = True
            self._send(ApiResponse(413, {"error": "request body too large"}))
            return
        split = urlsplit(self.path)
        path = split.path
        if path == "/_sandbox" or path.startswith("/_sandbox/"):
            self._send(sandbox.control(self.command, path, body))
            return
        svc = sandbox.service_for(path)
        if svc is None:
            self._send(ApiResponse(404, {"error": f"no API at {path}; Klaviyo is under /api, Mailchimp under /3.0"}))
            return
        host = self.headers.get("Host") or f"{sandbox.config.host}:{sandbox.port}"
        req = ApiRequest(
            method=self.command,
            path=path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            base_url=f"http://{host}",
        )
        _, response = sandbox.process(svc, req)
        if response is DROP:
            self.close_connection = True  # no status line, no body: the client sees a dropped connection
            return
        self._send(response)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch
