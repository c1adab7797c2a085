"""The slide store: every slide's state on shared storage, so any replica or worker can answer for it.

One folder per slide id under the store's URL (a local or shared folder, or
any fsspec URL such as ``s3://bucket/slides``)::

    <store>/<id>/slide            an uploaded slide, or
    <store>/<id>/source           the URL of a slide kept elsewhere (cohorts)
    <store>/<id>/progress.json    state, tiles done/total, submission, attempt, heartbeat, reason
    <store>/<id>/analysis.geojson, overlay.png, summary.json   the outputs; summary.json is written last

Every file is replaced whole (a local folder: written aside, then renamed; an
object store: one PUT), so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from slides.analysis import DEFAULT_MIN_TISSUE
from slides.outputs import GEOJSON, OVERLAY, SUMMARY

SLIDE_FILE = "slide"
SOURCE_FILE = "source"
PROGRESS_FILE = "progress.json"
INCOMING = ".incoming"  # uploads still arriving (a local store): not a slide id, so never listed
# The analysis states, named here only: the service, its OpenAPI document and the web page use these.
UPLOADED = "uploaded"  # in the store, never submitted (no progress.json yet)
STATES = ("queued", "running", "done", "failed")
SLIDE_STATES = (UPLOADED, *STATES)
ACTIVE = ("queued", "running")  # someone is, or should be, working on it
SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # uploads get 32 hex digits; cohorts the file's stem


class StoreError(ValueError):
    """A slide id or source the store cannot take."""


@dataclass(frozen=True)
class Progress:
    """One slide's analysis state, as progress.json holds it."""

    state: str  # queued | running | done | failed
    tiles_done: int = 0
    tiles_total: int | None = None
    submission: int = 0  # how many times it was submitted (part of its Dask key)
    attempt: int = 0  # how many runs started (Dask's retries and reruns after a lost worker included)
    heartbeat: float = 0.0  # epoch seconds: last sign that someone is responsible for it
    worker: str | None = None  # host:pid of the run that wrote it
    reason: str | None = None  # why it failed (or why the last attempt did)
    started: float | None = None  # epoch seconds, this attempt's start
    seconds: float | None = None  # the successful attempt's duration
    model: str | None = None
    tile_size: int | None = None  # the analysis' options, kept for a resubmission
    min_tissue: float = DEFAULT_MIN_TISSUE

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Progress:
        data = json.loads(text)
        return cls(**{key: value for key, value in data.items() if key in cls.__dataclass_fields__})

    def beat(self, **changes: object) -> Progress:
        """This progress with `changes` and a fresh heartbeat."""
        return replace(self, heartbeat=time.time(), **changes)

    def stale(self, after_s: float, now: float | None = None) -> bool:
        return (time.time() if now is None else now) - self.heartbeat > after_s


class SlideStore:
    """Slides and their analyses under one folder or URL (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        # No listings cache: another process may add a slide or an output at any time.
        self.fs, self.root = fsspec.core.url_to_fs(url, use_listings_cache=False) if "://" in url else (
            LocalFileSystem(), str(Path(url).absolute()))
        self.local = isinstance(self.fs, LocalFileSystem)

    def __reduce__(self) -> tuple[type, tuple[str]]:  # travels as its URL (to Dask workers, for one)
        return SlideStore, (self.url,)

    def path(self, slide_id: str, name: str = "") -> str:
        if not SLIDE_ID.match(slide_id):
            raise StoreError(f"{slide_id!r} is no slide id: letters, digits, '.', '_' and '-', at most 128")
        return f"{self.root.rstrip('/')}/{slide_id}" + (f"/{name}" if name else "")

    def url_of(self, slide_id: str, name: str) -> str:
        """The full URL of one of a slide's files (what a worker elsewhere opens)."""
        path = self.path(slide_id, name)
        return path if self.local else self.fs.unstrip_protocol(path)

    # The slide itself.

    def add_source(self, slide_id: str, source: str) -> None:
        """Record that `slide_id` is the slide at `source` (a path or URL); the same again is a no-op, another
        source under a taken id is refused."""
        known = self.source(slide_id)
        if known is not None and known != source:
            raise StoreError(f"slide id {slide_id!r} is already {known}, not {source}")
        if known is None:
            self._put(self.path(slide_id, SOURCE_FILE), source.encode())

    def put_slide(self, slide_id: str, local_file: Path) -> None:
        """Copy a local slide file into the store as `slide_id`'s slide."""
        self.fs.makedirs(self.path(slide_id), exist_ok=True)
        self.fs.put_file(str(local_file), self.path(slide_id, SLIDE_FILE))

    def source(self, slide_id: str) -> str | None:
        """Where `slide_id`'s slide is: its upload in the store, or the URL it was added with; None if neither."""
        recorded = self._read(self.path(slide_id, SOURCE_FILE))
        if recorded is not None:
            return recorded.decode()
        return self.url_of(slide_id, SLIDE_FILE) if self.fs.exists(self.path(slide_id, SLIDE_FILE)) else None

    def add_slide(self, slide_id: str, local_file: Path) -> None:
        """Make a local file `slide_id`'s slide, moving it: a rename when it lies on the store's own disk
        (see :meth:`scratch_folder`), else an upload, then the local file is removed."""
        if self.local:
            os.makedirs(self.path(slide_id), exist_ok=True)
            shutil.move(local_file, self.path(slide_id, SLIDE_FILE))
            return
        try:
            self.put_slide(slide_id, local_file)
        finally:
            local_file.unlink(missing_ok=True)

    def scratch_folder(self) -> Path:
        """Where an upload arrives before it becomes a slide: inside a local store (so the slide is renamed
        into place, never copied), else the system temporary folder."""
        folder = Path(self.root) / INCOMING if self.local else Path(tempfile.gettempdir()) / "histo-incoming"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def remove(self, slide_id: str) -> None:
        """Remove a slide, its state and its outputs (the slide file at a recorded source stays)."""
        with suppress(FileNotFoundError):
            self.fs.rm(self.path(slide_id), recursive=True)

    def expire(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Remove the slides none of whose files changed for `ttl_s` seconds (an analysis under way writes its
        progress, so it stays), and uploads abandoned in the scratch folder as long; returns the ids removed."""
        now = time.time() if now is None else now
        gone = []
        for slide_id in self.ids():
            newest = self._newest_change(slide_id)
            if newest is not None and now - newest > ttl_s:
                self.remove(slide_id)
                gone.append(slide_id)
        incoming = Path(self.root) / INCOMING
        for partial in incoming.iterdir() if self.local and incoming.is_dir() else []:
            if now - partial.stat().st_mtime > ttl_s:
                partial.unlink(missing_ok=True)
        return gone

    def _newest_change(self, slide_id: str) -> float | None:
        """Epoch seconds of the slide folder's most recent write, or None when it is empty or gone."""
        try:
            files = self.fs.ls(self.path(slide_id), detail=False)
            return max((self.fs.modified(name).timestamp() for name in files), default=None)
        except FileNotFoundError:  # removed meanwhile (another replica expired it)
            return None

    def ids(self) -> list[str]:
        """Every slide id in the store."""
        if not self.fs.exists(self.root):
            return []
        return sorted(name for entry in self.fs.ls(self.root, detail=False)
                      if SLIDE_ID.match(name := entry.rstrip("/").rsplit("/", 1)[-1]))

    # State and outputs.

    def progress(self, slide_id: str) -> Progress | None:
        """The slide's analysis state; None before any submission."""
        text = self._read(self.path(slide_id, PROGRESS_FILE))
        return None if text is None else Progress.from_json(text.decode())

    def write_progress(self, slide_id: str, progress: Progress) -> None:
        self._put(self.path(slide_id, PROGRESS_FILE), progress.to_json().encode())

    def summary(self, slide_id: str) -> dict | None:
        """The finished analysis' summary (its presence means done), or None."""
        text = self._read(self.path(slide_id, SUMMARY))
        return None if text is None else json.loads(text)

    def put_outputs(self, slide_id: str, folder: Path) -> None:
        """Copy an analysis' outputs from a local folder, the summary last."""
        for name in (GEOJSON, OVERLAY, SUMMARY):
            self._put(self.path(slide_id, name), (folder / name).read_bytes())

    def read_output(self, slide_id: str, name: str) -> bytes | None:
        return self._read(self.path(slide_id, name))

    @contextmanager
    def local_copy(self, source: str) -> Iterator[Path]:
        """A local path to the slide at `source`: the file itself when local, else a scratch copy (OpenSlide
        reads paths, not streams), removed afterwards. A multi-file format (MRXS) needs a local source."""
        if "://" not in source or isinstance(fsspec.core.url_to_fs(source)[0], LocalFileSystem):
            yield Path(source.removeprefix("file://"))
            return
        local = copy_to_scratch(source)
        try:
            yield local
        finally:
            shutil.rmtree(local.parent, ignore_errors=True)

    # Whole-file reads and writes.

    def _read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _put(self, path: str, data: bytes) -> None:
        parent = path.rsplit("/", 1)[0]
        if not self.local:  # one PUT: an object appears whole
            self.fs.pipe_file(path, data)
            return
        os.makedirs(parent, exist_ok=True)
        partial = f"{parent}/.{path.rsplit('/', 1)[1]}.{os.getpid()}.{time.monotonic_ns()}"
        with open(partial, "wb") as handle:
            handle.write(data)
        os.replace(partial, path)


def copy_to_scratch(source: str) -> Path:
    """Copy the remote file at `source` into a new scratch folder of its own; its local path (the caller
    removes the folder). The file keeps its name: some readers go by the suffix."""
    fs, path = fsspec.core.url_to_fs(source)
    scratch = Path(tempfile.mkdtemp(prefix="histo-slide-"))
    local = scratch / (Path(path).name or SLIDE_FILE)
    try:
        fs.get_file(path, str(local))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return local
