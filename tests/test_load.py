"""A short headless Locust run against the real server: the harness and its SLO gate work."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.helpers import fresh_tile, locust_stats, run_locust

pytestmark = [pytest.mark.load, pytest.mark.service]


def test_locust_run_meets_generous_slos(server, tmp_path):
    result = run_locust(server.url, tmp_path, 6, SLO_P95_MS="5000", SLO_MAX_FAILURE_RATIO="0.0")
    assert result.returncode == 0, result.stderr[-3000:]
    stats = locust_stats(tmp_path)
    assert int(stats["/predict"]["Request Count"]) > 10
    assert int(stats["Aggregated"]["Failure Count"]) == 0
    assert {"/predict_batch", "/model"} <= set(stats)
    assert "SLO met" in result.stderr


def test_slo_gate_fails_the_run_when_latency_is_over_the_limit(server, tmp_path):
    result = run_locust(server.url, tmp_path, 3, SLO_P95_MS="0.001")
    assert result.returncode == 1
    assert "SLO MISSED" in result.stderr and "p95" in result.stderr


def test_benchmark_client_measures_a_closed_loop_after_its_ramp(server):
    # The client `make benchmark` uses: every client connects (ramp, not counted), then all post for the window.
    import asyncio
    import time

    from loadtests.client import closed_loop

    started = time.perf_counter()
    result = asyncio.run(closed_loop(f"{server.url}/predict", fresh_tile("lung_aca", 740), 4, 2.0, ramp_s=0.5))
    took = time.perf_counter() - started
    assert result.concurrency == 4 and result.errors == 0
    assert result.requests >= 4  # each client posted at least once inside the window
    assert result.requests_per_second == pytest.approx(result.requests / 2.0, rel=0.3)
    assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms
    assert 2.0 + 0.5 * 3 / 4 <= took < 10  # the last client starts after 3/4 of the ramp; the window is bounded
    bad = asyncio.run(closed_loop(f"{server.url}/predict", b"not an image", 2, 0.5, ramp_s=0.1))
    assert bad.requests > 0 and bad.errors == bad.requests  # 415s count as errors


def test_the_floor_service_answers_both_routes_with_the_services_server_settings(tmp_path):
    # `make benchmark` measures BentoML's floor with it; it must take the service's input and answer.
    from config.settings import load_settings
    from loadtests.floor_service import ASGI_ROUTE, Floor
    from loadtests.servers import start_server, stop_server
    from serving.server_options import server_options

    assert Floor.config.items() >= server_options(load_settings()).items()
    server = start_server("loadtests.floor_service:Floor", tmp_path / "floor.log")
    try:
        tile = fresh_tile("lung_n", 750)
        for route in ("/predict", ASGI_ROUTE):
            response = httpx.post(f"{server.url}{route}", files={"file": ("t.jpeg", tile, "image/jpeg")}, timeout=30)
            assert response.status_code == 200 and response.json()["bytes"] == len(tile), route
    finally:
        stop_server(server)


def test_cpu_budget_charges_samples_to_the_innermost_known_part_and_skips_waiting():
    from loadtests.cpu_budget import OTHER, charge

    collapsed = "\n".join([
        "run (uvicorn/server.py:1);handle (service.py:2);decode_image (models/preprocessing.py:3);"
        "load (PIL/ImageFile.py:4) 7",
        "run (uvicorn/server.py:1);__call__ (serving/http/guard.py:9);parse (multipart/multipart.py:5) 3",
        "run (uvicorn/server.py:1);_run_once (asyncio/base_events.py:6) 2",
        "_bootstrap (threading.py:1);_worker (concurrent/futures/thread.py:81) 50",  # a decode thread waiting
        "main (somewhere.py:1) 1",
    ])
    unknown = Counter()
    samples = charge(collapsed, unknown)
    assert samples["decode (PIL, models/preprocessing.py)"] == 7
    assert samples["multipart parsing"] == 3  # inside the guard, but the parser is what ran
    assert samples["HTTP server and event loop (uvicorn, httptools, asyncio, Starlette)"] == 2
    assert samples[OTHER] == 1 and unknown == Counter({"main (somewhere.py:1)": 1})
    assert sum(samples.values()) == 13  # the waiting thread is not CPU


def test_cpu_budget_charges_tensorflows_own_threads_to_the_model_from_the_kernel():
    from loadtests.client import LevelResult
    from loadtests.cpu_budget import MODEL, OTHER, Budget

    level = LevelResult(concurrency=4, requests=100, errors=0, requests_per_second=10, p50_ms=1, p95_ms=1,
                        p99_ms=1, client_cpu_share=0.1, tiles=2)
    samples = Counter({MODEL: 10, "decode (PIL, models/preprocessing.py)": 30, OTHER: 60})
    budget = Budget(level, samples, cores=2, worker_cpu_s=10.0, native_model_cpu_s=4.0)
    # 4 s of TensorFlow's threads go to the model whole; the 6 s the samples saw are divided by them.
    assert budget.core_ms(MODEL) == pytest.approx(40 + 60 * 0.1)
    assert budget.core_ms("decode (PIL, models/preprocessing.py)") == pytest.approx(60 * 0.3)
    assert budget.core_ms(OTHER) == pytest.approx(60 * 0.6)
    assert sum(budget.core_ms(part) for part in samples) == pytest.approx(budget.per_request_ms) == 100
    assert budget.per_image_ms == 50


def test_tensorflows_pool_threads_are_found_by_their_kernel_names():
    import psutil
    import tensorflow as tf

    from loadtests.cpu_budget import native_model_threads

    tf.function(lambda x: tf.matmul(x, x))(tf.ones((64, 64)))  # a graph run starts TensorFlow's pools
    found = native_model_threads([psutil.Process()])
    names = {Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() for pid, tid in found}
    assert found and all(name.startswith("tf_") for name in names)
    assert all(seconds >= 0 for seconds in found.values())


def test_the_service_starts_one_worker_per_usable_cpu(tiny_model_tag, tmp_path):
    # No HISTO_WORKERS: the default follows the CPUs the process may use (affinity, cgroup quota).
    from loadtests.servers import start_server, stop_server, worker_pids

    env = {"HISTO_MODEL_TAG": tiny_model_tag}
    server = start_server("service:Histopathology", tmp_path / "one-cpu.log", env=env, prefix=("taskset", "-c", "0"))
    try:
        assert len(worker_pids(server)) == 1
        tile = fresh_tile("lung_aca", 751)
        assert httpx.post(f"{server.url}/predict", files={"file": ("t.jpeg", tile)}, timeout=30).status_code == 200
    finally:
        stop_server(server)
