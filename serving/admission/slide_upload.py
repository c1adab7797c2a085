"""A whole slide into the slide store: a streamed upload (`POST /slides`), or a file of the slide root by path.

A slide is never held in memory: the multipart `file` part goes straight to a
scratch file as it arrives, through the one capped, deadlined body reader
(:mod:`serving.admission.body`: 413, 408). Starlette's form parser would spool
it to the system temporary folder first, a second copy of gigabytes on a
pod's small /tmp. The scratch file lies inside a local store, so the slide is
renamed into place; for a remote store (S3) it is uploaded from there. Only a
slide whose overview reads is kept (415 not a slide, 422 over a cap or
damaged); whatever ends an upload early leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Receive

from serving.admission.body import BodyLimits, capped_chunks
from serving.problems import Problem
from slides.reader import SlideError
from slides.store import SlideStore


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    idle_timeout_s: float  # the longest pause between two chunks
    total_timeout_s: float  # the whole upload


def new_slide_id() -> str:
    return secrets.token_hex(16)


async def receive_upload(receive: Receive, content_type: str, store: SlideStore, limits: UploadLimits) -> str:
    """Stream the multipart `file` part into the store as a new slide, once its overview reads; its id."""
    from slides.analysis import check_readable

    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        raise Problem(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send multipart/form-data with the slide in `file`")
    if not options.get(b"boundary"):
        raise Problem(HTTPStatus.BAD_REQUEST, "multipart/form-data without a boundary")
    slide_id = new_slide_id()
    scratch = await asyncio.to_thread(store.scratch_folder)
    partial = scratch / slide_id
    kept = False
    try:
        await _stream_file_part(receive, options[b"boundary"], partial, limits)
        try:
            await asyncio.to_thread(check_readable, partial)
        except SlideError as exc:
            raise Problem.from_error(exc) from None
        await asyncio.to_thread(store.add_slide, slide_id, partial)
        kept = True
    finally:  # also when the request is cancelled (a server timeout, a shutdown)
        if not kept:
            partial.unlink(missing_ok=True)
    return slide_id


async def _stream_file_part(receive: Receive, boundary: bytes, path: Path, limits: UploadLimits) -> None:
    part = _FilePart(path)
    parser = MultipartParser(boundary, part.callbacks())
    body_limits = BodyLimits(limits.max_bytes, limits.total_timeout_s, limits.idle_timeout_s, "slide upload")
    try:
        async for chunk, _ in capped_chunks(receive, body_limits):
            parser.write(chunk)
        parser.finalize()
        part.check_complete()
    except Problem:
        raise
    except Exception as exc:  # malformed multipart, a full disk
        raise Problem(HTTPStatus.BAD_REQUEST, f"the upload did not complete: {type(exc).__name__}") from None
    finally:
        part.close()


def register_path(path: str, root: Path | None, store: SlideStore) -> str:
    """Give a file inside the slide root (`path`, relative to it) an id in the store, once its overview reads.

    No URL, no absolute path, no `..` and no symlink out of the root; the file is recorded by its resolved
    path, and read only while that path still resolves to itself (a link put in its way later is refused).
    """
    from slides.analysis import check_readable

    candidate = inside_root(path, root)
    try:
        check_readable(candidate)
    except SlideError as exc:
        raise Problem.from_error(exc) from None
    slide_id = new_slide_id()
    store.add_source(slide_id, str(candidate))
    return slide_id


def inside_root(path: str, root: Path | None) -> Path:
    if root is None:
        raise Problem(HTTPStatus.BAD_REQUEST, "this service has no slide folder (HISTO_SLIDE_ROOT) to read from")
    resolved_root = root.resolve()
    candidate = (resolved_root / path).resolve()  # symlinks followed: a link out of the root is refused below
    if "://" in path or Path(path).is_absolute() or not candidate.is_relative_to(resolved_root):
        raise Problem(HTTPStatus.BAD_REQUEST, "`path` must name a file inside the slide folder")
    if not candidate.is_file():
        raise Problem(HTTPStatus.NOT_FOUND, "no such slide in the slide folder")
    return candidate


class _FilePart:
    """python-multipart callbacks that write the one `file` part straight to `path`; any other part, a
    second file or a part without a file name is refused (400)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out: BinaryIO | None = None
        self._files = 0
        self._ended = False
        self._header_field = b""
        self._header_value = b""
        self._disposition = b""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._files += 1
        if options.get(b"name") != b"file" or not options.get(b"filename") or self._files > 1:
            raise Problem(HTTPStatus.BAD_REQUEST, "send one `file` part and nothing else")
        self._out = self.path.open("wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._out is not None  # a part's data only follows its headers
        self._out.write(data[start:end])

    def _part_end(self) -> None:
        self.close()

    def _end(self) -> None:
        self._ended = True

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def check_complete(self) -> None:
        if not (self._ended and self._files == 1):
            raise Problem(HTTPStatus.BAD_REQUEST, "send one `file` part and nothing else")
