"""The shape of an upload's multipart form, checked once its body has arrived and before BentoML reads it.

Only the part headers are scanned (python-multipart's callback parser; file
data is skipped, never copied or spooled): BentoML parses the form fully once,
after this, so a second full parse here would be paid on every upload.

BentoML 1.4 fetches a URL when a string is sent in a file field and parses a
text field that looks like JSON, to any depth; these checks keep that from
happening: only `file` parts and the route's own plain fields, each file an
uploaded file (a part with a file name), as many as the route takes, file
names short and printable, text fields short, plain and of their kind
(true/false, a finite number, plain text) (400).
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException

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


@dataclass
class _Part:
    name: str
    filename: str | None  # None: a plain (text) field
    value: bytearray = field(default_factory=bytearray)  # a text field's first bytes; file data is never kept
    truncated: bool = False


class _HeaderScan:
    """python-multipart callbacks that keep each part's name, file name and (short) text value, never file data.

    Refuses what Starlette's parser (which BentoML runs next) refuses, with its messages: a part without
    a name, more files or fields than allowed, malformed multipart."""

    def __init__(self, charset: str, max_files: int) -> None:
        self.charset = charset
        self.max_files = max_files
        self.parts: list[_Part] = []
        self._files = self._fields = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition: bytes | None = None
        self._current: _Part | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self._part_begin, "on_part_data": self._part_data,
                "on_header_field": self._header_field, "on_header_value": self._header_value_part,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_finished}

    def _part_begin(self) -> None:
        self._disposition = None  # a part without the header must not inherit the previous part's

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_part(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise MultiPartException('The Content-Disposition header field "name" must be provided.')
        name = _decode(options[b"name"], self.charset)
        if b"filename" in options:
            self._files += 1
            if self._files > self.max_files:
                raise MultiPartException(f"Too many files. Maximum number of files is {self.max_files}.")
            self._current = _Part(name, _decode(options[b"filename"], self.charset))
        else:
            self._fields += 1
            if self._fields > MAX_FIELDS:
                raise MultiPartException(f"Too many fields. Maximum number of fields is {MAX_FIELDS}.")
            self._current = _Part(name, None)
        self.parts.append(self._current)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part is None or part.filename is not None or part.truncated:
            return  # file data: skipped, the decoder reads it later
        room = _MAX_TEXT_FIELD_BYTES + 1 - len(part.value)  # one byte past the limit shows it is over
        part.value += data[start : min(end, start + room)]
        if len(part.value) > _MAX_TEXT_FIELD_BYTES:  # surely over the character limit: stop keeping it
            part.truncated = True


# A text field longer than this in bytes is longer than MAX_TEXT_FIELD_CHARS in any encoding.
_MAX_TEXT_FIELD_BYTES = 4 * MAX_TEXT_FIELD_CHARS


def _decode(value: bytes, charset: str) -> str:
    """As Starlette decodes names and values: the form's charset, Latin-1 if that fails."""
    try:
        return value.decode(charset)
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _charset(content_type_options: Mapping[bytes, bytes]) -> str:
    try:
        return codecs.lookup(content_type_options.get(b"charset", b"utf-8").decode("latin-1")).name
    except LookupError:
        return "latin-1"


def scan_parts(headers: Headers, body: Iterable[bytes], max_files: int) -> tuple[list[_Part], str]:
    """The parts of a multipart body, given as its chunks (names, file names and text values, file data
    skipped: no copies, no temporary files) and the form's charset; Problem 400 if it is not well-formed
    multipart."""
    _, options = parse_options_header(headers.get("content-type"))
    if b"boundary" not in options:
        raise _bad_request("malformed multipart body: Missing boundary in multipart.")
    scan = _HeaderScan(_charset(options), max_files)
    try:
        parser = MultipartParser(options[b"boundary"], scan.callbacks())  # type: ignore[arg-type]
        for chunk in body:
            parser.write(chunk)
        parser.finalize()
    except MultiPartException as exc:
        raise _bad_request(f"malformed multipart body: {exc}") from None
    except FormParserError:
        raise _bad_request("malformed multipart body: Invalid multipart data.") from None
    return scan.parts, scan.charset


def check_form(headers: Headers, body: Iterable[bytes], max_files: int, text_fields: Mapping[str, str]) -> None:
    """Scan the part headers of a multipart body (its chunks) and check its shape (see the module docstring);
    Problem 400 if wrong."""
    parts, charset = scan_parts(headers, body, max_files + 1)
    names = [part.name for part in parts]
    unexpected = sorted(set(names) - {FILE_FIELD, *text_fields})
    if unexpected:
        allowed = ", ".join(f"`{name}`" for name in [FILE_FIELD, *sorted(text_fields)])
        shown = [name[:40] for name in unexpected[:5]]
        raise _bad_request(f"unexpected field(s) {shown}; this route takes {allowed}")
    for name, kind in text_fields.items():
        values = [part for part in parts if part.name == name]
        if len(values) > 1 or any(part.filename is not None for part in values):
            raise _bad_request(f"`{name}` must be a single text field")
        for part in values:
            if part.truncated:
                raise _bad_request(f"`{name}` is longer than {MAX_TEXT_FIELD_CHARS} characters")
            check_text_field(name, _decode(bytes(part.value), charset), kind)
    files = [part for part in parts if part.name == FILE_FIELD]
    if not files:
        raise _bad_request(f"no `{FILE_FIELD}` part in the multipart body")
    if any(part.filename is None for part in files):
        raise _bad_request(f"`{FILE_FIELD}` must be an uploaded file (a part with a filename), not a string or URL")
    if len(files) > max_files:
        raise _bad_request(f"{len(files)} `{FILE_FIELD}` parts; the route takes at most {max_files}")
    for part in files:
        check_filename(part.filename)
