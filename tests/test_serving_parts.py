"""Serving building blocks that need no server: the micro-batcher, problem details, settings."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from models.preprocessing import CorruptImageError, EmptyImageError, ImageTooLargeError, UnsupportedImageError
from serving.batcher import MicroBatcher
from serving.problems import PROBLEM_MEDIA_TYPE, decode_problem
from serving.settings import load_settings


def _slow_double(batch: np.ndarray) -> np.ndarray:
    time.sleep(0.02)  # long enough for concurrent requests to queue behind a batch
    return batch * 2


def test_concurrent_requests_form_batches_and_get_their_own_rows():
    seen: list[int] = []

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(_slow_double, max_batch_size=8, observe_batch_size=seen.append)
        try:
            return await asyncio.gather(*(batcher.submit(np.full(3, i)) for i in range(20)))
        finally:
            await batcher.close()

    results = asyncio.run(scenario())
    assert [int(r[0]) for r in results] == [2 * i for i in range(20)]
    assert sum(seen) == 20
    assert max(seen) > 1 and max(seen) <= 8


def test_a_lone_request_runs_at_once():
    async def scenario() -> float:
        batcher = MicroBatcher(lambda b: b, max_batch_size=32)
        started = time.perf_counter()
        await batcher.submit(np.zeros(2))
        await batcher.close()
        return time.perf_counter() - started

    assert asyncio.run(scenario()) < 0.5


def test_a_failing_batch_fails_its_waiters_and_the_batcher_keeps_working():
    calls = {"n": 0}
    lock = threading.Lock()

    def flaky(batch: np.ndarray) -> np.ndarray:
        with lock:
            calls["n"] += 1
            first = calls["n"] == 1
        if first:
            raise RuntimeError("boom")
        return batch

    async def scenario() -> np.ndarray:
        batcher = MicroBatcher(flaky, max_batch_size=4)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(np.ones(1))
        result = await batcher.submit(np.ones(1) * 5)
        await batcher.close()
        return result

    assert asyncio.run(scenario())[0] == 5


@pytest.mark.parametrize(
    ("error", "status"),
    [(EmptyImageError("e"), 400), (ImageTooLargeError("t"), 413), (UnsupportedImageError("u"), 415),
     (CorruptImageError("c"), 422)],
)
def test_decode_errors_map_to_problem_details(error, status):
    response = decode_problem(error)
    assert response.status_code == status
    assert response.media_type == PROBLEM_MEDIA_TYPE
    body = json.loads(response.body)
    assert body["status"] == status and body["title"] and body["type"] == "about:blank"
    assert "Traceback" not in body["detail"]


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("HISTO_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("HISTO_ABSTAIN_THRESHOLD", "0.7")
    monkeypatch.delenv("HISTO_MODEL_TAG", raising=False)
    settings = load_settings()
    assert settings.max_batch_size == 16
    assert settings.abstain_threshold == 0.7
    assert settings.model_tag == "lung_histopathology:latest"
