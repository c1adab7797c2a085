"""Metrics, request ids, structured logs, the dashboard and error-tracking scrubbing, against real servers."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import httpx
import pytest

from serving.observability.error_tracking import init_error_tracking, scrub_event
from serving.observability.metrics import METRIC_NAMES
from synthetic.tissue import LUNG_CLASSES
from tests.helpers import STRICT_TOKEN, fresh_tile, metric_delta, metric_samples, post_file, wait_until

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json"


@pytest.mark.service
def test_metrics_count_predictions_rejections_and_timings(server, tiny_model_tag, reference):
    before = metric_samples(server.url)
    counts = zip(LUNG_CLASSES, (3, 2, 1), strict=True)
    tiles = [fresh_tile(name, 700 + index) for name, count in counts for index in range(count)]
    answered = Counter()
    for tile in tiles:
        response = post_file(server.url, tile)
        assert response.status_code == 200
        answered[response.json()["predicted_class"]] += 1
    assert post_file(server.url, b"not an image").status_code == 415
    assert post_file(server.url, fresh_tile("lung_n", 710)[:900]).status_code == 422
    assert post_file(server.url, b"").status_code == 400
    after = metric_samples(server.url)

    assert answered == Counter(reference.predicted_class(tile) for tile in tiles)
    for class_name in LUNG_CLASSES:  # each answer counted under its class, none elsewhere
        counted = metric_delta(before, after, "histopathology_predictions_total", predicted_class=class_name)
        assert counted == answered[class_name], class_name
    assert metric_delta(before, after, "histopathology_rejected_total", reason="format") == 1
    assert metric_delta(before, after, "histopathology_rejected_total", reason="corrupt") == 1
    assert metric_delta(before, after, "histopathology_rejected_total", reason="bad_request") == 1
    assert metric_delta(before, after, "histopathology_decode_seconds_count") == 9  # all 9 uploads, refused ones too
    assert metric_delta(before, after, "histopathology_batch_size_sum") == 6  # only the valid ones reached the model
    assert metric_delta(before, after, "histopathology_inference_seconds_count") >= 1
    name, _, version = tiny_model_tag.partition(":")
    info = {(dict(labels)["name"], dict(labels)["version"]): value for (metric, labels), value in after.items()
            if metric == "histopathology_model_info"}
    assert info == {(name, version): 1.0}


@pytest.mark.service
def test_request_id_round_trips_or_is_generated(server):
    response = httpx.post(f"{server.url}/predict", files={"file": ("t.jpeg", fresh_tile("lung_n", 721))},
                          headers={"X-Request-ID": "trace-42.a"}, timeout=30)
    predicted = response.json()["predicted_class"]
    assert response.headers["x-request-id"] == "trace-42.a"
    generated = httpx.post(f"{server.url}/predict", files={"file": ("t.jpeg", b"")}, timeout=30)
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    unsafe = httpx.get(f"{server.url}/model", headers={"X-Request-ID": "bad id\twith spaces"}, timeout=10)
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])  # not echoed into logs or headers
    line = wait_until(
        lambda: next((line for line in server.log().splitlines() if "id=trace-42.a" in line), None),
        "the request's log line",
    )
    assert f"predicted_class={predicted}" in line


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
    response = httpx.post(f"{strict_server.url}/predict",
                          files={"file": (f"{marker}.jpeg", fresh_tile("lung_scc", 730))}, headers=headers, timeout=30)

    def request_line() -> dict | None:
        ours = [line for line in strict_server.log().splitlines() if line.startswith("{")]
        entries = [json.loads(line) for line in ours]  # every line of ours is JSON
        return next((e for e in entries if e.get("request_id") == "json-check-1"), None)

    line = wait_until(request_line, "the request's JSON log line")
    assert line["route"] == "/predict" and line["status"] == 200
    assert line["predicted_class"] == response.json()["predicted_class"]
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
    exported = {name for name, _ in metric_samples(server.url)}
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
