"""The one answer rule: the same pixels get the same answer from /predict and inside a slide (analysed by the
engine's workers, processes of their own), with the operator's thresholds (HISTO_ABSTAIN_THRESHOLD,
HISTO_OOD_THRESHOLD) in force on both paths."""

from __future__ import annotations

from dataclasses import replace

import httpx
import numpy as np
import pytest

from models.prediction import Thresholds, TileClassifier
from slides.analysis import analyze, choose_level
from slides.reader import Slide
from tests.helpers import GRID_MPP, GRID_TILE, encode, serve_tiny_model, wait_until, write_pyramidal_tiff


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
    operator = replace(Thresholds.resolve(stored.card), abstain=float(min(0.999, confidences.min() + 1e-3)),
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


@pytest.mark.service
def test_a_slide_tile_and_its_pixels_sent_with_their_mpp_are_resampled_alike(server, reference, tmp_path):
    """No tile size given: the slide is tiled at the card's pixel size, and each tile is resampled as an upload
    sent with its `mpp` is (one function); /predict then answers its pixels exactly as the slide did."""
    slide_path = tmp_path / "grid.tiff"
    write_pyramidal_tiff(slide_path)
    stored = reference.stored
    card = stored.card
    field = card.dataset.tile_size * card.dataset.microns_per_pixel
    analysis = analyze(slide_path, stored)
    assert analysis.tile_size == round(field / GRID_MPP) and analysis.tiles  # cut at the model's field of view
    downsample = analysis.info.level_downsamples[analysis.level]
    side = round(analysis.tile_size / downsample)
    with Slide(slide_path) as slide:
        for tile in analysis.tiles:
            pixels = encode(slide.region(tile.x, tile.y, analysis.level, side, side), "PNG")
            mpp = GRID_MPP * downsample  # the pixel size of the level read
            response = httpx.post(f"{server.url}/predict", files={"file": ("tile.png", pixels)},
                                  data={"mpp": repr(mpp)}, timeout=30)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["rescaling"]["rescaled"] and body["rescaling"]["mpp"] == pytest.approx(mpp)
            np.testing.assert_allclose(list(body["probabilities"].values()),
                                       list(tile.prediction.probabilities.values()), atol=1e-5)
            assert body["reasons"] == tile.prediction.reasons
            assert body["magnification"] == pytest.approx(tile.prediction.magnification, abs=1e-3)


def test_a_magnification_outside_the_cards_limits_is_a_reason():
    from models.prediction import TileEvidence, answer
    from models.quality import QualityReport

    passed = QualityReport(passed=True, failed_checks=[], background_fraction=0.1, stain_fraction=1.0,
                           stain_distance=1.0, saturation=0.4, focus=100.0)
    thresholds = Thresholds(abstain=0.5, out_of_distribution=10.0, magnification=(0.7, 1.4))
    confident = np.array([0.9, 0.05, 0.05])
    for estimate, reasons in ((1.0, []), (0.7, []), (1.4, []), (2.0, ["magnification"]), (0.5, ["magnification"]),
                              (float("nan"), [])):
        prediction = answer(TileEvidence(confident, 1.0, passed, estimate), ["a", "n", "s"], thresholds, "m:1")
        assert prediction.reasons == reasons and prediction.uncertain == bool(reasons), estimate
        shown = None if np.isnan(estimate) else estimate
        assert prediction.magnification == shown
    no_check = Thresholds(abstain=0.5, out_of_distribution=10.0)  # a card from before the check
    assert answer(TileEvidence(confident, 1.0, passed, 2.0), ["a", "n", "s"], no_check, "m:1").reasons == []
