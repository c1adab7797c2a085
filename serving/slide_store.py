"""Where uploaded slides and their analyses live: one folder per slide id, expired after a while.

A slide is never held in memory and never becomes a BentoML task's input (the
task store keeps inputs whole in SQLite): `POST /slides` streams the upload
to disk under its own body cap and answers an id; `analyze_slide` takes the
id (or a path relative to a server-side slide folder) and writes its outputs
beside the slide.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from serving.admission.body import BodyLimits, capped_chunks
from serving.problems import Problem

SLIDE_FILE = "slide"  # an uploaded slide, in its folder
SOURCE_FILE = "source"  # or: the path, relative to the slide root, of the slide the folder's outputs are of
PROGRESS_FILE = "progress.json"  # the analysis' state, written as it goes (every worker on the host reads it)
_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class SlideStore:
    folder: Path  # one sub-folder per slide id
    ttl_s: float  # slides and their outputs older than this are removed
    root: Path | None = None  # a server-side folder of slides that requests may name by relative path

    def folder_of(self, slide_id: str) -> Path:
        """The folder of an uploaded slide, or of the outputs for a slide named by path."""
        if not _ID.match(slide_id):
            raise Problem(HTTPStatus.BAD_REQUEST, "slide_id is 32 hexadecimal characters, as POST /slides answers")
        folder = self.folder / slide_id
        if not ((folder / SLIDE_FILE).is_file() or (folder / SOURCE_FILE).is_file()):
            raise Problem(HTTPStatus.NOT_FOUND, f"no slide {slide_id} (expired, or never uploaded)")
        return folder

    def slide_of(self, slide_id: str) -> Path:
        """The slide file an id stands for: its upload, or the root's file it was given by path."""
        folder = self.folder_of(slide_id)
        if (folder / SLIDE_FILE).is_file():
            return folder / SLIDE_FILE
        return self._inside_root((folder / SOURCE_FILE).read_text())  # checked again: the root may have changed

    def resolve(self, slide_id: str | None, path: str | None) -> tuple[Path, Path]:
        """(slide file, output folder) for an uploaded slide's id or a path inside the slide root; a path
        gets an id of its own (the output folder's name), for its outputs, tiles and progress."""
        if (slide_id is None) == (path is None):
            raise Problem(HTTPStatus.BAD_REQUEST, "give exactly one of `slide_id` and `path`")
        if slide_id is not None:
            folder = self.folder_of(slide_id)
            return folder / SLIDE_FILE, folder
        candidate = self._inside_root(path)
        outputs = self.folder / secrets.token_hex(16)
        outputs.mkdir(parents=True)
        (outputs / SOURCE_FILE).write_text(path)
        return candidate, outputs

    def _inside_root(self, path: str) -> Path:
        if self.root is None:
            raise Problem(HTTPStatus.BAD_REQUEST, "this service has no slide folder (HISTO_SLIDE_ROOT) to read from")
        root = self.root.resolve()
        candidate = (root / path).resolve()  # symlinks followed: a link out of the root is refused below
        if "://" in path or Path(path).is_absolute() or not candidate.is_relative_to(root):
            raise Problem(HTTPStatus.BAD_REQUEST, "`path` must name a file inside the slide folder")
        if not candidate.is_file():
            raise Problem(HTTPStatus.NOT_FOUND, "no such slide in the slide folder")
        return candidate

    @staticmethod
    def write_progress(folder: Path, state: str, done: int = 0, total: int | None = None, **facts: object) -> None:
        """Record the analysis' state in its folder (replaced whole, so a reader never sees half of it)."""
        partial = folder / f".{PROGRESS_FILE}.{os.getpid()}"
        partial.write_text(json.dumps({"state": state, "tiles_done": done, "tiles_total": total, **facts}))
        partial.replace(folder / PROGRESS_FILE)

    def progress(self, slide_id: str) -> dict[str, object]:
        """The analysis' state: `uploaded` (none submitted), `queued`, `running`, `done` or `failed`."""
        file = self.folder_of(slide_id) / PROGRESS_FILE
        if not file.is_file():
            return {"state": "uploaded", "tiles_done": 0, "tiles_total": None}
        return json.loads(file.read_text())

    def expire(self, now: float | None = None) -> int:
        """Remove slide folders older than the TTL; returns how many went."""
        now = time.time() if now is None else now
        gone = 0
        for folder in self.folder.glob("*") if self.folder.is_dir() else []:
            if folder.is_dir() and now - folder.stat().st_mtime > self.ttl_s:
                shutil.rmtree(folder, ignore_errors=True)
                gone += 1
        return gone

    async def receive(self, request: Request, max_bytes: int, idle_timeout_s: float, total_timeout_s: float) -> str:
        """Stream the multipart `file` part of `request` into a new slide folder; returns its id.

        The part goes straight to the slide's file as it arrives: Starlette's form parser would spool it
        to the system temporary folder first (a second copy of gigabytes, on a pod's small /tmp). The
        body is counted as it arrives: over `max_bytes` the upload stops with 413; a gap of more than
        `idle_timeout_s` between two chunks, or more than `total_timeout_s` in all, stops it with 408.
        Whatever ends it early (an error, a refusal, a cancelled request), a partial upload leaves
        nothing behind.
        """
        media_type, options = parse_options_header(request.headers.get("content-type", ""))
        if media_type != b"multipart/form-data":
            raise Problem(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send multipart/form-data with the slide in `file`")
        if not options.get(b"boundary"):
            raise Problem(HTTPStatus.BAD_REQUEST, "multipart/form-data without a boundary")
        self.expire()
        slide_id = secrets.token_hex(16)
        folder = self.folder / slide_id
        folder.mkdir(parents=True)
        part = _FilePart(folder / SLIDE_FILE)
        parser = MultipartParser(options[b"boundary"], part.callbacks())
        limits = BodyLimits(max_bytes, total_timeout_s, idle_timeout_s, "slide upload")
        complete = False
        try:
            async for chunk, _ in capped_chunks(request.receive, limits):
                parser.write(chunk)
            parser.finalize()
            part.check_complete()
            complete = True
        except Problem:
            raise
        except Exception as exc:  # malformed multipart, a full disk
            raise Problem(HTTPStatus.BAD_REQUEST, f"the upload did not complete: {type(exc).__name__}") from None
        finally:  # also when the request is cancelled (a server timeout, a shutdown)
            part.close()
            if not complete:
                shutil.rmtree(folder, ignore_errors=True)
        return slide_id


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
