"""A replica's own ``/metrics`` listener, so Prometheus scrapes every replica, not a random one.

Behind Ray Serve's proxy ``GET /metrics`` reaches whichever replica the router picks, so a scrape
through the proxy sees one replica's counters at a time. Each replica therefore also serves its
registry on a port of its own, ``base + rank`` (Ray Serve numbers a deployment's replicas on a
node 0..n-1 and a replacement takes over the rank of the replica it replaces), which a static
Prometheus config can list, and which is the base port itself when each node (a Kubernetes pod)
runs one replica; the ``instance`` label then tells replicas apart and the dashboard
sums over it. A port that is taken (the replaced replica's process still exiting) is retried a
few times, then given up with a warning: serving matters more than one replica's metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from octomil.server.metrics import CONTENT_TYPE

logger = logging.getLogger("octomil.server")

BIND_ATTEMPTS = 20
BIND_RETRY_S = 0.5


def serve_metrics(
    render: Callable[[], bytes | None], host: str, port: int
) -> ThreadingHTTPServer | None:
    """Serve ``render()`` at ``GET /metrics`` on a daemon thread (503 while it returns None);
    ``shutdown()`` the returned server to stop. None when the port stays taken."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = render() if self.path.split("?")[0] == "/metrics" else b""
            if self.path.split("?")[0] != "/metrics":
                self.send_response(404)
            elif body is None:
                body = b"the model is still loading\n"
                self.send_response(503)
            else:
                self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # a scrape every few seconds is not worth a log line

    for attempt in range(BIND_ATTEMPTS):
        try:
            server = ThreadingHTTPServer((host, port), Handler)
            break
        except OSError as exc:
            if attempt == BIND_ATTEMPTS - 1:
                logger.warning("replica metrics: cannot listen on %s:%d: %s", host, port, exc)
                return None
            time.sleep(BIND_RETRY_S)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="octomil-metrics", daemon=True).start()
    return server
