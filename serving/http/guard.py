"""The request guard: an ASGI middleware in front of the service's routes.

BentoML 1.4 on its own answers 500 to malformed multipart, has no body cap,
fetches a URL when a string is sent in a file field, and answers errors in
its own JSON shape. The guard, for every request:

* answers every error response (its own, BentoML's, Starlette's) as
  `application/problem+json` (:mod:`serving.http.problem_errors`);
* checks the optional API token (`Authorization: Bearer`, constant-time) on
  model routes; probes, metrics, docs and the web page stay open;

and for uploads to the model routes:

* refuses (503 with `Retry-After`, connection closed, body never read) when
  the worker's :class:`~serving.admission.capacity.Admission` says it is
  full: too many admitted requests, too many bodies arriving, or images
  waiting too long for the model;
* reads the body through the one capped, deadlined reader
  (:mod:`serving.admission.body`: 413, 408), a declared `Content-Length`
  over the cap refused before reading;
* checks the multipart form's shape (:mod:`serving.admission.forms`: 415
  for anything but multipart, 400);
* counts the request as in flight only once its body is complete, and answers
  504 itself when the request is not answered in time
  (:mod:`serving.http.deadline`).

Then it replays the buffered body to BentoML, chunk by chunk as it came (never
joined into one copy).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.admission.body import BodyLimits, capped_chunks
from serving.admission.capacity import Admission
from serving.admission.forms import FILE_FIELD, check_form
from serving.http.deadline import answer_in_time
from serving.http.problem_errors import problem_errors
from serving.problems import PROBLEM_MEDIA_TYPE, Problem, problem, problem_body

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


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
    # path -> {optional form field: TEXT, BOOLEAN or NUMBER}
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


class _Overloaded(Exception):  # noqa: N818 - a control-flow signal inside the guard, answered there
    """The worker filled up while a body arrived; its one argument is the refusal's reason."""


class RequestGuard:
    """ASGI middleware enforcing a :class:`GuardPolicy` (see the module docstring)."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy
        self.body_limits = BodyLimits(policy.max_body_bytes, policy.body_timeout_s, policy.body_idle_timeout_s)
        self._token_prefixes = tuple(f"{route}/" for route in policy.token_routes)

    def _needs_token(self, path: str) -> bool:
        return path in self.policy.token_routes or path.startswith(self._token_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = problem_errors(send)
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
        if (reason := admission.refusal()) is not None:
            await overload_response(reason)(scope, receive, send)
            return
        started = time.monotonic()
        admission.open_uploads += 1
        try:
            text_fields = self.policy.text_fields.get(path, {})
            body = await self._checked_body(scope, receive, max_files, text_fields)
        except Problem as refused:
            await refused.response()(scope, receive, send)
            return
        except _Overloaded as overloaded:
            await overload_response(str(overloaded))(scope, receive, send)
            return
        finally:
            admission.open_uploads -= 1
        # Again now that the body is here: requests whose bodies arrived together all passed the first check.
        if (reason := admission.refusal()) is not None:
            await overload_response(reason)(scope, receive, send)
            return
        admission.in_flight += 1
        try:
            await answer_in_time(self.app, scope, _replay(body, receive), send, started,
                                 self.policy.request_timeout_s)
        finally:
            admission.in_flight -= 1

    def _authorized(self, scope: Scope) -> bool:
        if not self.policy.api_token:
            return True
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        expected = self.policy.api_token.encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), expected)

    async def _checked_body(
        self, scope: Scope, receive: Receive, max_files: int, text_fields: Mapping[str, str]
    ) -> list[bytes]:
        headers = Headers(scope=scope)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "multipart/form-data":
            raise Problem(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send multipart/form-data with the image in a "
                          f"`{FILE_FIELD}` field, not {media_type or 'no type'}", close=True)
        cap = self.policy.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            raise Problem(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over the {cap}-byte cap", close=True)
        body = await self._read_body(receive)
        check_form(headers, body, max_files, text_fields)
        return body

    async def _read_body(self, receive: Receive) -> list[bytes]:
        """The whole body (its chunks), counted against the worker's budget of bytes of arriving uploads (503 once
        it is spent while more is to come)."""
        admission = self.policy.admission
        chunks: list[bytes] = []
        try:
            async for chunk, more in capped_chunks(receive, self.body_limits):
                admission.buffered_bytes += len(chunk)
                chunks.append(chunk)
                if more and admission.buffered_bytes > admission.max_buffered_bytes:
                    # The byte budget is spent, so the admission names it (or an earlier limit it hit first).
                    raise _Overloaded(admission.refusal() or "over capacity")
            return chunks
        finally:
            admission.buffered_bytes -= sum(map(len, chunks))


def _is_json(scope: Scope) -> bool:
    media_type = Headers(scope=scope).get("content-type", "").split(";")[0].strip().lower()
    return media_type == "application/json"


def _unauthorized() -> ASGIApp:
    return problem(
        HTTPStatus.UNAUTHORIZED,
        "missing or wrong API token; send `Authorization: Bearer <token>`",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _replay(chunks: list[bytes], receive: Receive) -> Receive:
    """A receive callable that yields the buffered body's chunks, then the client's own messages."""
    left = iter(enumerate(chunks, 1))

    async def replay() -> Message:
        sent = next(left, None)
        if sent is not None:
            index, chunk = sent
            return {"type": "http.request", "body": chunk, "more_body": index < len(chunks)}
        return await receive()

    return replay
