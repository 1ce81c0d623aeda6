"""Health check adaptor (client-go ``HealthzAdaptor``) and a tiny HTTP server.

A liveness probe on ``/healthz`` restarts a replica whose elector is wedged or
that believes it leads without having renewed, instead of letting it sit there.
"""

from __future__ import annotations

import hmac
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from .config import HealthCheck
from .redact import redact, redact_text


class HealthzAdaptor:
    """Associates a health check with an elector created later (pass it as
    ``LeaderElectionConfig.watchdog``)."""

    name = "leaderElection"

    def __init__(self, timeout: float = 20.0) -> None:
        # Tolerance past the lease (client-go ``maxTolerableExpiredLease``).
        self.timeout = timeout
        self._elector: HealthCheck | None = None
        self._guard = threading.Lock()

    @classmethod
    def for_lease(cls, lease_duration: float) -> HealthzAdaptor:
        """The worker's check: unhealthy once a leader has gone two lease
        durations without renewing (the lease, plus one lease of tolerance), or
        once the election loop has stalled a lease past its own bound.

        A leader stops acting at its renew deadline whatever happens, so this
        only catches a wedged process; the tolerance keeps a slow Redis from
        getting a healthy replica restarted.
        """
        return cls(timeout=lease_duration)

    def set_leader_election(self, elector: HealthCheck) -> None:
        with self._guard:
            self._elector = elector

    def check(self) -> None:
        """Raise HealthCheckError when unhealthy; healthy before an elector is set."""
        with self._guard:
            elector = self._elector
        if elector is not None:
            elector.check(self.timeout)


@dataclass(frozen=True)
class Body:
    """A route's reply sent as is (HTML, the Prometheus text format), not as JSON."""

    content_type: str
    data: bytes


Route = Callable[[], tuple[int, Any]]
PageRoute = Callable[[str], tuple[int, Any]]
"""A route whose HTML links to the others: called with the ``?token=`` the page
was opened with ('' if none), so its links keep it (a browser sends no header)."""

UNAUTHORIZED = ("unauthorized: send Authorization: Bearer <token> (the token is "
                "leader_healthz_token), or open the page as /?token=<token>\n")


def query_token(query: str) -> str:
    return (parse_qs(query).get("token") or [""])[0]


def authorized(token: str | None, header: str | None, query: str) -> bool:
    """With a token set: ``Authorization: Bearer <token>``, or ``?token=<token>``
    (a browser cannot send the header when it opens the status page)."""
    if token is None:
        return True
    given = ""
    if header and header.lower().startswith("bearer "):
        given = header[7:].strip()
    elif query:
        given = query_token(query)
    return hmac.compare_digest(given.encode(), token.encode())


class HealthzServer:
    """Serves ``GET /healthz`` (plus extra routes, JSON unless they return a
    :class:`Body`, and ``pages``) from a daemon thread.  With ``token``, every
    route but ``/healthz`` (a probe carries no credentials) needs it."""

    def __init__(self, adaptor: HealthzAdaptor, port: int, host: str = "127.0.0.1",
                 routes: dict[str, Route] | None = None, token: str | None = None,
                 pages: dict[str, PageRoute] | None = None) -> None:
        extra = dict(routes or {})
        linking = dict(pages or {})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                if path != "/healthz" and not authorized(
                        token, self.headers.get("Authorization"), query):
                    self._send(401, UNAUTHORIZED, "text/plain", {"WWW-Authenticate": "Bearer"})
                elif path == "/healthz":
                    try:
                        adaptor.check()
                    except Exception as exc:
                        self._send(500, f"[-]{adaptor.name} failed: {redact_text(str(exc))}\n",
                                   "text/plain")
                    else:
                        self._send(200, "ok\n", "text/plain")
                elif path in extra or path in linking:
                    try:
                        if path in linking:
                            # The token it was opened with, only when it is the right one.
                            given = query_token(query) if token is not None else ""
                            if token is None or not hmac.compare_digest(given.encode(),
                                                                        token.encode()):
                                given = ""
                            status, body = linking[path](given)
                        else:
                            status, body = extra[path]()
                    except Exception as exc:  # a read failed (Redis down): say so
                        status, body = 500, Body("text/plain; charset=utf-8",
                                                 f"error: {type(exc).__name__}\n".encode())
                    if isinstance(body, Body):
                        self._send(status, body.data, body.content_type)
                    else:
                        # Every route's JSON is served with its passwords masked.
                        self._send(status, json.dumps(redact(body), sort_keys=True) + "\n",
                                   "application/json")
                else:
                    self._send(404, "not found\n", "text/plain")

            def _send(self, status: int, body: str | bytes, content_type: str,
                      headers: dict[str, str] | None = None) -> None:
                data = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would flood the worker log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="celery-leader-healthz", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_healthz(adaptor: HealthzAdaptor, port: int, host: str = "127.0.0.1",
                  routes: dict[str, Route] | None = None,
                  token: str | None = None,
                  pages: dict[str, PageRoute] | None = None) -> HealthzServer:
    """Start serving ``/healthz``; port 0 picks a free one (see ``.port``)."""
    return HealthzServer(adaptor, port, host, routes, token, pages)
