"""The request guard: an ASGI middleware in front of the service's routes.

BentoML 1.4 on its own answers 500 to malformed multipart, has no body cap,
fetches a URL when a string is sent in a file field, and answers errors in
its own JSON shape. The guard, for every request:

* answers every error response (its own, BentoML's, Starlette's) as
  `application/problem+json`, with a generic detail for 5xx;
* checks the optional API token (`Authorization: Bearer`, constant-time) on
  model routes; probes, metrics, docs and the web page stay open;

and for uploads to the model routes:

* refuses (503 with `Retry-After`, connection closed, body never read) when
  the worker's :class:`~serving.admission.Admission` says it is full: too
  many admitted requests, too many bodies arriving, or images waiting too
  long for the model;
* caps the body: a declared `Content-Length` over the cap is refused before
  reading, a streamed body as soon as it crosses the cap (413);
* bounds how slowly a body may arrive: all of it within `body_timeout_s`, and
  no pause longer than `body_idle_timeout_s` (408, connection closed), so
  stalled clients cannot hold what fast ones need;
* parses the multipart body once and checks its shape: multipart only (415),
  well-formed (400), only `file` parts, each an uploaded file and not a
  string (so BentoML never fetches URLs), as many as the route takes, file
  names short and printable, text fields short, plain and of their kind
  (true/false, a finite number, plain text) (400);
* counts the request as in flight only once its body is complete, and answers
  504 (problem+json) itself when the request is not answered within
  `request_timeout_s`, before BentoML's own timeout could answer in its shape.

Then it replays the buffered body to BentoML.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from http import HTTPStatus

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.admission import Admission
from serving.problems import PROBLEM_MEDIA_TYPE, problem, problem_body

logger = logging.getLogger(__name__)

FILE_FIELD = "file"
RETRY_AFTER_S = 1
MAX_FILENAME_BYTES = 200  # BentoML keeps the name in a temporary file's name: 255 bytes in all on Linux
MAX_TEXT_FIELD_CHARS = 128
TEXT = "text"
BOOLEAN = "boolean"
NUMBER = "number"
BOOLEAN_VALUES = frozenset({"true", "false", "1", "0", "yes", "no", "on", "off"})

# When the request being served must be answered by (time.monotonic()); work can stop after it.
REQUEST_DEADLINE: ContextVar[float | None] = ContextVar("request_deadline", default=None)


class _RejectedError(Exception):
    def __init__(self, response: ASGIApp) -> None:
        self.response = response


def _bad_request(detail: str) -> _RejectedError:
    return _RejectedError(problem(HTTPStatus.BAD_REQUEST, detail))


def _closing(response: JSONResponse) -> JSONResponse:
    """The response, telling the client the connection ends: an unread body is never drained."""
    response.headers["Connection"] = "close"
    return response


@dataclass(frozen=True)
class GuardPolicy:
    upload_routes: Mapping[str, int]  # POST path -> most `file` parts it takes
    token_routes: frozenset[str]  # paths (and everything under them) that need the API token when one is set
    max_body_bytes: int
    admission: Admission
    request_timeout_s: float
    body_timeout_s: float
    body_idle_timeout_s: float
    api_token: str | None = None
    # path -> {optional text field: TEXT, BOOLEAN or NUMBER}
    text_fields: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    json_routes: frozenset[str] = frozenset()  # POST paths whose body is JSON (BentoML APIs without a file)


def overload_response(reason: str, request_id: str | None = None) -> ASGIApp:
    """The 503 problem for an upload a full worker will not take: `Retry-After`, connection closed (its
    body is never read), written straight to the connection because under overload it is sent thousands
    of times a second. `request_id` is for callers outside the request log, which adds it otherwise."""
    body = json.dumps(problem_body(HTTPStatus.SERVICE_UNAVAILABLE, f"{reason}; retry after {RETRY_AFTER_S} s"))
    encoded = body.encode()
    headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(encoded)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
        (b"connection", b"close"),
        *([(b"x-request-id", request_id.encode())] if request_id else []),
    ]

    async def respond(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": HTTPStatus.SERVICE_UNAVAILABLE, "headers": headers})
        await send({"type": "http.response.body", "body": encoded})

    return respond


def overloaded(admission: Admission) -> ASGIApp | None:
    """The 503 for an upload the worker cannot take now, or None."""
    reason = admission.refusal()
    return None if reason is None else overload_response(reason)


class RequestGuard:
    """ASGI middleware enforcing a :class:`GuardPolicy` (see the module docstring)."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    def _needs_token(self, path: str) -> bool:
        return any(path == route or path.startswith(f"{route}/") for route in self.policy.token_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _problem_errors(send)
        path = scope["path"]
        if self._needs_token(path) and not self._authorized(scope):
            await _unauthorized()(scope, receive, send)
            return
        max_files = self.policy.upload_routes.get(path)
        if path in self.policy.json_routes and scope["method"] == "POST" and not _is_json(scope):
            # BentoML would try to parse another body as its inputs (a 500 for a multipart without boundary).
            await problem(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send a JSON body (application/json)")(
                scope, receive, send
            )
            return
        if max_files is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        admission = self.policy.admission
        if (busy := overloaded(admission)) is not None:
            await busy(scope, receive, send)
            return
        started = time.monotonic()
        admission.open_uploads += 1
        try:
            text_fields = self.policy.text_fields.get(path, {})
            body = await self._checked_body(scope, receive, max_files, text_fields)
        except _RejectedError as rejected:
            await rejected.response(scope, receive, send)
            return
        finally:
            admission.open_uploads -= 1
        # Again now that the body is here: requests whose bodies arrived together all passed the first check.
        if (busy := overloaded(admission)) is not None:
            await busy(scope, receive, send)
            return
        admission.in_flight += 1
        try:
            await self._answer_in_time(scope, _replay(body, receive), send, started)
        finally:
            admission.in_flight -= 1

    async def _answer_in_time(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        """Run the app; if it has not started answering by the deadline, cancel it and answer 504."""
        deadline = started + self.policy.request_timeout_s
        answered = False

        async def tracking_send(message: Message) -> None:
            nonlocal answered
            answered = True
            await send(message)

        token = REQUEST_DEADLINE.set(deadline)
        try:
            await asyncio.wait_for(self.app(scope, receive, tracking_send), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if answered:  # too late to change the status; the connection ends with the incomplete answer
                raise
            timeout = problem(
                HTTPStatus.GATEWAY_TIMEOUT,
                f"the request was not answered within {self.policy.request_timeout_s:g} s; retry later",
            )
            await timeout(scope, receive, send)
        finally:
            REQUEST_DEADLINE.reset(token)

    def _authorized(self, scope: Scope) -> bool:
        if not self.policy.api_token:
            return True
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        expected = self.policy.api_token.encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), expected)

    async def _checked_body(
        self, scope: Scope, receive: Receive, max_files: int, text_fields: Mapping[str, str]
    ) -> bytes:
        headers = Headers(scope=scope)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "multipart/form-data":
            raise _RejectedError(
                _closing(
                    problem(
                        HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                        f"send multipart/form-data with the image in a `{FILE_FIELD}` field, "
                        f"not {media_type or 'no type'}",
                    )
                )
            )
        cap = self.policy.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            raise _RejectedError(_too_large(cap))
        body = await _read_body(
            receive, cap, self.policy.body_timeout_s, self.policy.body_idle_timeout_s, self.policy.admission
        )
        await _check_multipart(headers, body, max_files, text_fields)
        return body


def _is_json(scope: Scope) -> bool:
    media_type = Headers(scope=scope).get("content-type", "").split(";")[0].strip().lower()
    return media_type == "application/json"


def _unauthorized() -> JSONResponse:
    return problem(
        HTTPStatus.UNAUTHORIZED,
        "missing or wrong API token; send `Authorization: Bearer <token>`",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _too_large(cap: int) -> JSONResponse:
    return _closing(problem(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over the {cap}-byte cap"))


def _too_slow(detail: str) -> _RejectedError:
    return _RejectedError(_closing(problem(HTTPStatus.REQUEST_TIMEOUT, detail)))


async def _read_body(receive: Receive, cap: int, total_s: float, idle_s: float, admission: Admission) -> bytes:
    """The whole body; _RejectedError 413 as soon as it crosses `cap`, 408 when it arrives too slowly,
    503 when the worker already holds as many bytes of arriving uploads as it may."""
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + total_s
    try:
        while True:
            message = await _next_chunk(receive, deadline, total_s, idle_s)
            if message["type"] == "http.disconnect":
                raise _bad_request("client disconnected before the body was complete")
            chunk = message.get("body", b"")
            size += len(chunk)
            admission.buffered_bytes += len(chunk)
            if size > cap:
                raise _RejectedError(_too_large(cap))
            if admission.buffered_bytes > admission.max_buffered_bytes and message.get("more_body", False):
                # The byte budget is spent, so the admission names it (or an earlier limit it hit first).
                raise _RejectedError(overload_response(admission.refusal() or "over capacity"))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    finally:
        admission.buffered_bytes -= size


async def _next_chunk(receive: Receive, deadline: float, total_s: float, idle_s: float) -> Message:
    """The next body message, or _RejectedError 408 past the body's deadline or its idle limit."""
    wait = min(idle_s, deadline - time.monotonic())
    if wait <= 0:
        raise _too_slow(f"the request body did not arrive within {total_s:g} s")
    try:
        return await asyncio.wait_for(receive(), wait)
    except TimeoutError:
        if time.monotonic() >= deadline:
            raise _too_slow(f"the request body did not arrive within {total_s:g} s") from None
        raise _too_slow(f"the request body stalled for {idle_s:g} s") from None


def _check_filename(name: str | None) -> None:
    if name is None:
        return
    if len(name.encode("utf-8", "surrogatepass")) > MAX_FILENAME_BYTES:
        raise _bad_request(f"the file name is longer than {MAX_FILENAME_BYTES} bytes")
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        raise _bad_request("the file name contains control characters")


def _check_text_field(name: str, value: str, kind: str) -> None:
    if len(value) > MAX_TEXT_FIELD_CHARS:
        raise _bad_request(f"`{name}` is longer than {MAX_TEXT_FIELD_CHARS} characters")
    if kind == BOOLEAN and value.strip().lower() not in BOOLEAN_VALUES:
        raise _bad_request(f"`{name}` must be true or false")
    if kind == NUMBER and not _is_number(value):
        raise _bad_request(f"`{name}` must be a number, e.g. 0.5")
    if kind == TEXT and value.lstrip()[:1] in ("[", "{", '"'):  # BentoML would parse JSON, to any depth
        raise _bad_request(f"`{name}` must be plain text, not JSON")


def _is_number(value: str) -> bool:
    """A finite decimal number (not nan, inf, or JSON BentoML would parse)."""
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


async def _check_multipart(headers: Headers, body: bytes, max_files: int, text_fields: Mapping[str, str]) -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=max_files + 1, max_fields=16).parse()
    except MultiPartException as exc:
        raise _bad_request(f"malformed multipart body: {exc}") from None
    try:
        names = [name for name, _ in form.multi_items()]
        unexpected = sorted(set(names) - {FILE_FIELD, *text_fields})
        if unexpected:
            allowed = ", ".join(f"`{name}`" for name in [FILE_FIELD, *sorted(text_fields)])
            shown = [name[:40] for name in unexpected[:5]]
            raise _bad_request(f"unexpected field(s) {shown}; this route takes {allowed}")
        for name, kind in text_fields.items():
            values = form.getlist(name)
            if len(values) > 1 or any(isinstance(value, UploadFile) for value in values):
                raise _bad_request(f"`{name}` must be a single text field")
            for value in values:
                _check_text_field(name, value, kind)
        values = form.getlist(FILE_FIELD)
        if not values:
            raise _bad_request(f"no `{FILE_FIELD}` part in the multipart body")
        if any(not isinstance(value, UploadFile) for value in values):
            raise _bad_request(f"`{FILE_FIELD}` must be an uploaded file (a part with a filename), not a string or URL")
        if len(values) > max_files:
            raise _bad_request(f"{len(values)} `{FILE_FIELD}` parts; the route takes at most {max_files}")
        for value in values:
            _check_filename(value.filename)
    finally:
        await form.close()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive callable that yields the buffered body once, then the client's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _problem_errors(send: Send) -> Send:
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
        body = json.dumps(problem_body(status, _detail(status, b"".join(chunks)))).encode()
        kept = [(k, v) for k, v in held.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        headers = [*kept, (b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
        await send({**held, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


def _detail(status: HTTPStatus, original: bytes) -> str:
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
