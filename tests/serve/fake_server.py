"""A stand-in HTTP server in a thread (loopback, a free port) whose routes the test writes: it plays vLLM from a
recorded answer, or a teacher server gone wrong (short, malformed answers)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Route = Callable[[Any], tuple[int, bytes]]  # the request's JSON body (None for GET) -> status, answer


@contextlib.contextmanager
def serving(routes: dict[str, Route]) -> Iterator[str]:
    """Serve ``routes`` (``"GET /v1/models"``, ``"POST /v1/completions"``, ...) until the block ends; yields the
    URL. The requests' bodies are kept in ``routes["seen"]`` when that key is a list."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            if isinstance(routes.get("seen"), list):
                routes["seen"].append((f"{method} {self.path}", body))
            route = routes.get(f"{method} {self.path}")
            status, answer = route(body) if route else (404, b'{"detail": "Not Found"}')
            self.send_response(status)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def as_json(value: Any, status: int = 200) -> Route:
    return lambda body: (status, json.dumps(value).encode())
