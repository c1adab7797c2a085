"""The request deadline: an admitted upload is answered within HISTO_REQUEST_TIMEOUT_MS, or with a 504.

The deadline is also published to the work the request starts
(:data:`REQUEST_DEADLINE`), so a decode or a batch can stop once nobody waits
for it any more.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import ContextVar
from http import HTTPStatus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.problems import problem

# When the request being served must be answered by (time.monotonic()); work can stop after it.
REQUEST_DEADLINE: ContextVar[float | None] = ContextVar("request_deadline", default=None)


async def answer_in_time(app: ASGIApp, scope: Scope, receive: Receive, send: Send, started: float,
                         timeout_s: float) -> None:
    """Run `app`; if it has not started answering `timeout_s` after `started`, cancel it and answer 504
    (problem+json) before BentoML's own timeout could answer in its shape.

    The app runs in the request's own task under `asyncio.timeout` (one timer handle): `asyncio.wait_for`
    would start a second task for every request (Python 3.11)."""
    deadline = started + timeout_s
    answered = False

    async def tracking_send(message: Message) -> None:
        nonlocal answered
        answered = True
        await send(message)

    token = REQUEST_DEADLINE.set(deadline)
    try:
        async with asyncio.timeout_at(asyncio.get_running_loop().time() + deadline - time.monotonic()):
            await app(scope, receive, tracking_send)
    except TimeoutError:
        if answered:  # too late to change the status; the connection ends with the incomplete answer
            raise
        late = problem(HTTPStatus.GATEWAY_TIMEOUT, f"the request was not answered within {timeout_s:g} s; retry later")
        await late(scope, receive, send)
    finally:
        REQUEST_DEADLINE.reset(token)
