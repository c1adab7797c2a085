"""Synthetic whole slides: a pyramid with its pixel size, regions of every class, and a truth that scores."""

from __future__ import annotations

import numpy as np
import pytest

from slides.reader import Slide
from slides.tissue import tissue_mask
from synthetic.slides import (
    CELL,
    GLASS,
    SlideTruth,
    generate_slide,
    plan_regions,
    score,
    tissue_coverage,
    truth_path,
)
from synthetic.tissue import LUNG_CLASSES


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic_slide") / "slide.tiff"
    truth = generate_slide(path, size=6 * CELL, seed=11, microns_per_pixel=0.25, workers=2)
    return path, truth


def test_regions_leave_a_glass_margin_and_give_every_class_a_region():
    cells = plan_regions(14, 14, LUNG_CLASSES, seed=5)
    margin = cells[0] + cells[-1] + [row[0] for row in cells] + [row[-1] for row in cells]
    assert set(margin) == {GLASS}
    assert {label for row in cells for label in row} >= set(LUNG_CLASSES)
    assert cells == plan_regions(14, 14, LUNG_CLASSES, seed=5)  # the seed decides
    assert cells != plan_regions(14, 14, LUNG_CLASSES, seed=6)


def test_the_slide_is_a_pyramid_with_its_pixel_size_and_its_truth_beside_it(small_slide):
    path, truth = small_slide
    assert SlideTruth.load(truth_path(path)) == truth
    with Slide(path) as slide:
        info = slide.info
        assert (info.width, info.height) == (truth.width, truth.height) == (6 * CELL, 6 * CELL)
        assert info.level_downsamples == (1.0, 4.0, 16.0)
        assert info.microns_per_pixel == pytest.approx(0.25)
        # Every cell's pixels are what its truth says: glass is bright and tissue-free, tissue is found.
        for row, labels in enumerate(truth.cells):
            for col, label in enumerate(labels):
                cell = np.asarray(slide.region(col * CELL, row * CELL, 1, CELL // 4, CELL // 4))
                found = tissue_mask(cell).mean()
                if label == GLASS:
                    assert found == 0.0 and cell.mean() > 235
                else:
                    assert found > 0.5, (row, col, label, found)


def _geojson_of(answers: dict[tuple[int, int], str | None], size: int) -> dict:
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature",
         "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + size, y], [x + size, y + size], [x, y + size],
                                                          [x, y]]]},
         "properties": {"uncertain": name is None, "predicted_class": name or "lung_n"}}
        for (x, y), name in answers.items()]}


def test_score_counts_right_uncertain_missed_and_glass_tiles(small_slide):
    _, truth = small_slide
    tissue = {(c * CELL, r * CELL): label for r, row in enumerate(truth.cells) for c, label in enumerate(row)
              if label != GLASS}
    perfect = score(truth, _geojson_of(tissue, CELL), CELL)
    assert perfect["tissue_tiles"] == len(tissue) and perfect["share_correct"] == 1.0
    assert perfect["glass_tiles"] == 36 - len(tissue) and perfect["glass_tiles_skipped_share"] == 1.0
    assert perfect["tissue_coverage"] == perfect["tissue_answered"] == 1.0

    first, second, third = sorted(tissue)[:3]
    wrong = next(name for name in LUNG_CLASSES if name != tissue[first])
    glass = (0, 0)
    flawed = {**tissue, first: wrong, second: None, glass: tissue[third]}
    del flawed[third]
    result = score(truth, _geojson_of(flawed, CELL), CELL)
    assert result["tissue_tiles_correct"] == len(tissue) - 3
    assert (result["tissue_tiles_uncertain"], result["tissue_tiles_not_analysed"]) == (1, 1)
    assert result["accuracy_of_answered"] == pytest.approx((len(tissue) - 3) / (len(tissue) - 2), abs=1e-4)
    assert result["glass_tiles_skipped_share"] == pytest.approx(1 - 1 / (36 - len(tissue)), abs=1e-4)
    assert result["confusion"][tissue[first]][wrong] == 1
    # One tissue tile missed, one uncertain: their area is not covered, and not answered.
    assert result["tissue_coverage"] == pytest.approx((len(tissue) - 1) / len(tissue), abs=1e-4)
    assert result["tissue_answered"] == pytest.approx((len(tissue) - 2) / len(tissue), abs=1e-4)


def test_coverage_counts_the_true_tissue_inside_tiles_of_any_size():
    truth = SlideTruth(["a", "b"], 96, 0.5, [["a", "b"], ["glass", "b"]])  # 3 x 96^2 px of tissue

    def feature(left: int, top: int, right: int, bottom: int, name: str | None) -> dict:
        ring = [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]
        return {"geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"uncertain": name is None, "predicted_class": name or "a"}}

    # Tiles of 144 and 48 px across the cells: a and half of b's column, then a quarter of the lower b, uncertain.
    tiles = {"features": [feature(0, 0, 144, 192, "a"), feature(144, 96, 192, 192, None)]}
    assert tissue_coverage(truth, tiles) == {"tissue_coverage": pytest.approx(5 / 6, abs=1e-3),
                                             "tissue_answered": pytest.approx(2 / 3, abs=1e-3)}
    assert tissue_coverage(SlideTruth(["a"], 96, 0.5, [["glass"]]), tiles)["tissue_coverage"] is None


def test_a_tile_takes_the_label_covering_most_of_it():
    truth = SlideTruth(["a", "b"], 100, 0.5, [["a", "b"], ["glass", "b"]])
    assert truth.label_of(0, 0, 100) == ("a", 1.0)
    assert truth.label_of(40, 0, 100) == ("a", 0.6)
    assert truth.label_of(50, 50, 100) == ("b", 0.5)  # two quarters of b, one of a, one of glass
    assert truth.label_of(0, 100, 100) == ("glass", 1.0)
