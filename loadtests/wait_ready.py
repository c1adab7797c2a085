"""Wait until a service answers `GET /readyz` with 200, for at most a bounded time.

`make serve & make loadtest` starts both at once: the service needs its model
loaded (and the first `make serve` may train it), so Locust waits for it here
instead of counting connection errors as failures.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

POLL_S = 1.0


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/readyz", timeout=5) as response:  # noqa: S310 (http URL given by the user)
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(url: str, timeout_s: float) -> float | None:
    """Seconds waited until `url` was ready, or None when it was not within `timeout_s`."""
    started = time.monotonic()
    while not is_ready(url):
        if time.monotonic() - started > timeout_s:
            return None
        time.sleep(POLL_S)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the service's base URL, e.g. http://127.0.0.1:3000")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait at most (default 300)")
    args = parser.parse_args()
    print(f"waiting for {args.url}/readyz (at most {args.timeout:.0f} s) ...", file=sys.stderr, flush=True)
    waited = wait_ready(args.url, args.timeout)
    if waited is None:
        sys.exit(f"no ready service at {args.url} after {args.timeout:.0f} s: start one with `make serve` "
                 "(or set LOADTEST_HOST), or wait longer with READY_TIMEOUT=SECONDS")
    print(f"{args.url} is ready (waited {waited:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
