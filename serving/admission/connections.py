"""A deadline for a connection's request headers (uvicorn has none).

uvicorn 0.54 times out only idle keep-alive connections, and a byte of a new
request cancels even that; a client that sends half a header block holds its
connection (and a file descriptor) for as long as it likes (3,000 such
connections stayed open in a probe). :func:`bound_header_time` makes each HTTP
protocol close a connection that has not completed a request's headers within
the timeout of its opening, or of its previous response.
"""

from __future__ import annotations

import contextlib
import logging
import resource
from typing import Any

logger = logging.getLogger(__name__)


def _expire(protocol: Any, cycle: Any) -> None:
    """Close the connection if no new request arrived since the timer was armed and none is running."""
    no_new_request = protocol.cycle is cycle
    idle = cycle is None or cycle.response_complete
    if no_new_request and idle and not protocol.transport.is_closing():
        protocol.transport.close()


def _arm(protocol: Any) -> None:
    timeout = type(protocol).histo_header_timeout_s
    protocol.loop.call_later(timeout, _expire, protocol, protocol.cycle)


def _patch(protocol_class: type, timeout_s: float) -> None:
    if getattr(protocol_class, "histo_header_timeout_s", None) is None:
        connection_made = protocol_class.connection_made
        on_response_complete = protocol_class.on_response_complete

        def armed_connection_made(self: Any, transport: Any) -> None:
            connection_made(self, transport)
            _arm(self)

        def armed_on_response_complete(self: Any) -> None:
            on_response_complete(self)
            if not self.transport.is_closing():
                _arm(self)

        protocol_class.connection_made = armed_connection_made
        protocol_class.on_response_complete = armed_on_response_complete
    protocol_class.histo_header_timeout_s = timeout_s


def bound_header_time(timeout_s: float) -> None:
    """Give uvicorn's HTTP protocols (h11, and httptools when installed) a header deadline. Idempotent."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    _patch(H11Protocol, timeout_s)
    with contextlib.suppress(ImportError):  # httptools is optional
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        _patch(HttpToolsProtocol, timeout_s)


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the new soft limit.

    Each connection is a descriptor: at a 1,024 default, a few hundred slow clients plus the
    server's own files stop `accept()`, and every new client waits.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft
