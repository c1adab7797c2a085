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
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message

from serving.problems import Problem

SLIDE_FILE = "slide"  # an uploaded slide, in its folder
SOURCE_FILE = "source"  # or: the path, relative to the slide root, of the slide the folder's outputs are of
PROGRESS_FILE = "progress.json"  # the analysis' state, written as it goes (every worker on the host reads it)
_ID = re.compile(r"^[0-9a-f]{32}$")
COPY_CHUNK = 1024 * 1024


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

    async def receive(self, request: Request, max_bytes: int) -> str:
        """Stream the multipart `file` part of `request` into a new slide folder; returns its id.

        The body is counted as it arrives: over `max_bytes` the upload stops with 413. Whatever
        fails, a partial upload leaves nothing behind.
        """
        self.expire()
        slide_id = secrets.token_hex(16)
        folder = self.folder / slide_id
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await request.receive()
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise Problem(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"slide upload over the {max_bytes}-byte cap")
            return message

        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "multipart/form-data":
            raise Problem(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send multipart/form-data with the slide in `file`")
        try:
            streamed = Request(request.scope, receive=counted)
            async with streamed.form(max_files=1, max_fields=0) as form:
                upload = form.get("file")
                if not isinstance(upload, UploadFile) or set(form) != {"file"}:
                    raise Problem(HTTPStatus.BAD_REQUEST, "send one `file` part and nothing else")
                folder.mkdir(parents=True)
                with (folder / SLIDE_FILE).open("wb") as out:
                    while chunk := await upload.read(COPY_CHUNK):
                        out.write(chunk)
        except Problem:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        except Exception as exc:  # malformed multipart, a client gone mid-body, a full disk
            shutil.rmtree(folder, ignore_errors=True)
            raise Problem(HTTPStatus.BAD_REQUEST, f"the upload did not complete: {type(exc).__name__}") from None
        return slide_id
