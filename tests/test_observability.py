"""Metrics, request ids, structured logs, the dashboard and error-tracking scrubbing, against real servers."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.error_tracking import init_error_tracking, scrub_event
from serving.metrics import METRIC_NAMES
from tests.conftest import STRICT_TOKEN
from tests.test_service import fresh_tile, post_file

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json"


def samples(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the service's own metrics: (name, sorted labels) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("histopathology_"):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.mark.service
def test_metrics_count_predictions_rejections_and_timings(server, tiny_model_tag):
    before = samples(server.url)
    for class_name, count in (("lung_aca", 3), ("lung_n", 2), ("lung_scc", 1)):
        for index in range(count):
            assert post_file(server.url, fresh_tile(class_name, 700 + index)).status_code == 200
    assert post_file(server.url, b"not an image").status_code == 415
    assert post_file(server.url, fresh_tile("lung_n", 710)[:900]).status_code == 422
    assert post_file(server.url, b"").status_code == 400
    after = samples(server.url)

    assert delta(before, after, "histopathology_predictions_total", predicted_class="lung_aca") == 3
    assert delta(before, after, "histopathology_predictions_total", predicted_class="lung_n") == 2
    assert delta(before, after, "histopathology_predictions_total", predicted_class="lung_scc") == 1
    assert delta(before, after, "histopathology_rejected_total", reason="format") == 1
    assert delta(before, after, "histopathology_rejected_total", reason="corrupt") == 1
    assert delta(before, after, "histopathology_rejected_total", reason="bad_request") == 1
    assert delta(before, after, "histopathology_decode_seconds_count") == 9  # all 9 uploads, refused ones too
    assert delta(before, after, "histopathology_batch_size_sum") == 6  # only the valid ones reached the model
    assert delta(before, after, "histopathology_inference_seconds_count") >= 1
    name, _, version = tiny_model_tag.partition(":")
    info = {(dict(labels)["name"], dict(labels)["version"]): value for (metric, labels), value in after.items()
            if metric == "histopathology_model_info"}
    assert info == {(name, version): 1.0}


@pytest.mark.service
def test_request_id_round_trips_or_is_generated(server):
    response = httpx.post(f"{server.url}/predict", files={"file": ("t.jpeg", fresh_tile("lung_n", 721))},
                          headers={"X-Request-ID": "trace-42.a"}, timeout=30)
    assert response.headers["x-request-id"] == "trace-42.a"
    generated = httpx.post(f"{server.url}/predict", files={"file": ("t.jpeg", b"")}, timeout=30)
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    unsafe = httpx.get(f"{server.url}/model", headers={"X-Request-ID": "bad id\twith spaces"}, timeout=10)
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])  # not echoed into logs or headers
    time.sleep(0.3)
    assert "id=trace-42.a" in server.log() and "predicted_class=lung_n" in server.log()


@pytest.mark.service
def test_spans_are_recorded_only_when_tracing_is_configured(server, strict_server):
    # BentoML names its span in X-BentoML-Request-ID; the default server skips spans (nothing exports
    # them), the strict server has a tracing exporter configured and keeps them.
    tile = fresh_tile("lung_n", 722)
    untraced = httpx.post(f"{server.url}/predict", files={"file": ("t.jpeg", tile)}, timeout=30)
    traced = httpx.post(f"{strict_server.url}/predict", files={"file": ("t.jpeg", tile)},
                        headers={"Authorization": f"Bearer {STRICT_TOKEN}"}, timeout=30)
    assert untraced.status_code == traced.status_code == 200
    assert "x-bentoml-request-id" not in untraced.headers
    assert re.fullmatch(r"[0-9a-f]{16}", traced.headers["x-bentoml-request-id"])
    assert untraced.headers["x-request-id"] and traced.headers["x-request-id"]  # ours, either way


@pytest.mark.service
def test_json_logs_parse_and_carry_no_image_data(strict_server):
    marker = "zz-json-log-marker"
    headers = {"Authorization": f"Bearer {STRICT_TOKEN}", "X-Request-ID": "json-check-1"}
    httpx.post(f"{strict_server.url}/predict", files={"file": (f"{marker}.jpeg", fresh_tile("lung_scc", 730))},
               headers=headers, timeout=30)
    time.sleep(0.3)
    ours = [line for line in strict_server.log().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in ours]  # every line of ours is JSON
    request_lines = [e for e in entries if e.get("request_id") == "json-check-1"]
    assert request_lines, ours[-5:]
    line = request_lines[0]
    assert line["route"] == "/predict" and line["status"] == 200 and line["predicted_class"] == "lung_scc"
    assert isinstance(line["latency_ms"], float)
    assert marker not in strict_server.log()
    assert "\\xff\\xd8" not in strict_server.log() and "JFIF" not in strict_server.log()


@pytest.mark.service
def test_dashboard_refers_only_to_exported_metrics(server):
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\bhistopathology_[a-z_]+", expr)}
    post_file(server.url, fresh_tile("lung_n", 740))  # labelled counters appear once they have counted
    post_file(server.url, b"not an image")
    exported = {name for name, _ in samples(server.url)}
    assert used and used <= exported, used - exported
    assert {name.removesuffix("_total") for name in METRIC_NAMES} <= {
        re.sub(r"_(total|bucket|sum|count)$", "", name) for name in exported
    }


def test_error_events_are_scrubbed_of_bodies_and_personal_data():
    event = {
        "request": {
            "url": "http://x/predict", "method": "POST", "data": "\xff\xd8 image bytes", "cookies": "a=b",
            "query_string": "patient=1", "headers": {"Authorization": "Bearer s", "Content-Type": "multipart/form-data",
                                                     "X-Forwarded-For": "10.0.0.1"},
        },
        "user": {"ip_address": "10.0.0.1"},
        "exception": {"values": [{"type": "RuntimeError"}]},
    }
    scrubbed = scrub_event(event)
    assert set(scrubbed["request"]) == {"url", "method", "headers"}
    assert scrubbed["request"]["headers"] == {"Content-Type": "multipart/form-data"}
    assert "user" not in scrubbed and scrubbed["exception"]


def test_error_tracking_starts_only_with_a_dsn():
    import sentry_sdk

    assert init_error_tracking(None, release="m:1") is False
    try:
        assert init_error_tracking("http://public@127.0.0.1:9/1", release="m:1") is True
        options = sentry_sdk.get_client().options
        assert options["send_default_pii"] is False and options["before_send"] is scrub_event
        assert options["max_request_body_size"] == "never"
    finally:
        sentry_sdk.get_client().close(timeout=0)
