"""Serving building blocks that need no server: the micro-batcher, problem details, settings."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from config.settings import SettingsError, load_settings
from models.preprocessing import CorruptImageError, EmptyImageError, ImageTooLargeError, UnsupportedImageError
from serving.inference.batcher import BatchTimeoutError, MicroBatcher
from serving.observability.logs import JsonFormatter
from serving.problems import PROBLEM_MEDIA_TYPE, Problem, answers_problems

# A batcher that never answers fails the test in this time (not a speed limit: the scenarios take ms).
BATCHER_BOUND_S = 10


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

    results = asyncio.run(asyncio.wait_for(scenario(), BATCHER_BOUND_S))
    assert [int(r[0]) for r in results] == [2 * i for i in range(20)]
    assert sum(seen) == 20
    assert max(seen) > 1 and max(seen) <= 8


def test_a_lone_request_runs_at_once():
    # No clock: a lone request must be taken into a batch and handed to the model's thread within a few
    # turns of the event loop (no batching window, no wait before the model), and a request that comes
    # after it was taken must form a batch of its own.
    batches: list[int] = []
    handed_to_a_thread: list[int] = []
    released = threading.Event()

    class RecordingExecutor(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # called on the event loop, when the batch is handed over
            handed_to_a_thread.append(len(batches))
            return super().submit(fn, *args, **kwargs)

    def held(batch: np.ndarray) -> np.ndarray:
        released.wait(10)  # the first batch runs until the second request has been queued
        return batch

    async def scenario() -> tuple[list[int], list[int]]:
        asyncio.get_running_loop().set_default_executor(RecordingExecutor(max_workers=2))
        batcher = MicroBatcher(held, max_batch_size=32, observe_batch_size=batches.append)
        try:
            first = asyncio.create_task(batcher.submit(np.zeros(2)))
            for _ in range(5):  # submit, then the consumer's first pass: no timer may be involved
                await asyncio.sleep(0)
            taken = (list(batches), list(handed_to_a_thread))
            second = asyncio.create_task(batcher.submit(np.ones(2)))
            await asyncio.sleep(0)
            released.set()
            await asyncio.gather(first, second)
            return taken
        finally:
            released.set()
            await batcher.close()

    assert asyncio.run(asyncio.wait_for(scenario(), BATCHER_BOUND_S)) == ([1], [1])
    assert batches == [1, 1] and handed_to_a_thread == [1, 2]


def test_a_failing_batch_fails_its_waiters_and_the_batcher_keeps_working(caplog):
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

    assert asyncio.run(asyncio.wait_for(scenario(), BATCHER_BOUND_S))[0] == 5
    [failure] = [r for r in caplog.records if r.name == "serving.inference.batcher"]
    assert failure.getMessage() == "batch of 1 failed" and failure.exc_info[0] is RuntimeError


@pytest.mark.parametrize(
    ("error", "status"),
    [(EmptyImageError("e"), 400), (ImageTooLargeError("t"), 413), (UnsupportedImageError("u"), 415),
     (CorruptImageError("c"), 422)],
)
def test_decode_errors_map_to_problem_details(error, status):
    @answers_problems
    async def route(part: str) -> str:
        raise Problem.from_error(error, part)

    response = asyncio.run(route("file[3]"))
    assert response.status_code == status
    assert response.media_type == PROBLEM_MEDIA_TYPE
    body = json.loads(response.body)
    assert body["status"] == status and body["title"] and body["type"] == "about:blank"
    assert body["detail"] == f"file[3]: {error}" and "Traceback" not in body["detail"]


def test_answers_problems_passes_answers_and_other_errors_through():
    @answers_problems
    async def route(fail: bool) -> str:
        if fail:
            raise RuntimeError("a bug, not a problem")
        return "answer"

    assert asyncio.run(route(False)) == "answer"
    with pytest.raises(RuntimeError, match="a bug"):
        asyncio.run(route(True))


def test_a_request_waiting_too_long_times_out_and_leaves_the_queue():
    calls: list[int] = []

    def slow(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        time.sleep(0.3)
        return batch

    async def scenario() -> None:
        batcher = MicroBatcher(slow, max_batch_size=1, max_wait_s=0.1)
        first = asyncio.create_task(batcher.submit(np.zeros(1)))
        await asyncio.sleep(0.01)  # the first occupies the model; the second queues behind it
        with pytest.raises(BatchTimeoutError, match=r"^no result within 0\.1 s$"):
            await batcher.submit(np.ones(1))
        with pytest.raises(BatchTimeoutError):
            await first  # 0.3 s of model time is over the 0.1 s budget too
        await asyncio.sleep(0.4)
        assert calls == [1]  # the timed-out queued request never reached the model
        # The batch of only timed-out requests was skipped, and the batcher still takes new work.
        with pytest.raises(BatchTimeoutError):
            await batcher.submit(np.full(1, 2))
        while calls != [1, 1]:
            await asyncio.sleep(0.01)
        await batcher.close()

    asyncio.run(asyncio.wait_for(scenario(), BATCHER_BOUND_S))


def test_settings_come_from_the_environment():
    settings = load_settings({"HISTO_MAX_BATCH_SIZE": "16", "HISTO_ABSTAIN_THRESHOLD": "0.7"})
    assert settings.max_batch_size == 16
    assert settings.abstain_threshold == 0.7
    assert settings.model_tag == "lung_histopathology:latest"
    assert settings.log_format == "text" and settings.max_latency_ms == 10_000
    assert settings.ood_gate is True and settings.ood_threshold is None  # the card's threshold
    switched = load_settings({"HISTO_OOD_GATE": "off", "HISTO_OOD_THRESHOLD": "3.5"})
    assert switched.ood_gate is False and switched.ood_threshold == 3.5


def test_a_bento_pinned_model_tag_wins_over_the_environment():
    env = {"HISTO_MODEL_TAG": "other:latest"}
    assert load_settings(env).model_tag == "other:latest"
    assert load_settings(env, bento_arguments={"model_tag": "lung:abc"}).model_tag == "lung:abc"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("HISTO_MAX_BATCH_SIZE", "abc", "not an integer"), ("HISTO_MAX_BATCH_SIZE", "0", "at least 1"),
     ("HISTO_ABSTAIN_THRESHOLD", "1.5", "between 0 and 1"), ("HISTO_LOG_FORMAT", "xml", "text, json"),
     ("HISTO_OOD_GATE", "maybe", "on, off"), ("HISTO_OOD_THRESHOLD", "0", "above 0"),
     ("HISTO_OOD_THRESHOLD", "x", "not a number")],
)
def test_bad_settings_name_the_variable(name, value, message):
    with pytest.raises(SettingsError, match=message) as error:
        load_settings({name: value})
    assert name in str(error.value)


def test_a_probability_row_becomes_a_prediction():
    from models.prediction import Thresholds, TileEvidence, answer

    evidence = TileEvidence(np.array([0.2, 0.45, 0.35], np.float32), float("nan"), None)  # trust checks off
    prediction = answer(evidence, ["a", "b", "c"], Thresholds(abstain=0.5, out_of_distribution=1.0), "m:1")
    assert prediction.predicted_class == "b" and prediction.confidence == pytest.approx(0.45)
    assert prediction.uncertain and prediction.reasons == ["low_confidence"]  # 0.45 < 0.5
    assert list(prediction.probabilities) == ["a", "b", "c"]
    assert prediction.out_of_distribution is None and prediction.quality is None
    assert not answer(evidence, ["a", "b", "c"], Thresholds(abstain=0.4, out_of_distribution=1.0), "m:1").uncertain
    with pytest.raises(ValueError, match="expected 2"):
        answer(evidence, ["a", "b"], Thresholds(abstain=0.5, out_of_distribution=1.0), "m:1")


def test_json_log_lines_parse():
    import logging

    record = logging.LogRecord("service", logging.INFO, __file__, 1, "loaded %s", ("m:1",), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "loaded m:1" and line["level"] == "INFO" and line["logger"] == "service"


def _cpus_allowed_by_the_kernel() -> int:
    """The affinity mask's size as /proc reports it (e.g. "0-3,8"), not through os.sched_getaffinity."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Cpus_allowed_list"))
    count = 0
    for part in line.split(":")[1].strip().split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def test_workers_default_to_the_cpus_the_process_may_use(tmp_path):
    from config.cpus import cgroup_cpu_limit, usable_cpus

    affinity = _cpus_allowed_by_the_kernel()
    v2, v1 = Path("/sys/fs/cgroup/cpu.max"), Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    if v2.is_file():
        quota, period = v2.read_text().split()
    elif v1.is_file():
        quota, period = v1.read_text().strip(), v1.with_name("cpu.cfs_period_us").read_text().strip()
    else:
        quota, period = "max", "1"
    limited = quota != "max" and int(quota) > 0
    expected = min(affinity, max(1, -(-int(quota) // int(period)))) if limited else affinity
    assert load_settings({}).workers == usable_cpus() == expected
    assert load_settings({"HISTO_WORKERS": "3"}).workers == 3
    cgroup = tmp_path / "sys" / "fs" / "cgroup"
    cgroup.mkdir(parents=True)
    assert cgroup_cpu_limit(tmp_path) is None  # no quota file: no limit
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None and usable_cpus(tmp_path) == affinity
    (cgroup / "cpu.max").write_text("150000 100000\n")  # a container limited to 1.5 CPUs
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == min(2, affinity)
    (cgroup / "cpu.max").write_text("10000 100000\n")  # a tenth of a CPU still gets one worker
    assert usable_cpus(tmp_path) == 1
    (cgroup / "cpu.max").unlink()
    v1 = tmp_path / "sys" / "fs" / "cgroup" / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.0 and usable_cpus(tmp_path) == 1


class _CountingPool(ThreadPoolExecutor):
    """A thread pool that counts the jobs it was given (each is a hop to a thread and back)."""

    def __init__(self, threads: int) -> None:
        super().__init__(threads)
        self.jobs = 0

    def submit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.jobs += 1
        return super().submit(*args, **kwargs)


def _decoder(threads: int, observed: list[float]):  # type: ignore[no-untyped-def]
    from models.preprocessing import DecodeLimits
    from models.resampling import ModelScale
    from serving.inference.decoding import Decoder

    decoder = Decoder(ModelScale(64, None), DecodeLimits(), threads, observed.append)
    decoder._pool.shutdown()
    decoder._pool = _CountingPool(threads)
    decoder._heavy_pool.shutdown()
    decoder._heavy_pool = _CountingPool(1)
    return decoder


def _parts(tmp_path: Path, payloads: list[bytes]) -> list[Path]:
    paths = []
    for i, data in enumerate(payloads):
        path = tmp_path / f"{i}.bin"
        path.write_bytes(data)
        paths.append(path)
    return paths


@pytest.mark.parametrize(("parts", "threads"), [(1, 2), (2, 2), (7, 2), (32, 2), (5, 3), (3, 8)])
def test_a_requests_parts_decode_in_order_in_at_most_one_job_per_thread(tmp_path, parts, threads):
    from models.preprocessing import decode_image
    from serving.inference.decoding import PixelBudget
    from tests.helpers import fresh_tile

    payloads = [fresh_tile(("lung_n", "lung_aca", "lung_scc")[i % 3], 40 + i) for i in range(parts)]
    observed: list[float] = []
    decoder = _decoder(threads, observed)
    try:
        images = asyncio.run(decoder.decode_parts(_parts(tmp_path, payloads), PixelBudget(10**9)))
    finally:
        decoder.close()
    assert len(images) == parts
    for image, data in zip(images, payloads, strict=True):  # each part's own pixels, in the order sent
        np.testing.assert_array_equal(image, decode_image(data, 64))
    assert decoder._pool.jobs == min(parts, threads)
    assert decoder._heavy_pool.jobs == 0
    assert len(observed) == parts and all(seconds > 0 for seconds in observed)


def test_the_first_bad_part_in_the_order_sent_names_the_problem_heavy_parts_included(tmp_path, monkeypatch):
    from serving.inference import decoding
    from tests.helpers import fresh_tile

    good = [fresh_tile("lung_n", 60 + i) for i in range(6)]
    truncated = good[0][:700]  # a header that reads, pixels that do not: fails only when decoded
    not_an_image = b"no image here"
    cases = [  # parts -> the part named, and the heavy finishes when every part is heavy
        ([good[0], not_an_image, good[1], good[2], not_an_image, good[3]], 1, 1),
        ([good[0], good[1], good[2], good[3], good[4], not_an_image], 5, 5),  # in the second thread's run
        ([not_an_image, good[1], good[2], good[3], not_an_image, good[4]], 0, 0),
        ([good[0], good[1], good[2], good[3], truncated, not_an_image], 4, 5),  # the truncated part's own finish
    ]
    for payloads, named, heavy_finishes in cases:
        for heavy in (False, True):  # every part heavy: the decode is finished on the heavy thread
            monkeypatch.setattr(decoding, "HEAVY_DECODE_BYTES", 0 if heavy else 32 * 1024 * 1024)
            decoder = _decoder(2, [])
            try:
                with pytest.raises(Problem) as refused:
                    asyncio.run(decoder.decode_parts(_parts(tmp_path, payloads), decoding.PixelBudget(10**9)))
            finally:
                decoder.close()
            assert refused.value.detail.startswith(f"file[{named}]: "), (named, heavy, refused.value.detail)
            assert refused.value.status in (415, 422)
            # Heavy parts after the first bad one are never finished: the answer is already the refusal.
            assert decoder._heavy_pool.jobs == (heavy_finishes if heavy else 0)


def test_a_requests_parts_share_one_pixel_budget(tmp_path):
    from models.preprocessing import DecodeLimits, prepare_decode
    from serving.inference.decoding import PixelBudget
    from tests.helpers import fresh_tile

    payloads = [fresh_tile("lung_n", 80 + i) for i in range(6)]
    paths = _parts(tmp_path, payloads)
    each = prepare_decode(paths[0], 64, DecodeLimits(), None, None).cost.pixels  # what one part spends
    decoder = _decoder(2, [])
    try:
        with pytest.raises(Problem) as refused:  # five parts fit, the sixth does not
            asyncio.run(decoder.decode_parts(paths, PixelBudget(int(5.5 * each))))
        images = asyncio.run(decoder.decode_parts(paths, PixelBudget(6 * each)))
    finally:
        decoder.close()
    assert refused.value.status == 413 and "pixels in all" in refused.value.detail
    assert len(images) == 6
