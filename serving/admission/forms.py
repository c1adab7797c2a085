"""The shape of an upload's multipart form, checked once its body has arrived and before BentoML reads it.

BentoML 1.4 fetches a URL when a string is sent in a file field and parses a
text field that looks like JSON, to any depth; these checks keep that from
happening: only `file` parts and the route's own plain fields, each file an
uploaded file (a part with a file name), as many as the route takes, file
names short and printable, text fields short, plain and of their kind
(true/false, a finite number, plain text) (400).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from http import HTTPStatus

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from serving.problems import Problem

FILE_FIELD = "file"
MAX_FILENAME_BYTES = 200  # BentoML keeps the name in a temporary file's name: 255 bytes in all on Linux
MAX_TEXT_FIELD_CHARS = 128
MAX_FIELDS = 16
# The kinds of plain form field an upload route may take (serving.http.route_table reads them off the API).
TEXT = "text"
BOOLEAN = "boolean"
NUMBER = "number"
BOOLEAN_VALUES = frozenset({"true", "false", "1", "0", "yes", "no", "on", "off"})


def _bad_request(detail: str) -> Problem:
    return Problem(HTTPStatus.BAD_REQUEST, detail)


def check_filename(name: str | None) -> None:
    if name is None:
        return
    if len(name.encode("utf-8", "surrogatepass")) > MAX_FILENAME_BYTES:
        raise _bad_request(f"the file name is longer than {MAX_FILENAME_BYTES} bytes")
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        raise _bad_request("the file name contains control characters")


def check_text_field(name: str, value: str, kind: str) -> None:
    if len(value) > MAX_TEXT_FIELD_CHARS:
        raise _bad_request(f"`{name}` is longer than {MAX_TEXT_FIELD_CHARS} characters")
    if kind == BOOLEAN and value.strip().lower() not in BOOLEAN_VALUES:
        raise _bad_request(f"`{name}` must be true or false")
    if kind == TEXT and value.lstrip()[:1] in ("[", "{", '"'):  # BentoML would parse JSON, to any depth
        raise _bad_request(f"`{name}` must be plain text, not JSON")
    if kind == NUMBER and not _is_number(value):
        raise _bad_request(f"`{name}` must be a number, e.g. 0.5")


def _is_number(value: str) -> bool:
    """A finite decimal number (not nan, inf, or JSON BentoML would parse)."""
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


async def check_form(headers: Headers, body: bytes, max_files: int, text_fields: Mapping[str, str]) -> None:
    """Parse the multipart `body` and check its shape (see the module docstring); Problem 400 if wrong."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=max_files + 1, max_fields=MAX_FIELDS).parse()
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
                check_text_field(name, value, kind)
        values = form.getlist(FILE_FIELD)
        if not values:
            raise _bad_request(f"no `{FILE_FIELD}` part in the multipart body")
        if any(not isinstance(value, UploadFile) for value in values):
            raise _bad_request(f"`{FILE_FIELD}` must be an uploaded file (a part with a filename), not a string or URL")
        if len(values) > max_files:
            raise _bad_request(f"{len(values)} `{FILE_FIELD}` parts; the route takes at most {max_files}")
        for value in values:
            check_filename(value.filename)
    finally:
        await form.close()
