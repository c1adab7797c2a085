"""RFC 9457 problem details: every error the service produces."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import ParamSpec, TypeVar

from starlette.responses import JSONResponse

from models.preprocessing import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from slides.reader import NotASlideError, SlideError

PROBLEM_MEDIA_TYPE = "application/problem+json"
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Refusal:
    """What a refusal status means: its metric label and its line in /docs.json."""

    reason: str | None  # the `reason` label of histopathology_rejected_total; None: not counted as a refusal
    meaning: str


# THE table of what the service refuses with: the handlers, the metrics and /docs.json all read it.
REFUSALS: dict[HTTPStatus, Refusal] = {
    HTTPStatus.BAD_REQUEST: Refusal(
        "bad_request", "request shape: missing, extra or wrong fields, an empty file, malformed multipart"),
    HTTPStatus.UNAUTHORIZED: Refusal("unauthorized", "missing or wrong API token (only when one is set)"),
    HTTPStatus.REQUEST_TIMEOUT: Refusal("slow_upload", "the body did not arrive in time"),
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: Refusal(
        "too_large", "body over its cap; image over the pixel, decode-memory or JPEG scan budgets"),
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: Refusal(
        "format", "not multipart, or not an image of an allowed format (JPEG, PNG, WebP, TIFF)"),
    HTTPStatus.UNPROCESSABLE_ENTITY: Refusal("corrupt", "truncated or corrupt image"),
    HTTPStatus.INTERNAL_SERVER_ERROR: Refusal(None, "an unexpected server error (never a stack trace)"),
    HTTPStatus.SERVICE_UNAVAILABLE: Refusal("overload", "the worker is full; retry after `Retry-After` seconds"),
    HTTPStatus.GATEWAY_TIMEOUT: Refusal("timeout", "not answered before the request deadline"),
}

# Errors of the layers below and the problem each answers with (the first matching type wins).
ERROR_PROBLEMS: tuple[tuple[type[Exception], HTTPStatus, str], ...] = (
    (EmptyImageError, HTTPStatus.BAD_REQUEST, "{part}: {error}"),
    (ImageTooLargeError, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "{part}: {error}"),
    (UnsupportedImageError, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "{part}: {error}"),
    (CorruptImageError, HTTPStatus.UNPROCESSABLE_ENTITY, "{part}: {error}"),
    (NotASlideError, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "not a slide: {error}"),
    (SlideError, HTTPStatus.UNPROCESSABLE_ENTITY, "the slide cannot be analysed: {error}"),
)


def problem_body(status: HTTPStatus, detail: str, problem_type: str = "about:blank") -> dict[str, object]:
    return {"type": problem_type, "title": status.phrase, "status": int(status), "detail": detail}


def problem(
    status: HTTPStatus, detail: str, problem_type: str = "about:blank", headers: dict[str, str] | None = None
) -> JSONResponse:
    """A problem+json response; never contains a stack trace."""
    body = problem_body(status, detail, problem_type)
    return JSONResponse(body, status_code=int(status), media_type=PROBLEM_MEDIA_TYPE, headers=headers)


class Problem(Exception):  # noqa: N818 - it is the problem itself, as RFC 9457 names it
    """Every refusal the service makes, raised where it is found and answered as problem+json (see
    :func:`answers_problems`; the request guard answers its own). `close` ends the connection after the
    answer: for a refusal whose body was never read (or only partly), which must not be drained."""

    def __init__(self, status: HTTPStatus, detail: str, headers: dict[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = {**(headers or {}), **({"Connection": "close"} if close else {})}

    @classmethod
    def from_error(cls, error: Exception, part: str = "file") -> Problem:
        """The problem a decode or slide error answers with (:data:`ERROR_PROBLEMS`); a decode error's
        detail names the part it came from."""
        for kind, status, detail in ERROR_PROBLEMS:
            if isinstance(error, kind):
                return cls(status, detail.format(part=part, error=error))
        raise TypeError(f"no problem for {type(error).__name__}") from error

    def response(self) -> JSONResponse:
        return problem(self.status, self.detail, headers=self.headers or None)


def answers_problems(route: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | JSONResponse]]:
    """The one place a raised :class:`Problem` becomes its response (BentoML passes responses through;
    an exception would become its own JSON 500 instead)."""

    @functools.wraps(route)
    async def answering(*args: P.args, **kwargs: P.kwargs) -> R | JSONResponse:
        try:
            return await route(*args, **kwargs)
        except Problem as raised:
            return raised.response()

    return answering
