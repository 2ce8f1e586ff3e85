"""The test destination's server: one contact list per list id, in memory, on 127.0.0.1 (port 0)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ContactServer:
    def __init__(self, lists: tuple[str, ...] = ("L1",)) -> None:
        self.lists: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in lists}
        self.batches = 0  # upsert requests received
        self.received = 0  # contacts received in them
        self.delay = 0.0  # seconds each batch takes (a run can then be killed while it sends)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def __enter__(self) -> ContactServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def held(self, list_id: str = "L1") -> dict[str, dict[str, Any]]:
        with self.lock:
            return {k: dict(v) for k, v in self.lists[list_id].items()}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _list(self) -> tuple[str, str]:
                parts = self.path.strip("/").split("/")
                return parts[1] if len(parts) > 1 else "", "/".join(parts[2:])

            def do_GET(self) -> None:
                list_id, rest = self._list()
                if list_id not in server.lists:
                    return self._answer(404, {"error": "no such list"})
                if rest == "contacts":
                    return self._answer(200, {"contacts": server.held(list_id)})
                return self._answer(200, {"id": list_id})

            def do_POST(self) -> None:
                list_id, rest = self._list()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if list_id not in server.lists:
                    return self._answer(404, {"error": "no such list"})
                if rest == "contacts:batch":
                    time.sleep(server.delay)
                    return self._answer(200, {"results": self._upsert(server.lists[list_id], body["contacts"])})
                if rest == "contacts:remove":
                    with server.lock:
                        gone = [e for e in body["emails"] if server.lists[list_id].pop(e, None) is not None]
                    return self._answer(200, {"removed": gone})
                return self._answer(404, {"error": "no such endpoint"})

            def _upsert(self, contacts: dict[str, dict[str, Any]], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
                results = []
                with server.lock:
                    server.batches += 1
                    server.received += len(items)
                    for item in items:
                        email = item["email"].lower()
                        if email.endswith("@reject.test"):
                            results.append({"email": item["email"], "status": "rejected", "reason": "domain refused"})
                            continue
                        status = "updated" if email in contacts else "created"
                        contacts[email] = item
                        results.append({"email": item["email"], "status": status})
                return results

        return Handler
