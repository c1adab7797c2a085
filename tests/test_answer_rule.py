"""The one answer rule: the same pixels get the same answer from /predict and inside a slide (analysed by the
engine's workers, processes of their own), with the operator's thresholds (HISTO_ABSTAIN_THRESHOLD,
HISTO_OOD_THRESHOLD) in force on both paths."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from models.prediction import Thresholds, TileClassifier
from slides.analysis import analyze, choose_level
from slides.reader import Slide
from tests.helpers import GRID_TILE, encode, serve_tiny_model, wait_until, write_pyramidal_tiff


@pytest.mark.service
def test_predict_and_a_slide_answer_the_same_pixels_alike_under_the_operators_thresholds(
    reference, tiny_model_tag, tmp_path_factory
):
    slide_path = tmp_path_factory.mktemp("rule") / "grid.tiff"
    write_pyramidal_tiff(slide_path)
    stored = reference.stored
    by_card = analyze(slide_path, stored, tile_size=GRID_TILE)
    scores = np.array([t.prediction.ood_score for t in by_card.tiles])
    confidences = np.array([t.prediction.confidence for t in by_card.tiles])
    # Thresholds that must change answers: every score over the OOD threshold, and an abstain threshold
    # above the least confident tile's confidence.
    operator = Thresholds(abstain=float(min(0.999, confidences.min() + 1e-3)),
                          out_of_distribution=float(scores.min() / 2))
    in_process = analyze(slide_path, stored, tile_size=GRID_TILE, classifier=TileClassifier(stored, operator))
    changed = [a.prediction.reasons != b.prediction.reasons for a, b in zip(by_card.tiles, in_process.tiles,
                                                                              strict=True)]
    assert any(changed), "the chosen thresholds must change some answer, or this test proves nothing"

    settings = {"HISTO_ABSTAIN_THRESHOLD": str(operator.abstain),
                "HISTO_OOD_THRESHOLD": repr(operator.out_of_distribution), "HISTO_WORKERS": "1"}
    for server in serve_tiny_model(tiny_model_tag, tmp_path_factory, "rule-server", **settings):
        uploaded = httpx.post(f"{server.url}/slides", files={"file": ("grid.tiff", slide_path.read_bytes())},
                              timeout=60)
        slide_id = uploaded.json()["slide_id"]
        submitted = httpx.post(f"{server.url}/slides/{slide_id}/analysis", json={"tile_size": GRID_TILE},
                               timeout=30)
        assert submitted.status_code == 202, submitted.text
        assert _wait_for_analysis(server.url, slide_id) == "done"
        features = httpx.get(f"{server.url}/slides/{slide_id}/analysis.geojson", timeout=30).json()["features"]
        in_slide = {tuple(f["geometry"]["coordinates"][0][0]): f["properties"] for f in features}
        level = choose_level(in_process.info, GRID_TILE, stored.card.input_size)
        side = GRID_TILE // int(in_process.info.level_downsamples[level])
        with Slide(slide_path) as slide:
            for tile in in_process.tiles:
                pixels = encode(slide.region(tile.x, tile.y, level, side, side), "PNG")  # what the slide analysed
                predicted = httpx.post(f"{server.url}/predict", files={"file": ("tile.png", pixels)}, timeout=30)
                assert predicted.status_code == 200, predicted.text
                body = predicted.json()
                sliced = in_slide[(tile.x, tile.y)]
                assert body["ood_threshold"] == pytest.approx(operator.out_of_distribution, rel=1e-3)
                assert (body["uncertain"], body["reasons"]) == (sliced["uncertain"], sliced["reasons"])
                assert (body["uncertain"], body["reasons"]) == (tile.prediction.uncertain, tile.prediction.reasons)
                assert body["predicted_class"] == sliced["predicted_class"]


def _wait_for_analysis(url: str, slide_id: str) -> str:
    def ended() -> str | None:
        state = httpx.get(f"{url}/slides/{slide_id}/progress", timeout=10).json()["state"]
        return state if state in ("done", "failed") else None

    return wait_until(ended, "the slide analysis", timeout=240, interval=0.5)
