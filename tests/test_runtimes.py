"""The inference-runtime evaluation: conversions agree with TensorFlow, and the decision rule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loadtests.report import write_benchmarks_markdown
from loadtests.runtimes import MAX_ABS_DIFFERENCE, RUNTIMES, RuntimeResult, decide, markdown
from loadtests.servers import REPO_ROOT


def _result(
    runtime: str, best: float, threads: int = 1, difference: float = 1e-7, argmax: bool = True
) -> RuntimeResult:
    return RuntimeResult(runtime, threads, {1: best / 2, 16: best}, 1.0, 1000, difference, argmax)


@pytest.mark.training
def test_every_runtime_converts_the_served_graph_and_agrees_with_tensorflow(tiny_model_tag):
    # A child process, as `make runtimes` does: TensorFlow's thread pools are fixed once it has run.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.runtimes",
            "--model",
            tiny_model_tag,
            "--threads",
            "1",
            "--seconds",
            "0.05",
            "--json",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {row["runtime"]: row for row in json.loads(done.stdout)}
    assert set(results) == set(RUNTIMES)
    for runtime, row in results.items():
        # The tiny model has a fitted temperature: the converted graphs carry it as a constant.
        assert row["argmax_agrees"], runtime
        assert row["max_abs_difference"] <= MAX_ABS_DIFFERENCE, (runtime, row["max_abs_difference"])
        assert all(rate > 0 for rate in row["images_per_second"].values()), runtime
        assert (row["artifact_bytes"] > 0) == (runtime != "tensorflow"), runtime


def test_decision_bounds_the_end_to_end_gain_by_the_service_cpu_per_request():
    # decode 5 ms; TensorFlow 200 img/s = 5 ms per image; a runtime at 1000 img/s = 1 ms:
    # the model is 5x faster, the worker pipeline (10 ms -> 6 ms) only 1.67x.
    results = [_result("tensorflow", 200), _result("onnxruntime", 1000), _result("openvino", 400)]
    decision = decide(results, decode_ms=5.0)
    assert decision.best_runtime == "onnxruntime"
    assert decision.model_gain == pytest.approx(5.0)
    assert decision.pipeline_gain == decision.end_to_end_gain == pytest.approx(10 / 6)  # no benchmark: the pipeline
    assert decision.adopt
    # A service spending 20 core-ms per request saves the same 4 ms: 20 / 16 = 1.25x, just enough;
    # at 30 core-ms it is 1.15x, not enough.
    assert decide(results, decode_ms=5.0, request_core_ms=20.0).end_to_end_gain == pytest.approx(1.25)
    assert decide(results, decode_ms=5.0, request_core_ms=20.0).adopt
    assert not decide(results, decode_ms=5.0, request_core_ms=30.0).adopt


def test_the_end_to_end_base_is_read_from_the_latest_benchmark(tmp_path):
    from loadtests.runtimes import service_core_ms

    record = tmp_path / "benchmark.json"
    assert service_core_ms(record) is None
    row = {"concurrency": 32, "requests_per_second": 400.0, "client_cpu_share": 0.2}
    record.write_text(json.dumps({"bounds": {"cores": 2}, "rows": [
        {"target": "service (batching off)", **row, "requests_per_second": 100.0},
        {"target": "service (defaults: batching, 1 worker per CPU)", **row},
    ]}))
    assert service_core_ms(record) == pytest.approx(2 * 0.8 * 1000 / 400)  # 4 core-ms per request


def test_a_runtime_that_disagrees_is_never_chosen():
    results = [
        _result("tensorflow", 200),
        _result("litert", 5000, difference=1e-2),  # fast but not the same model
        _result("onnxruntime", 5000, argmax=False),
        _result("openvino", 260),
        _result("onnxruntime", 9000, threads=2),  # workers run one thread: two-thread rows do not count
    ]
    decision = decide(results, decode_ms=2.0)
    assert decision.best_runtime == "openvino" and not decision.adopt
    page = "\n".join(markdown(results, 2.0, decision, "now", "m:1"))
    assert "keep TensorFlow" in page and "| litert | 1 |" in page and "| NO |" in page


def test_benchmarks_page_keeps_each_harness_section(tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    (tmp_path / "runtimes.md").write_text("## Inference runtimes\n\nruntime table\n")
    write_benchmarks_markdown(tmp_path, page)
    assert page.read_text() == "# Benchmarks\n\n## Inference runtimes\n\nruntime table\n"
    (tmp_path / "benchmark.md").write_text("## Service under load\n\nhttp table\n")
    write_benchmarks_markdown(tmp_path, page)
    text = page.read_text()
    assert text.index("http table") < text.index("runtime table")


def test_a_benchmark_changes_tracked_results_only_when_asked(tmp_path, monkeypatch):
    from loadtests import report

    tracked, local, page = tmp_path / "results", tmp_path / "artifacts", tmp_path / "BENCHMARKS.md"
    tracked.mkdir()
    (tracked / "benchmark.md").write_text("## Service under load\n\ncommitted table\n")
    page.write_text("committed page\n")
    monkeypatch.setattr(report, "TRACKED_RESULTS", tracked)
    monkeypatch.setattr(report, "LOCAL_RESULTS", local)
    monkeypatch.setattr(report, "TRACKED_PAGE", page)
    monkeypatch.setattr(report, "REPO_ROOT", tmp_path)

    monkeypatch.delenv("UPDATE_DOCS", raising=False)
    report.write_section("runtimes.md", ["## Inference runtimes", "", "my table"])
    assert page.read_text() == "committed page\n" and not (tracked / "runtimes.md").exists()
    local_page = (local / "BENCHMARKS.md").read_text()
    assert "my table" in local_page and "committed table" in local_page  # complete: the rest from the tracked
    assert report.latest_record("runtimes.md") == local / "runtimes.md"

    monkeypatch.setenv("UPDATE_DOCS", "1")
    report.write_section("runtimes.md", ["## Inference runtimes", "", "published table"])
    assert "published table" in page.read_text() and "committed table" in page.read_text()
    assert (tracked / "runtimes.md").read_text().endswith("published table")
