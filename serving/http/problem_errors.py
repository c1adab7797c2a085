"""Every error response leaves as `application/problem+json`: BentoML's and Starlette's too.

BentoML answers its own errors in its own JSON shape, and Starlette in plain
text; :func:`problem_errors` wraps a response's `send` so that such an
answer is rewritten, with a client-safe detail (never the internals of a 5xx).
"""

from __future__ import annotations

import json
from http import HTTPStatus

from starlette.datastructures import Headers
from starlette.types import Message, Send

from serving.problems import PROBLEM_MEDIA_TYPE, problem_body


def problem_errors(send: Send) -> Send:
    """Wrap `send` so that every error response leaves as problem+json."""
    held: Message | None = None
    chunks: list[bytes] = []

    async def wrapped(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start":
            headers = Headers(raw=message.get("headers", []))
            if message["status"] >= 400 and not headers.get("content-type", "").startswith(PROBLEM_MEDIA_TYPE):
                held = message  # rewrite once the whole body is known
                return
            await send(message)
            return
        if held is None or message["type"] != "http.response.body":
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        status = HTTPStatus(held["status"])
        body = json.dumps(problem_body(status, client_safe_detail(status, b"".join(chunks)))).encode()
        kept = [(k, v) for k, v in held.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        headers = [*kept, (b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
        await send({**held, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


def client_safe_detail(status: HTTPStatus, original: bytes) -> str:
    """A client-safe detail for a rewritten error: never internals of a 5xx."""
    if status >= HTTPStatus.INTERNAL_SERVER_ERROR and status != HTTPStatus.SERVICE_UNAVAILABLE:
        return "an unexpected error occurred; it has been logged"
    try:
        parsed = json.loads(original)
    except ValueError:
        return original.decode("utf-8", "replace").strip()[:500] or status.description
    if isinstance(parsed, dict):
        error = str(parsed.get("error") or parsed.get("detail") or status.description)
        fields = parsed.get("detail")
        if isinstance(fields, list):  # pydantic errors as BentoML reports them
            where = "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg', '')}" for e in fields[:5])
            error = f"{error}: {where}" if where else error
        return error[:500]
    return str(parsed)[:500]
