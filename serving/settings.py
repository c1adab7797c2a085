"""Service settings, read from the environment in one place.

Every variable has a documented default (see `.env.example`). A value that
cannot be parsed or is out of range raises :class:`SettingsError` naming the
variable, so a typo stops the service at start instead of misbehaving later.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from models.preprocessing import DEFAULT_MAX_PIXELS, DecodeLimits
from models.store import DEFAULT_MODEL_TAG
from serving.cpus import usable_cpus

LOG_FORMATS = ("text", "json")
T = TypeVar("T")
MEGABYTE = 1024 * 1024
DEFAULT_SLIDE_DIR = Path(tempfile.gettempdir()) / "histopathology-slides"
MODEL_TAG_ARGUMENT = "model_tag"  # `bentoml build --arg model_tag=NAME:VERSION` pins a Bento's model


class SettingsError(ValueError):
    """An environment variable holds an unusable value."""


@dataclass(frozen=True)
class Rule:
    """What a parsed value must satisfy, and how the error message says it."""

    valid: Callable[[Any], bool]
    says: str


def at_least(minimum: int) -> Rule:
    return Rule(lambda value: value >= minimum, f"at least {minimum}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda value: value in choices, f"one of {', '.join(choices)}")


PROBABILITY = Rule(lambda value: 0.0 <= value <= 1.0, "between 0 and 1")
POSITIVE = Rule(lambda value: value > 0.0, "positive")
_TYPE_NAMES = {int: "an integer", float: "a number"}


def _read(
    env: Mapping[str, str], name: str, default: T, parse: Callable[[str], T] = int, rule: Rule | None = None
) -> T:
    """The variable parsed and checked, or `default` when it is unset or empty."""
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not {_TYPE_NAMES.get(parse, 'valid')}") from None
    if rule is not None and not rule.valid(value):
        raise SettingsError(f"{name}={value!r} must be {rule.says}")
    return value


@dataclass(frozen=True)
class Settings:
    model_tag: str
    max_body_bytes: int
    max_pixels: int
    max_decode_bytes: int  # estimated peak memory of one decode (413 above it)
    max_jpeg_scans: int  # scans a (progressive) JPEG may have (413 above it)
    max_scan_pixels: int  # JPEG scans x pixels: the decoding work one upload may cost (413 above it)
    decode_threads: int  # uploads decoded at once per worker: with max_decode_bytes, bounds decode memory
    request_timeout_ms: int  # the guard answers 504 when a request has not been answered by then
    body_timeout_ms: int  # an upload body must arrive within this (408)
    body_idle_timeout_ms: int  # ... and never stall longer than this between two chunks (408)
    header_timeout_ms: int  # a connection must send a request's headers within this, or it is closed
    max_open_uploads: int  # upload bodies being received at once per worker; more get 503
    max_buffered_bytes: int  # bytes of upload bodies still arriving a worker may hold; more get 503
    max_queue_delay_ms: int  # refuse new uploads (503) while the model queue's oldest image waits longer
    abstain_threshold: float | None  # overrides the model card's when set
    ood_gate: bool  # quality gate + out-of-distribution score on every tile (off: for benchmarks only)
    ood_threshold: float | None  # overrides the model card's out-of-distribution threshold when set
    max_batch_size: int
    max_latency_ms: int
    workers: int
    tf_intra_op_threads: int
    tf_inter_op_threads: int
    log_format: str
    max_in_flight: int  # uploads being served at once per worker; more get 503 + Retry-After
    max_files_per_request: int  # `file` parts /predict_batch takes
    slide_dir: Path  # uploaded slides and analyses
    slide_root: Path | None  # a server-side folder of slides requests may name by relative path
    max_slide_bytes: int  # a slide upload over this gets 413
    slide_ttl_s: int  # slides and their analyses are removed after this
    slide_upload_timeout_s: int  # a slide upload may take this long in all (BentoML's timeout is set above it)
    slide_store: str  # folder path or fsspec URL (s3://...) of the shared slide store (slides.store)
    dask_scheduler: str | None  # tcp://host:port of a Dask cluster for slide analyses; None: an embedded one
    dask_workers: int  # workers of the embedded cluster (per service process)
    dask_worker_nice: int  # OS niceness of slide workers (0: normal priority); they yield to /predict
    slide_stale_s: int  # a queued or running slide whose heartbeat is older than this may be resubmitted
    slide_max_attempts: int  # runs of one slide (lost workers and errors included) before it is failed
    slide_reconcile_s: int  # how often the service looks for slides to resubmit
    api_token: str | None = field(repr=False)  # when set, model routes need `Authorization: Bearer <token>`
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (default: none)
    sentry_dsn: str | None = field(default=None, repr=False)  # optional error tracking

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_pixels=self.max_pixels,
            max_decoded_bytes=self.max_decode_bytes,
            max_jpeg_scans=self.max_jpeg_scans,
            max_scan_pixels=self.max_scan_pixels,
        )


def load_settings(env: Mapping[str, str] | None = None, bento_arguments: Mapping[str, str] | None = None) -> Settings:
    """Read the HISTO_* environment variables (defaults in `.env.example`).

    ``bento_arguments`` are the arguments a Bento was built with: the model
    tag pinned by ``make build`` wins over ``HISTO_MODEL_TAG``, because a
    built Bento holds exactly that model and nothing else.
    """
    env = os.environ if env is None else env
    pinned = (bento_arguments or {}).get(MODEL_TAG_ARGUMENT)
    return Settings(
        model_tag=pinned or env.get("HISTO_MODEL_TAG") or DEFAULT_MODEL_TAG,
        max_body_bytes=_read(env, "HISTO_MAX_BODY_BYTES", 20 * 1024 * 1024, rule=at_least(1024)),
        max_pixels=_read(env, "HISTO_MAX_PIXELS", DEFAULT_MAX_PIXELS, rule=at_least(1)),
        max_decode_bytes=_read(env, "HISTO_MAX_DECODE_BYTES", DecodeLimits.max_decoded_bytes, rule=at_least(MEGABYTE)),
        max_jpeg_scans=_read(env, "HISTO_MAX_JPEG_SCANS", DecodeLimits.max_jpeg_scans, rule=at_least(1)),
        max_scan_pixels=_read(env, "HISTO_MAX_SCAN_PIXELS", DecodeLimits.max_scan_pixels, rule=at_least(1)),
        decode_threads=_read(env, "HISTO_DECODE_THREADS", 2, rule=at_least(1)),
        request_timeout_ms=_read(env, "HISTO_REQUEST_TIMEOUT_MS", 20_000, rule=at_least(100)),
        body_timeout_ms=_read(env, "HISTO_BODY_TIMEOUT_MS", 30_000, rule=at_least(100)),
        body_idle_timeout_ms=_read(env, "HISTO_BODY_IDLE_TIMEOUT_MS", 5_000, rule=at_least(100)),
        header_timeout_ms=_read(env, "HISTO_HEADER_TIMEOUT_MS", 10_000, rule=at_least(100)),
        # Many: a stalled upload holds nothing but its bytes (bounded below) until its 408; a few hundred
        # of them must not turn fast clients away.
        max_open_uploads=_read(env, "HISTO_MAX_OPEN_UPLOADS", 1000, rule=at_least(1)),
        max_buffered_bytes=_read(env, "HISTO_MAX_BUFFERED_BYTES", 256 * 1024 * 1024, rule=at_least(MEGABYTE)),
        max_queue_delay_ms=_read(env, "HISTO_MAX_QUEUE_DELAY_MS", 2_000, rule=at_least(1)),
        abstain_threshold=_read(env, "HISTO_ABSTAIN_THRESHOLD", None, float, PROBABILITY),
        ood_gate=_read(env, "HISTO_OOD_GATE", "on", str, one_of("on", "off")) == "on",
        ood_threshold=_read(env, "HISTO_OOD_THRESHOLD", None, float, POSITIVE),
        max_batch_size=_read(env, "HISTO_MAX_BATCH_SIZE", 32, rule=at_least(1)),
        max_latency_ms=_read(env, "HISTO_MAX_LATENCY_MS", 10_000, rule=at_least(1)),
        # Single-threaded workers beat one worker with several threads (BENCHMARKS.md): one worker per
        # CPU this process may use (affinity, capped by a container's CPU quota), one thread of each kind.
        workers=_read(env, "HISTO_WORKERS", usable_cpus(), rule=at_least(1)),
        tf_intra_op_threads=_read(env, "HISTO_TF_INTRA_OP_THREADS", 1, rule=at_least(0)),
        tf_inter_op_threads=_read(env, "HISTO_TF_INTER_OP_THREADS", 1, rule=at_least(0)),
        log_format=_read(env, "HISTO_LOG_FORMAT", LOG_FORMATS[0], str, one_of(*LOG_FORMATS)),
        max_in_flight=_read(env, "HISTO_MAX_IN_FLIGHT", 64, rule=at_least(1)),
        max_files_per_request=_read(env, "HISTO_MAX_FILES_PER_REQUEST", 32, rule=at_least(1)),
        api_token=env.get("HISTO_API_TOKEN") or None,
        cors_origins=tuple(o.strip() for o in env.get("HISTO_CORS_ORIGINS", "").split(",") if o.strip()),
        sentry_dsn=env.get("SENTRY_DSN") or None,
        slide_dir=Path(env.get("HISTO_SLIDE_DIR") or DEFAULT_SLIDE_DIR),
        slide_root=Path(env["HISTO_SLIDE_ROOT"]) if env.get("HISTO_SLIDE_ROOT") else None,
        max_slide_bytes=_read(env, "HISTO_MAX_SLIDE_BYTES", 4 * 1024**3, rule=at_least(MEGABYTE)),
        slide_ttl_s=_read(env, "HISTO_SLIDE_TTL_S", 24 * 3600, rule=at_least(60)),
        slide_upload_timeout_s=_read(env, "HISTO_SLIDE_UPLOAD_TIMEOUT_S", 3600, rule=at_least(10)),
        # HISTO_SLIDE_DIR, the older name, still works when HISTO_SLIDE_STORE is unset.
        slide_store=env.get("HISTO_SLIDE_STORE") or env.get("HISTO_SLIDE_DIR") or str(DEFAULT_SLIDE_DIR),
        dask_scheduler=env.get("HISTO_DASK_SCHEDULER") or None,
        # One per service process: with one service worker per core, one slide worker per core in all.
        dask_workers=_read(env, "HISTO_DASK_WORKERS", 1, rule=at_least(1)),
        dask_worker_nice=_read(env, "HISTO_DASK_WORKER_NICE", 10, rule=Rule(lambda v: 0 <= v <= 19, "0-19")),
        slide_stale_s=_read(env, "HISTO_SLIDE_STALE_S", 120, rule=at_least(1)),
        slide_max_attempts=_read(env, "HISTO_SLIDE_MAX_ATTEMPTS", 3, rule=at_least(1)),
        slide_reconcile_s=_read(env, "HISTO_SLIDE_RECONCILE_S", 30, rule=at_least(1)),
    )
