"""RFC 9457 problem details: every error the service produces."""

from __future__ import annotations

from http import HTTPStatus

from starlette.responses import JSONResponse

from models.preprocessing import (
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
)

PROBLEM_MEDIA_TYPE = "application/problem+json"

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


def decode_problem(error: ImageDecodeError, part: str = "file") -> JSONResponse:
    """Map a decode error to its status (400/413/415/422)."""
    status = next(s for kind, s in DECODE_ERROR_STATUS.items() if isinstance(error, kind))
    return problem(status, f"{part}: {error}")
