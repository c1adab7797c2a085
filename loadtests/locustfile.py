"""Locust load test of the service, with an SLO gate on Locust's exit code.

Users post realistic tiles (768x768 JPEGs from the synthetic generator, made
once at start) to `/predict`, with a smaller share of `/predict_batch` (four
tiles) and `GET /model`. At the end, the run fails (exit code 1) when the
failure ratio or the p95 latency of `/predict` is over its limit:

    SLO_MAX_FAILURE_RATIO (default 0.01)   SLO_P95_MS (default 2000)
    HISTO_API_TOKEN                        sent as a Bearer token when set

    locust -f loadtests/locustfile.py --headless -u 32 -r 8 -t 30s --host http://127.0.0.1:3000
"""

from __future__ import annotations

import logging
import os
from typing import Any

from locust import FastHttpUser, between, events, task
from locust.env import Environment

logger = logging.getLogger(__name__)

TILE_SIZE = 768
PREDICT_NAME = "/predict"
_tiles: list[bytes] = []  # filled once by the init listener


def _jpeg_tiles(size: int) -> list[bytes]:
    from loadtests.inprocess import sample_jpeg
    from synthetic.tissue import LUNG_CLASSES

    return [sample_jpeg(size, name, seed=10_000 + i) for i, name in enumerate(LUNG_CLASSES * 2)]


@events.init.add_listener
def _make_tiles(environment: Environment, **_: Any) -> None:
    _tiles[:] = _jpeg_tiles(int(os.environ.get("LOADTEST_TILE_SIZE", TILE_SIZE)))


@events.quitting.add_listener
def _slo_gate(environment: Environment, **_: Any) -> None:
    """Set the exit code from the SLOs (Locust's own exit code only counts failures)."""
    max_failure_ratio = float(os.environ.get("SLO_MAX_FAILURE_RATIO", "0.01"))
    p95_limit_ms = float(os.environ.get("SLO_P95_MS", "2000"))
    total = environment.stats.total
    predict = environment.stats.get(PREDICT_NAME, "POST")
    p95 = predict.get_response_time_percentile(0.95) if predict.num_requests else float("inf")
    verdicts = {
        f"failure ratio {total.fail_ratio:.4f} <= {max_failure_ratio}": total.fail_ratio <= max_failure_ratio,
        f"{PREDICT_NAME} p95 {p95:.0f} ms <= {p95_limit_ms:.0f} ms": p95 <= p95_limit_ms,
        f"{total.num_requests} requests > 0": total.num_requests > 0,
    }
    for verdict, ok in verdicts.items():
        logger.info("SLO %s: %s", "met" if ok else "MISSED", verdict)
    environment.process_exit_code = 0 if all(verdicts.values()) else 1


class TissueClassifierUser(FastHttpUser):
    """A client of the service: mostly single tiles, sometimes a few, sometimes the card."""

    wait_time = between(0, 0.05)

    def on_start(self) -> None:
        token = os.environ.get("HISTO_API_TOKEN")
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.turn = 0

    def _next_tile(self) -> bytes:
        self.turn += 1
        return _tiles[self.turn % len(_tiles)]

    @task(16)
    def predict(self) -> None:
        files = {"file": ("tile.jpeg", self._next_tile(), "image/jpeg")}
        with self.client.post(PREDICT_NAME, files=files, headers=self.auth, catch_response=True) as response:
            if response.status_code == 200 and "predicted_class" not in (response.json() or {}):
                response.failure("no predicted_class in the answer")

    @task(2)
    def predict_batch(self) -> None:
        files = [("file", (f"tile{i}.jpeg", self._next_tile(), "image/jpeg")) for i in range(4)]
        with self.client.post("/predict_batch", files=files, headers=self.auth, catch_response=True) as response:
            if response.status_code == 200 and len(response.json()) != 4:
                response.failure("expected 4 results")

    @task(1)
    def model_card(self) -> None:
        self.client.get("/model", headers=self.auth)
