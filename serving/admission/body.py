"""The one capped, deadlined body reader: every upload's body (tiles and slides) arrives through it.

A body may not grow past its cap (413 as soon as it crosses it), arrive more
slowly than its total time allows, or pause longer than its idle limit (408),
so stalled clients cannot hold what fast ones need; a client that goes away
mid-body is a 400. Refusals are raised as :class:`~serving.problems.Problem`
with the connection closed: the rest of such a body is never drained.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus

from starlette.types import Message, Receive

from serving.problems import Problem


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int
    total_s: float  # all of the body within this
    idle_s: float  # no gap between two chunks longer than this
    what: str = "request body"  # named in the refusals


async def capped_chunks(receive: Receive, limits: BodyLimits) -> AsyncIterator[tuple[bytes, bool]]:
    """Yield (chunk, more to come) as the body arrives, within `limits`."""
    deadline = time.monotonic() + limits.total_s
    size = 0
    more = True
    while more:
        message = await _next_message(receive, deadline, limits)
        if message["type"] == "http.disconnect":
            raise Problem(HTTPStatus.BAD_REQUEST, f"the client went away before the {limits.what} was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limits.max_bytes:
            raise Problem(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{limits.what} over the {limits.max_bytes}-byte cap",
                          close=True)
        more = message.get("more_body", False)
        yield chunk, more


async def _next_message(receive: Receive, deadline: float, limits: BodyLimits) -> Message:
    """The next body message, or a 408 past the body's deadline or its idle limit."""
    wait = min(limits.idle_s, deadline - time.monotonic())
    if wait <= 0:
        raise _too_slow(f"the {limits.what} did not arrive within {limits.total_s:g} s")
    try:
        async with asyncio.timeout(wait):  # a timer handle in this task; wait_for would start a task per chunk
            return await receive()
    except TimeoutError:
        if time.monotonic() >= deadline:
            raise _too_slow(f"the {limits.what} did not arrive within {limits.total_s:g} s") from None
        raise _too_slow(f"the {limits.what} stalled for {limits.idle_s:g} s") from None


def _too_slow(detail: str) -> Problem:
    return Problem(HTTPStatus.REQUEST_TIMEOUT, detail, close=True)
