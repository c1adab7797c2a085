"""`make loadtest` waits for /readyz: a server that becomes ready late is waited for, a missing one is not."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loadtests.wait_ready import wait_ready


def test_waits_until_readyz_answers_200_and_gives_up_after_the_timeout():
    ready_at = time.monotonic() + 1.5

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ready = self.path == "/readyz" and time.monotonic() >= ready_at
            self.send_response(200 if ready else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert wait_ready(url, timeout_s=0.2) is None  # still 503
        waited = wait_ready(url, timeout_s=30)
        assert waited is not None and time.monotonic() >= ready_at
    finally:
        server.shutdown()
    assert wait_ready(url, timeout_s=0.5) is None  # nothing listens any more
