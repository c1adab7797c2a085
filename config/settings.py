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

from config.cpus import usable_cpus
from models.preprocessing import DEFAULT_MAX_PIXELS, DecodeLimits
from models.store import DEFAULT_MODEL_TAG

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
POSITIVE = Rule(lambda value: value > 0.0, "above 0")
_TYPE_NAMES = {int: "an integer", float: "a number"}


def _read(
    env: Mapping[str, str], name: str, default: T, parse: Callable[[str], T] = int, rule: Rule | None = None
) -> T:
    """The variable parsed and checked, or `default` when it is unset or empty."""
    raw = env.get(name, "")
    if raw == "":
        return default
    wanted = ", ".join(part for part in (_TYPE_NAMES.get(parse), rule and rule.says) if part)
    try:
        value = parse(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not {_TYPE_NAMES.get(parse, 'valid')}: it must be {wanted}") from None
    if rule is not None and not rule.valid(value):
        raise SettingsError(f"{name}={raw!r} must be {wanted}")
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
    slide_root: Path | None  # a server-side folder of slides `POST /slides` may name by relative path
    max_slide_bytes: int  # a slide upload over this gets 413
    slide_ttl_s: int  # slides and their analyses are removed after this
    slide_upload_timeout_s: int  # a slide upload may take this long in all (BentoML's timeout is set above it)
    slide_store: str  # folder path or fsspec URL (s3://...) of the shared slide store (slides.store)
    dask_scheduler: str | None  # tcp://host:port of a Dask cluster for slide analyses; None: an embedded one
    dask_workers: int  # workers of the embedded cluster (per service process)
    dask_worker_nice: int  # OS niceness of slide workers (0: normal; 19: also the idle class); they yield to /predict
    slide_busy_duty: float  # share of the time a niced slide worker computes while the service keeps the host busy
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
        slide_root=Path(env["HISTO_SLIDE_ROOT"]) if env.get("HISTO_SLIDE_ROOT") else None,
        max_slide_bytes=_read(env, "HISTO_MAX_SLIDE_BYTES", 4 * 1024**3, rule=at_least(MEGABYTE)),
        slide_ttl_s=_read(env, "HISTO_SLIDE_TTL_S", 24 * 3600, rule=at_least(60)),
        slide_upload_timeout_s=_read(env, "HISTO_SLIDE_UPLOAD_TIMEOUT_S", 3600, rule=at_least(10)),
        # HISTO_SLIDE_DIR, the older name, still works when HISTO_SLIDE_STORE is unset.
        slide_store=env.get("HISTO_SLIDE_STORE") or env.get("HISTO_SLIDE_DIR") or str(DEFAULT_SLIDE_DIR),
        dask_scheduler=env.get("HISTO_DASK_SCHEDULER") or None,
        # One per service process: with one service worker per core, one slide worker per core in all.
        dask_workers=_read(env, "HISTO_DASK_WORKERS", 1, rule=at_least(1)),
        dask_worker_nice=_read(env, "HISTO_DASK_WORKER_NICE", 19, rule=Rule(lambda v: 0 <= v <= 19, "0-19")),
        slide_busy_duty=_read(env, "HISTO_SLIDE_BUSY_DUTY", 0.2, float,
                              Rule(lambda v: 0 < v <= 1, "above 0, at most 1")),
        slide_stale_s=_read(env, "HISTO_SLIDE_STALE_S", 120, rule=at_least(1)),
        slide_max_attempts=_read(env, "HISTO_SLIDE_MAX_ATTEMPTS", 3, rule=at_least(1)),
        slide_reconcile_s=_read(env, "HISTO_SLIDE_RECONCILE_S", 30, rule=at_least(1)),
    )


def load_settings_or_exit(bento_arguments: Mapping[str, str] | None = None) -> Settings:
    """:func:`load_settings` for the service's start: a bad value ends it with one line, not a traceback."""
    try:
        return load_settings(bento_arguments=bento_arguments)
    except SettingsError as exc:
        raise SystemExit(f"histopathology service cannot start: {exc}") from None


@dataclass(frozen=True)
class Variable:
    """One row of the README's settings table: the variables, their default as shown, what they do.

    ``default`` is the text shown; when empty, it is read from ``load_settings({})`` (field ``field``),
    so the table cannot disagree with the code.
    """

    names: tuple[str, ...]
    what: str
    fields: tuple[str, ...] = ()
    default: str = ""


# Documentation of every variable load_settings reads (a test checks the list is complete and the
# README's table is this one), in the README's order.
VARIABLES: tuple[Variable, ...] = (
    Variable(("HISTO_MODEL_TAG",), "model to serve (a built Bento ignores it and serves its pinned model)",
             ("model_tag",)),
    Variable(("HISTO_MAX_PIXELS",), "decoded-image pixel cap (413 above it)", ("max_pixels",)),
    Variable(("HISTO_MAX_BODY_BYTES",), "request-body cap (413)", ("max_body_bytes",)),
    Variable(("HISTO_ABSTAIN_THRESHOLD",), "`uncertain` below this confidence", default="from the model card"),
    Variable(("HISTO_OOD_GATE",), "the quality gate and the out-of-distribution score on every tile; `off` only to "
             "measure their cost (answers then carry `null` trust fields)", default="`on`"),
    Variable(("HISTO_OOD_THRESHOLD",), "out-of-distribution score above which a tile is flagged",
             default="from the model card"),
    Variable(("HISTO_MAX_BATCH_SIZE",), "largest batch per model call", ("max_batch_size",)),
    Variable(("HISTO_MAX_LATENCY_MS",), "total wait for a result before 504", ("max_latency_ms",)),
    Variable(("HISTO_WORKERS",), "BentoML worker processes (about 1 GB resident each under load): by default one per "
             "CPU the process may use (its affinity mask, capped by a container's CPU quota, e.g. `--cpus` or a "
             "pod's CPU limit; `config/cpus.py`)", default="one per usable CPU"),
    Variable(("HISTO_TF_INTRA_OP_THREADS", "HISTO_TF_INTER_OP_THREADS"), "TensorFlow thread pools per worker (0: "
             "TensorFlow decides); one worker per core with one thread each beat one worker with more threads here",
             ("tf_intra_op_threads", "tf_inter_op_threads")),
    Variable(("TF_ENABLE_ONEDNN_OPTS",), "TensorFlow's oneDNN CPU kernels (read by TensorFlow; "
             "`models/tf_environment.py` sets the default); TensorFlow's own default turns them on only on CPUs with "
             "AVX-512 VNNI/BF16 or AMX, and on an AVX2-only EPYC they gave the model about 35% more images/s on one "
             "thread; 0 opts out", default="1"),
    Variable(("HISTO_LOG_FORMAT",), "`text` or `json` for the service's own log lines", default="`text`"),
    Variable(("HISTO_MAX_IN_FLIGHT",), "admitted uploads (body received) served at once per worker; more get 503 + "
             "`Retry-After`", ("max_in_flight",)),
    Variable(("HISTO_MAX_OPEN_UPLOADS", "HISTO_MAX_BUFFERED_BYTES"), "upload bodies still arriving per worker, and "
             "their bytes held; more get 503", ("max_open_uploads", "max_buffered_bytes")),
    Variable(("HISTO_MAX_QUEUE_DELAY_MS",), "new uploads get 503 while images wait longer than this for the model",
             ("max_queue_delay_ms",)),
    Variable(("HISTO_REQUEST_TIMEOUT_MS",), "the service answers 504 (problem+json, request id) when a request is not "
             "answered by then", ("request_timeout_ms",)),
    Variable(("HISTO_BODY_TIMEOUT_MS", "HISTO_BODY_IDLE_TIMEOUT_MS"), "an upload's body must arrive within the first "
             "and never pause longer than the second (408)", ("body_timeout_ms", "body_idle_timeout_ms")),
    Variable(("HISTO_HEADER_TIMEOUT_MS",), "a connection that has not sent a request's headers by then is closed",
             ("header_timeout_ms",)),
    Variable(("HISTO_MAX_DECODE_BYTES",), "estimated peak memory of one decode (413 above it)", ("max_decode_bytes",)),
    Variable(("HISTO_MAX_JPEG_SCANS", "HISTO_MAX_SCAN_PIXELS"), "JPEG scans, and scans x pixels (the decoding work), "
             "one upload may have (413)", ("max_jpeg_scans", "max_scan_pixels")),
    Variable(("HISTO_DECODE_THREADS",), "decoding threads per worker (plus one for decodes over 32 MB or 20 M "
             "scan-pixels)", ("decode_threads",)),
    Variable(("HISTO_MAX_FILES_PER_REQUEST",), "most `file` parts in one `/predict_batch`", ("max_files_per_request",)),
    Variable(("HISTO_API_TOKEN",), "when set, `/predict`, `/predict_batch`, `/explain`, `/model` (with "
             "`/model/report`) and the slide routes need `Authorization: Bearer <token>` (compared in constant "
             "time); probes, `/metrics`, `/docs.json` and the page at `/ui/` stay open", default="none"),
    Variable(("HISTO_CORS_ORIGINS",), "comma-separated browser origins allowed to call the API", default="none"),
    Variable(("SENTRY_DSN",), "optional Sentry error tracking (`sentry-sdk` is in the Bento; off unless set)",
             default="none"),
    Variable(("HISTO_SLIDE_STORE", "HISTO_SLIDE_DIR"), "the slide store every replica and slide worker shares: "
             "uploaded slides, their progress and outputs, one folder per slide (a folder, or an fsspec URL such as "
             "`s3://bucket/slides`); `HISTO_SLIDE_DIR` is its older name",
             default="`histopathology-slides` in the system temporary folder"),
    Variable(("HISTO_SLIDE_ROOT",), "a server-side folder `POST /slides` may name slides in by relative path "
             "(JSON `path`); the slide workers must see it at the same path", default="none"),
    Variable(("HISTO_DASK_SCHEDULER",), "`tcp://host:port` of the Dask cluster that analyses slides (`make engine`); "
             "none: an embedded cluster per service worker, started on the first slide", default="none"),
    Variable(("HISTO_DASK_WORKERS", "HISTO_DASK_WORKER_NICE"), "the embedded cluster's worker processes per service "
             "worker, and the OS niceness of slide workers (they yield the CPU to `/predict`; at 19, the "
             "default, they also take Linux's idle scheduling class and run only on CPU time the service leaves)",
             ("dask_workers", "dask_worker_nice")),
    Variable(("HISTO_SLIDE_BUSY_DUTY",), "while processes at normal priority (the service) keep half the host's cores "
             "busy, the share of the time a slide worker at a niceness above 0 computes (it pauses between "
             "batches; 1: never pauses)",
             ("slide_busy_duty",)),
    Variable(("HISTO_SLIDE_STALE_S", "HISTO_SLIDE_RECONCILE_S"), "a queued or running slide without a heartbeat "
             "for the first, and unknown to the scheduler, is submitted again; each service worker looks every "
             "second seconds (and removes expired slides)", ("slide_stale_s", "slide_reconcile_s")),
    Variable(("HISTO_SLIDE_MAX_ATTEMPTS",), "runs one slide gets (lost workers included) before it is `failed`",
             ("slide_max_attempts",)),
    Variable(("HISTO_MAX_SLIDE_BYTES",), "slide upload cap (413 as soon as the body crosses it)",
             ("max_slide_bytes",)),
    Variable(("HISTO_SLIDE_TTL_S",), "seconds slides and their analyses are kept", ("slide_ttl_s",)),
    Variable(("HISTO_SLIDE_UPLOAD_TIMEOUT_S",), "seconds one slide upload may take in all (a pause longer than "
             "`HISTO_BODY_IDLE_TIMEOUT_MS` still ends it with 408)", ("slide_upload_timeout_s",)),
)


def settings_table() -> str:
    """The README's settings table (Markdown), defaults read from the code."""
    defaults = load_settings({})
    rows = ["| variable | default | what |", "|---|---|---|"]
    for variable in VARIABLES:
        values = [getattr(defaults, name) for name in variable.fields]
        shown = variable.default or ", ".join(f"`{v}`" if isinstance(v, str) else str(v) for v in values)
        names = ", ".join(f"`{name}`" for name in variable.names)
        rows.append(f"| {names} | {shown} | {variable.what} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())  # `make settings-table` puts it into the README
