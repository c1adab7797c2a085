"""The BentoML service over real HTTP: a `bentoml serve` subprocess with a tiny trained model."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from loadtests.servers import run_server_until_exit
from models.store import load_model
from synthetic.tissue import LUNG_CLASSES
from tests.helpers import PROBLEM, assert_problem, encode, fresh_tile, post_file, temperature_text

pytestmark = pytest.mark.service
REPORT_FIGURES = ("confusion_matrix.png", "roc_curves.png", "reliability_diagram.png", "risk_coverage.png",
                  "ood_detection.png")


def batch_size_histogram(url: str) -> tuple[float, float, float]:
    """(number of model calls, calls with a single image, images) from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "histopathology_batch_size")
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    return (
        samples[("histopathology_batch_size_count", None)],
        samples[("histopathology_batch_size_bucket", "1.0")],
        samples[("histopathology_batch_size_sum", None)],
    )


PREDICTION_FIELDS = {
    "predicted_class", "confidence", "probabilities", "uncertain", "reasons", "out_of_distribution", "ood_score",
    "ood_threshold", "quality", "magnification", "rescaling", "model",
}


def test_curl_style_multipart_classifies_tiles_of_every_class(server, tiny_model_tag, reference):
    stored = reference.stored
    for class_name in LUNG_CLASSES:
        for index in range(4):
            data = fresh_tile(class_name, index)
            response = post_file(server.url, data)
            assert response.status_code == 200, response.text
            body = response.json()
            assert set(body) == PREDICTION_FIELDS
            assert body["model"] == tiny_model_tag
            assert list(body["probabilities"]) == stored.card.class_names
            assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
            assert body["confidence"] == max(body["probabilities"].values())
            assert body["predicted_class"] == max(body["probabilities"], key=body["probabilities"].get)
            # The server's answer is exactly what the model, the score and the gate give in-process.
            expected = reference.expect(data)
            np.testing.assert_allclose(list(body["probabilities"].values()), expected["probabilities"], atol=1e-5)
            assert body["ood_score"] == pytest.approx(expected["ood_score"], abs=1e-3)
            assert body["quality"] == expected["quality"].model_dump()
            assert body["ood_threshold"] == pytest.approx(stored.card.out_of_distribution.threshold, abs=1e-4)
            assert body["out_of_distribution"] == (expected["ood_score"] > stored.card.out_of_distribution.threshold)
            assert body["magnification"] == pytest.approx(expected["magnification"], abs=1e-3)
            assert body["rescaling"] is None  # no mpp sent
            expected_reasons = (
                ["low_confidence"] * (body["confidence"] < stored.card.abstain_threshold)
                + ["out_of_distribution"] * body["out_of_distribution"]
                + expected["quality"].failed_checks
                + ["magnification"] * expected["flagged_magnification"]
            )
            assert body["reasons"] == expected_reasons
            assert body["uncertain"] == bool(expected_reasons)


def test_bentoml_sync_client_gets_the_same_answers(server, reference, tmp_path):
    paths = []
    for class_name in LUNG_CLASSES:
        path = tmp_path / f"{class_name}.jpeg"
        path.write_bytes(fresh_tile(class_name, 10))
        paths.append(path)
    with bentoml.SyncHTTPClient(server.url) as client:
        single = [client.predict(file=path) for path in paths]
        batch = client.predict_batch(file=paths)
        with pytest.raises(bentoml.exceptions.BentoMLException) as rejected:
            client.predict(file=Path(__file__))  # a Python file is not an image
    expected = [reference.predicted_class(path.read_bytes()) for path in paths]
    assert [result["predicted_class"] for result in single] == expected
    assert [result["predicted_class"] for result in batch] == expected  # in the order sent
    for one, many in zip(single, batch, strict=True):
        assert one["probabilities"] == pytest.approx(many["probabilities"], abs=1e-5)
    assert rejected.value.error_code == 415


def test_predict_batch_over_raw_multipart_keeps_order_and_names_the_bad_part(server, reference):
    tiles = [fresh_tile(name, 20 + i) for i, name in enumerate(["lung_scc", "lung_n", "lung_aca", "lung_n"])]
    files = [("file", (f"{i}.jpeg", tile, "image/jpeg")) for i, tile in enumerate(tiles)]
    response = httpx.post(f"{server.url}/predict_batch", files=files, timeout=60)
    assert response.status_code == 200, response.text
    for result, tile in zip(response.json(), tiles, strict=True):  # in the order sent
        np.testing.assert_allclose(
            list(result["probabilities"].values()), reference.expect(tile)["probabilities"], atol=1e-5
        )

    files[2] = ("file", ("2.jpeg", fresh_tile("lung_aca", 22)[:600], "image/jpeg"))  # truncated
    body = assert_problem(httpx.post(f"{server.url}/predict_batch", files=files, timeout=60), 422)
    assert body["detail"].startswith("file[2]:")


def test_model_card_and_builtin_endpoints_answer(server, tiny_model_tag):
    card = httpx.get(f"{server.url}/model", timeout=10).json()
    assert card == json.loads(load_model(tiny_model_tag).card.model_dump_json())
    assert card["class_names"] == list(LUNG_CLASSES) and card["input_size"] == 64
    for probe in ("/healthz", "/livez", "/readyz"):
        assert httpx.get(server.url + probe, timeout=10).status_code == 200, probe
    assert "histopathology_batch_size" in httpx.get(f"{server.url}/metrics", timeout=10).text
    docs = httpx.get(f"{server.url}/docs.json", timeout=10).json()
    assert {"/predict", "/predict_batch", "/explain", "/model", "/model/report", "/model/report/{name}"} <= set(
        docs["paths"]
    )
    # Errors are documented as the service sends them: problem+json, with the statuses it really returns.
    predict_errors = docs["paths"]["/predict"]["post"]["responses"]
    assert {"400", "413", "415", "422", "503", "504"} <= set(predict_errors)
    assert all(list(r["content"]) == [PROBLEM] for status, r in predict_errors.items() if status != "200")
    assert "InvalidArgument" not in docs["components"]["schemas"]
    assert set(docs["components"]["schemas"]["ModelCard"]["properties"]) == set(card)


def test_model_report_is_served_from_the_store_entry(server, tiny_model_tag):
    stored = load_model(tiny_model_tag)
    report = httpx.get(f"{server.url}/model/report/report.md", timeout=10)
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/markdown")
    assert report.text == (stored.path / "report.md").read_text()
    assert temperature_text(stored.card) in report.text
    for figure in REPORT_FIGURES:
        response = httpx.get(f"{server.url}/model/report/{figure}", timeout=10)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content == (stored.path / figure).read_bytes()
    # The page a browser opens: the Markdown rendered, every figure inline, the Markdown linked.
    page = httpx.get(f"{server.url}/model/report", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<table>" in page.text and "![" not in page.text and 'href="report/report.md"' in page.text
    assert temperature_text(stored.card) in page.text
    for figure in REPORT_FIGURES:
        inline = base64.b64encode((stored.path / figure).read_bytes()).decode("ascii")
        assert f'src="data:image/png;base64,{inline}"' in page.text, figure
    # Only report files: not the model, not the card file, no path tricks.
    for name in ("model.keras", "split_manifest.json", "..%2Fcard.json", "nothing.png"):
        assert_problem(httpx.get(f"{server.url}/model/report/{name}", timeout=10), 404)


def test_concurrent_requests_are_batched_and_a_corrupt_one_fails_alone(server, reference):
    calls_before, singles_before, images_before = batch_size_histogram(server.url)
    corrupt_at = 13
    payloads = [fresh_tile(LUNG_CLASSES[i % 3], 100 + i) for i in range(32)]
    payloads[corrupt_at] = payloads[corrupt_at][:700]  # a truncated JPEG inside the burst

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(
                *(client.post("/predict", files={"file": ("t.jpeg", data, "image/jpeg")}) for data in payloads)
            )

    responses = asyncio.run(burst())
    statuses = [response.status_code for response in responses]
    assert statuses[corrupt_at] == 422
    assert statuses[:corrupt_at] + statuses[corrupt_at + 1 :] == [200] * 31
    assert_problem(responses[corrupt_at], 422)
    for i, (response, data) in enumerate(zip(responses, payloads, strict=True)):
        if i != corrupt_at:  # each answer is its own tile's, whatever batch it ran in
            np.testing.assert_allclose(
                list(response.json()["probabilities"].values()), reference.expect(data)["probabilities"],
                atol=1e-5, err_msg=str(i),
            )

    calls, singles, images = batch_size_histogram(server.url)
    assert images - images_before == 31  # the corrupt upload never reached the model
    batched_calls = (calls - calls_before) - (singles - singles_before)
    assert batched_calls >= 1, "no model call held more than one image"
    assert calls - calls_before < 31


def test_an_upload_sent_with_its_mpp_is_resampled_to_the_models_pixel_size(server, reference):
    card = reference.stored.card
    model_mpp = card.dataset.microns_per_pixel  # the tests' 256 px synthetic tiles: 1.5 um (their dataset.json)
    assert model_mpp is not None and card.magnification is not None
    data = fresh_tile("lung_aca", 40)
    plain = reference.expect(data)
    for mpp in (model_mpp / 2, model_mpp, model_mpp * 2):  # at 2x (mirrored to fill), 1x, 0.5x (centre crop)
        response = httpx.post(f"{server.url}/predict", files={"file": ("t.jpeg", data)}, data={"mpp": repr(mpp)},
                              timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["rescaling"] == {"mpp": pytest.approx(mpp), "model_mpp": pytest.approx(model_mpp),
                                     "rescaled": True, "scale": pytest.approx(mpp / model_mpp, abs=1e-4)}
        expected = reference.expect(data, mpp)  # the in-process model on the resampled input
        np.testing.assert_allclose(list(body["probabilities"].values()), expected["probabilities"], atol=1e-5)
        assert body["magnification"] == pytest.approx(expected["magnification"], abs=1e-3)
        assert ("magnification" in body["reasons"]) == expected["flagged_magnification"]
        # Only the tile's own pixel size leaves it as a plain upload is: the others change what the model sees.
        same = np.allclose(expected["probabilities"], plain["probabilities"], atol=1e-6)
        assert same == (mpp == model_mpp), mpp

    batch = httpx.post(f"{server.url}/predict_batch", files=[("file", ("a.jpeg", data)), ("file", ("b.jpeg", data))],
                       data={"mpp": repr(model_mpp * 2)}, timeout=60)
    assert batch.status_code == 200, batch.text
    expected = reference.expect(data, model_mpp * 2)["probabilities"]
    for body in batch.json():
        assert body["rescaling"]["scale"] == pytest.approx(2.0)
        np.testing.assert_allclose(list(body["probabilities"].values()), expected, atol=1e-5)
    explained = httpx.post(f"{server.url}/explain", files={"file": ("t.jpeg", data)},
                           data={"mpp": repr(model_mpp * 2)}, timeout=60)
    assert explained.status_code == 200, explained.text
    body = explained.json()
    assert body["rescaling"]["rescaled"]
    np.testing.assert_allclose(list(body["probabilities"].values()), expected, atol=1e-5)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.size == (card.input_size, card.input_size)  # drawn on what the model saw


@pytest.mark.parametrize("route", ["/predict", "/predict_batch", "/explain"])
def test_a_bad_mpp_is_a_400_problem(server, route):
    data = fresh_tile("lung_n", 41)
    for value in ("abc", "", "nan", "inf", "1e400", '{"mpp": 1}', "0", "-0.5", "0.01", "25"):
        response = httpx.post(f"{server.url}{route}", files={"file": ("t.jpeg", data)}, data={"mpp": value},
                              timeout=60)
        body = assert_problem(response, 400)
        assert "mpp" in body["detail"], (value, body)
    repeated = httpx.post(f"{server.url}{route}", files={"file": ("t.jpeg", data)}, data={"mpp": ["0.5", "1"]},
                          timeout=60)
    assert "mpp" in assert_problem(repeated, 400)["detail"]
    as_file = httpx.post(f"{server.url}{route}", files=[("file", ("t.jpeg", data)), ("mpp", ("m.txt", b"0.5"))],
                         timeout=60)
    assert "mpp" in assert_problem(as_file, 400)["detail"]
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def _bomb_png() -> bytes:
    # 100 megapixels of 1-bit zeros: a tiny file that would need 300 MB as RGB.
    return encode(Image.new("1", (10_000, 10_000)), "PNG")


def _corrupt_png(tile: Image.Image) -> bytes:
    data = bytearray(encode(tile, "PNG"))
    data[100:400] = bytes(300)  # damage the compressed pixel data
    return bytes(data)


ERROR_TABLE = [
    # (case, payload factory, status) for the rows of the error table (README.md) the decoder covers
    ("zero-byte file", lambda tile: b"", 400),
    ("decompression bomb", lambda tile: _bomb_png(), 413),
    ("plain text", lambda tile: b"hello, this is not an image\n", 415),
    ("pickle", lambda tile: b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.", 415),
    ("svg", lambda tile: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 415),
    ("pdf", lambda tile: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", 415),
    ("gif (outside the allowlist)", lambda tile: encode(tile, "GIF"), 415),
    ("truncated jpeg", lambda tile: encode(tile, "JPEG")[:1000], 422),
    ("corrupt png", _corrupt_png, 422),
]


@pytest.mark.parametrize(("case", "payload", "status"), ERROR_TABLE, ids=[row[0] for row in ERROR_TABLE])
def test_rejected_inputs_get_their_status_as_problem_json(server, tile_image, case, payload, status):
    assert_problem(post_file(server.url, payload(tile_image)), status)
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_declared_content_type_is_ignored_the_bytes_decide(server):
    data = fresh_tile("lung_n", 30)
    for declared in ("image/png", "application/octet-stream"):
        response = post_file(server.url, data, filename="x.png", content_type=declared)
        assert response.status_code == 200, response.text


def test_starting_without_the_model_exits_fast_with_a_clear_message():
    result = run_server_until_exit("service:Histopathology", {"HISTO_MODEL_TAG": "no_such_model:latest"}, 30)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "no_such_model" in output and "could not be found" in output
    assert "Traceback" not in output


def test_a_bad_setting_stops_the_service_with_one_line_naming_it(tiny_model_tag):
    result = run_server_until_exit("service:Histopathology", {"HISTO_MODEL_TAG": tiny_model_tag,
                                                              "HISTO_MAX_BATCH_SIZE": "abc"}, 30)
    assert result.returncode != 0
    output = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert output == ["histopathology service cannot start: HISTO_MAX_BATCH_SIZE='abc' is not an integer: "
                      "it must be an integer, at least 1"], output


def test_starting_with_an_invalid_card_exits_fast_with_a_clear_message(tiny_model_tag, tmp_path):
    # A copy of the store whose card.json is damaged: the service must refuse it.
    home = tmp_path / "bentoml"
    source = Path(bentoml.models.get(tiny_model_tag).path)
    target = home / "models" / source.parent.name / source.name
    shutil.copytree(source, target)
    shutil.copy(source.parent / "latest", target.parent / "latest")
    card = json.loads((target / "card.json").read_text())
    card["class_names"] = card["class_names"][:2]  # no longer matches its metrics and the model
    (target / "card.json").write_text(json.dumps(card))
    env = {"BENTOML_HOME": str(home), "HISTO_MODEL_TAG": tiny_model_tag}
    result = run_server_until_exit("service:Histopathology", env, 30)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "cannot start" in line]
    assert lines and "model card is invalid" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr

