"""A short headless Locust run against the real server: the harness and its SLO gate work."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.servers import REPO_ROOT

pytestmark = [pytest.mark.load, pytest.mark.service]

LOCUST = str(Path(sys.executable).with_name("locust"))


def _locust(url: str, out: Path, seconds: int, **slo: str) -> subprocess.CompletedProcess[str]:
    command = [
        LOCUST, "-f", "loadtests/locustfile.py", "--headless", "--host", url, "-u", "8", "-r", "8",
        "-t", f"{seconds}s", "--stop-timeout", "5", "--csv", str(out / "run"), "--only-summary",
    ]
    env = {**os.environ, "LOADTEST_TILE_SIZE": "256", **slo}
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def _stats(out: Path) -> dict[str, dict[str, str]]:
    with (out / "run_stats.csv").open() as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def test_locust_run_meets_generous_slos(server, tmp_path):
    result = _locust(server.url, tmp_path, 6, SLO_P95_MS="5000", SLO_MAX_FAILURE_RATIO="0.0")
    assert result.returncode == 0, result.stderr[-3000:]
    stats = _stats(tmp_path)
    assert int(stats["/predict"]["Request Count"]) > 10
    assert int(stats["Aggregated"]["Failure Count"]) == 0
    assert {"/predict_batch", "/model"} <= set(stats)
    assert "SLO met" in result.stderr


def test_slo_gate_fails_the_run_when_latency_is_over_the_limit(server, tmp_path):
    result = _locust(server.url, tmp_path, 3, SLO_P95_MS="0.001")
    assert result.returncode == 1
    assert "SLO MISSED" in result.stderr and "p95" in result.stderr
