"""Service settings, read from the environment in one place.

Every variable has a documented default (see `.env.example`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from models.preprocessing import DEFAULT_MAX_PIXELS
from models.store import DEFAULT_MODEL_NAME


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


def _float_or_none(name: str) -> float | None:
    raw = os.environ.get(name)
    return None if raw in (None, "") else float(raw)


@dataclass(frozen=True)
class Settings:
    model_tag: str
    max_body_bytes: int
    max_pixels: int
    abstain_threshold: float | None  # overrides the model card's when set
    max_batch_size: int
    max_latency_ms: int
    workers: int
    tf_intra_op_threads: int
    tf_inter_op_threads: int


def load_settings() -> Settings:
    """Read the HISTO_* environment variables (defaults in `.env.example`)."""
    return Settings(
        model_tag=os.environ.get("HISTO_MODEL_TAG", f"{DEFAULT_MODEL_NAME}:latest"),
        max_body_bytes=_int("HISTO_MAX_BODY_BYTES", 20 * 1024 * 1024),
        max_pixels=_int("HISTO_MAX_PIXELS", DEFAULT_MAX_PIXELS),
        abstain_threshold=_float_or_none("HISTO_ABSTAIN_THRESHOLD"),
        max_batch_size=_int("HISTO_MAX_BATCH_SIZE", 32),
        max_latency_ms=_int("HISTO_MAX_LATENCY_MS", 10_000),
        workers=_int("HISTO_WORKERS", 1),
        tf_intra_op_threads=_int("HISTO_TF_INTRA_OP_THREADS", 0),
        tf_inter_op_threads=_int("HISTO_TF_INTER_OP_THREADS", 0),
    )
