"""RFC 9457 problem details: every error the service produces."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import ParamSpec, TypeVar

from starlette.responses import JSONResponse

from models.preprocessing import (
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
)

PROBLEM_MEDIA_TYPE = "application/problem+json"
P = ParamSpec("P")
R = TypeVar("R")

DECODE_ERROR_STATUS: dict[type[ImageDecodeError], HTTPStatus] = {
    EmptyImageError: HTTPStatus.BAD_REQUEST,
    ImageTooLargeError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    UnsupportedImageError: HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    CorruptImageError: HTTPStatus.UNPROCESSABLE_ENTITY,
}


def problem_body(status: HTTPStatus, detail: str, problem_type: str = "about:blank") -> dict[str, object]:
    return {"type": problem_type, "title": status.phrase, "status": int(status), "detail": detail}


def problem(
    status: HTTPStatus, detail: str, problem_type: str = "about:blank", headers: dict[str, str] | None = None
) -> JSONResponse:
    """A problem+json response; never contains a stack trace."""
    body = problem_body(status, detail, problem_type)
    return JSONResponse(body, status_code=int(status), media_type=PROBLEM_MEDIA_TYPE, headers=headers)


class Problem(Exception):  # noqa: N818 - it is the problem itself, as RFC 9457 names it
    """Raised by a route to answer with a problem+json response (see :func:`answers_problems`)."""

    def __init__(self, status: HTTPStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    @classmethod
    def from_decode_error(cls, error: ImageDecodeError, part: str = "file") -> Problem:
        """A decode error with its status (400/413/415/422), naming the part it came from."""
        status = next(s for kind, s in DECODE_ERROR_STATUS.items() if isinstance(error, kind))
        return cls(status, f"{part}: {error}")

    def response(self) -> JSONResponse:
        return problem(self.status, self.detail)


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
