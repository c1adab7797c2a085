"""Exact checks of the pieces every request crosses, written to kill what `make mutation` found surviving:
the answer rule, the micro-batcher's batching and order, and the gate's and score's arithmetic."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from models.prediction import (
    LOW_CONFIDENCE,
    MAGNIFICATION,
    OUT_OF_DISTRIBUTION,
    Thresholds,
    TileEvidence,
    answer,
    magnification_flagged,
)
from models.quality import QualityReport, Range
from serving.inference.batcher import MicroBatcher

CLASSES = ["a", "b", "c"]
THRESHOLDS = Thresholds(abstain=0.5, out_of_distribution=1.0)

# A batcher that never answers fails the test in this time (not a speed limit: the scenarios take ms).
BATCHER_BOUND_S = 10


def _quality(failed: list[str]) -> QualityReport:
    return QualityReport(passed=not failed, failed_checks=failed, background_fraction=0.1, stain_fraction=0.9,
                         stain_distance=1.5, saturation=0.3, focus=120.0)


@pytest.mark.parametrize(
    ("confidence", "threshold", "ood_score", "ood_threshold", "failed", "reasons"),
    [
        (0.5, 0.5, 1.0, 1.0, [], []),  # at both thresholds: an answer (abstain below, OOD above)
        (0.49, 0.5, 1.0, 1.0, [], [LOW_CONFIDENCE]),
        (0.9, 0.5, 1.0001, 1.0, [], [OUT_OF_DISTRIBUTION]),
        (0.9, 0.5, 0.2, 1.0, ["stain", "blur"], ["stain", "blur"]),
        (0.4, 0.5, 3.0, 1.0, ["background"], [LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, "background"]),
    ],
)
def test_the_answer_rule_gives_every_reason_in_order(confidence, threshold, ood_score, ood_threshold, failed, reasons):
    rest = (1.0 - confidence) / 2
    row = np.array([rest, confidence, rest], np.float32)
    evidence = TileEvidence(row, ood_score, _quality(failed))
    prediction = answer(evidence, CLASSES, Thresholds(abstain=threshold, out_of_distribution=ood_threshold), "m:1")
    assert prediction.reasons == reasons
    assert prediction.uncertain is bool(reasons)
    assert prediction.predicted_class == "b" and prediction.confidence == pytest.approx(confidence)
    assert prediction.out_of_distribution is (ood_score > ood_threshold)
    assert prediction.ood_score == round(ood_score, 4) and prediction.ood_threshold == round(ood_threshold, 4)
    assert prediction.quality == evidence.quality and prediction.model == "m:1"
    assert prediction.probabilities == {name: float(p) for name, p in zip(CLASSES, row, strict=True)}


def test_without_trust_evidence_the_trust_fields_stay_null():
    off = TileEvidence(np.array([0.1, 0.2, 0.7]), float("nan"), None)  # trust checks off
    prediction = answer(off, CLASSES, Thresholds(abstain=0.5, out_of_distribution=1.0), "m:1")
    assert prediction.predicted_class == "c" and prediction.reasons == [] and not prediction.uncertain
    assert prediction.out_of_distribution is None and prediction.ood_score is None and prediction.quality is None
    rounded = answer(TileEvidence(np.array([0.1, 0.2, 0.7]), 0.123456, _quality([])), CLASSES,
                     Thresholds(abstain=0.5, out_of_distribution=2.987654), "m:1")
    assert rounded.ood_score == 0.1235 and rounded.ood_threshold == 2.9877


def test_the_trust_fields_need_both_the_gate_and_the_score():
    row = np.array([0.1, 0.2, 0.7])
    score_only = answer(TileEvidence(row, 0.3, None), CLASSES, THRESHOLDS, "m:1")
    gate_only = answer(TileEvidence(row, float("nan"), _quality([])), CLASSES, THRESHOLDS, "m:1")
    for prediction in (score_only, gate_only):
        assert prediction.out_of_distribution is None and prediction.ood_score is None
        assert prediction.ood_threshold is None and prediction.quality is None


@pytest.mark.parametrize(("estimate", "flagged"), [
    (0.5, False), (2.0, False), (1.0, False),  # both ends and the middle are inside
    (0.4999, True), (2.0001, True), (float("nan"), False),  # no estimate: no check
])
def test_the_magnification_limits_contain_their_ends(estimate, flagged):
    limits = (0.5, 2.0)
    assert magnification_flagged(estimate, limits) is flagged
    assert magnification_flagged(estimate, None) is False
    prediction = answer(TileEvidence(np.array([0.1, 0.2, 0.7]), 0.2, _quality([]), estimate), CLASSES,
                        Thresholds(abstain=0.5, out_of_distribution=1.0, magnification=limits), "m:1")
    assert prediction.reasons == [MAGNIFICATION] * flagged and prediction.uncertain is flagged


def test_the_magnification_is_reported_to_three_decimals():
    evidence = TileEvidence(np.array([0.1, 0.2, 0.7]), 0.2, _quality([]), 1.234567)
    assert answer(evidence, CLASSES, THRESHOLDS, "m:1").magnification == 1.235


def test_a_probability_row_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="expected 3 probabilities, got shape"):
        answer(TileEvidence(np.array([0.5, 0.5]), 1.0, None), CLASSES, THRESHOLDS, "m:1")
    with pytest.raises(ValueError, match="expected 3"):
        answer(TileEvidence(np.ones((1, 3)) / 3, 1.0, None), CLASSES, THRESHOLDS, "m:1")


def test_a_range_contains_its_ends_and_open_sides():
    closed = Range(low=1.0, high=2.0)
    assert closed.contains(1.0) and closed.contains(2.0) and closed.contains(1.5)
    assert not closed.contains(0.999) and not closed.contains(2.001)
    assert Range(low=1.0).contains(1e9) and not Range(low=1.0).contains(0.5)
    assert Range(high=1.0).contains(-1e9) and not Range(high=1.0).contains(1.5)
    assert Range().contains(float("inf"))


def test_batches_take_everything_queued_up_to_the_cap_in_order():
    batches: list[list[int]] = []
    observed: list[int] = []
    delays: list[float] = []

    def record(batch: np.ndarray) -> np.ndarray:
        batches.append([int(v) for v in batch[:, 0]])
        return batch * 10

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(record, max_batch_size=3, observe_batch_size=observed.append,
                               observe_queue_delay=delays.append)
        try:
            # All seven are queued before the consumer first runs: batches of exactly 3, 3 and 1.
            return await asyncio.gather(*(batcher.submit(np.full(2, i)) for i in range(7)))
        finally:
            await batcher.close()

    started = time.monotonic()
    results = asyncio.run(asyncio.wait_for(scenario(), BATCHER_BOUND_S))
    elapsed = time.monotonic() - started
    assert [r.tolist() for r in results] == [[10 * i, 10 * i] for i in range(7)]
    assert batches == [[0, 1, 2], [3, 4, 5], [6]] and observed == [3, 3, 1]
    # The oldest image's wait in each batch: never negative, never longer than the whole scenario.
    assert len(delays) == 3 and all(0 <= delay <= elapsed for delay in delays)


def test_a_batcher_that_never_ran_closes_quietly():
    async def scenario() -> None:
        batcher = MicroBatcher(lambda batch: batch, max_batch_size=2)
        await batcher.close()  # nothing started: nothing to cancel

    asyncio.run(asyncio.wait_for(scenario(), BATCHER_BOUND_S))


def test_a_scorer_file_with_pickled_objects_is_refused(tmp_path):
    from models.ood import FeatureScorer, file_sha256

    path = tmp_path / "ood.npz"
    np.savez(path, scales=np.array([1.0, 2.0], dtype=object))  # loading it would run the unpickler
    with pytest.raises(ValueError, match="allow_pickle"):
        FeatureScorer.load(path, file_sha256(path))


def test_the_ood_score_is_the_largest_scaled_layer_distance():
    from models.ood import FeatureScorer, LayerScorer

    scorer = FeatureScorer(
        layers=(
            LayerScorer(np.eye(2, dtype=np.float32), np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)),
            LayerScorer(np.full((1, 1), 2.0, np.float32), np.array([[2.0]], np.float32)),
            LayerScorer(np.eye(1, dtype=np.float32), np.array([[0.0]], np.float32)),
        ),
        scales=np.array([1.0, 2.0, 4.0], np.float32),
    )
    features = np.array([[0.0, 0.0, 1.0, 2.0], [3.0, 4.0, 0.0, 0.0], [0.0, 8.0, 1.0, 0.0]])
    # Each layer: the distance to its nearest class mean, after the projection; three layers, three slices.
    np.testing.assert_allclose(scorer.layer_distances(features), [[0, 0, 2], [0, 2, 0], [5, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(scorer(features), [0.5, 1.0, 5.0], atol=1e-6)  # one score per row
    assert scorer.sizes == [2, 1, 1]
    with pytest.raises(ValueError, match="expected 4 features, got 5"):
        scorer(np.zeros((1, 5)))


def test_requests_answered_within_their_wait_get_their_answers_and_leave_no_timer_entry():
    async def scenario() -> None:
        batcher = MicroBatcher(lambda batch: batch * 2, max_batch_size=4, max_wait_s=5.0)
        try:
            # One after another: each is answered, and the batcher keeps taking work after every answer.
            for value in range(3):
                assert (await batcher.submit(np.full(2, value))).tolist() == [2 * value, 2 * value]
            assert [r.tolist() for r in await asyncio.gather(*(batcher.submit(np.full(1, v)) for v in (5, 6)))] == [
                [10], [12]]
            # Answered images are dropped from the deadline queue at once, not when their time would be up.
            assert len(batcher._waiting) == 0
        finally:
            await batcher.close()

    asyncio.run(asyncio.wait_for(scenario(), BATCHER_BOUND_S))


def test_the_mean_stain_direction_is_the_unit_vector_of_the_summed_density():
    from models.quality import mean_stain_direction

    density = np.array([[0.5, 1.0, 1.0], [0.5, 1.0, 1.0]])  # sum (1, 2, 2), length 3
    np.testing.assert_allclose(mean_stain_direction(density), [1 / 3, 2 / 3, 2 / 3])
    faint = np.array([[0.003, 0.004, 0.0]])  # a sum far below 1 is still scaled to length 1
    np.testing.assert_allclose(mean_stain_direction(faint), [0.6, 0.8, 0.0])
    np.testing.assert_array_equal(mean_stain_direction(np.zeros((4, 3))), [0.0, 0.0, 0.0])  # no stain: no direction


def test_stain_angles_are_measured_from_the_plane_and_along_it():
    from models.quality import stain_angles

    basis = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)  # the plane z = 0
    density = np.array([[3.0, 4.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.003, 0.0, 0.003], [0.0, -2.0, 0.0]],
                       np.float32)
    off_plane, in_plane = stain_angles(density, basis)
    np.testing.assert_allclose(off_plane, [0.0, 45.0, 90.0, 45.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(in_plane[[0, 1, 3, 4]], [53.130102, 0.0, 0.0, -90.0], atol=1e-4)
    # The angles do not depend on the basis vectors' length, only on the plane and its directions.
    for measured, again in zip((off_plane, in_plane), stain_angles(density, 2 * basis), strict=True):
        np.testing.assert_allclose(again, measured, atol=1e-4)


def test_a_density_along_the_planes_normal_is_90_degrees_off_it_despite_rounding():
    from models.quality import stain_angles

    basis = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], np.float32)
    normal = np.array([0.8, -0.6, 0.0], np.float32)
    # Normalised in float32, some of these come out a rounding step longer than 1: still 90 degrees, not NaN.
    density = (normal[None] * np.linspace(0.01, 3.0, 2_000, dtype=np.float32)[:, None]).astype(np.float32)
    off_plane, _ = stain_angles(density, basis)
    np.testing.assert_allclose(off_plane, 90.0, atol=0.05)


def test_a_pixel_is_stain_only_inside_every_limit_ends_included():
    from models.quality import StainModel, stain_angles, stain_like

    basis = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    # Two pixels at the ends of the in-plane range, and one both at the off-plane limit and the darkest
    # allowed (length 2.25): the limits are set from their own measured angles, so each sits on its limit.
    edges = np.array([[1.0, 0.2, 0.0], [0.2, 1.0, 0.0], [1.5, 1.5, 0.75]], np.float32)
    off, along = stain_angles(edges, np.asarray(basis, np.float32))
    stain = StainModel(basis=basis, max_off_plane_degrees=float(off[2]), in_plane_degrees=(float(along[0]),
                       float(along[1])), max_optical_density=2.25, mean_direction=[0.5, 0.5, 0.7],
                       direction_precision=np.eye(3).tolist())
    inside = np.array([[1.0, 1.0, 0.2]], np.float32)
    assert stain_like(np.concatenate([inside, edges]), stain).tolist() == [True, True, True, True]
    outside_each = np.array([
        [1.0, 1.0, 0.6],  # too far off the plane, inside the rest
        [1.0, 0.1, 0.0],  # below the in-plane range
        [0.1, 1.0, 0.0],  # above it
        [1.6, 1.6, 0.6],  # darker than the limit, inside the rest
    ], np.float32)
    assert stain_like(outside_each, stain).tolist() == [False, False, False, False]


def test_the_stain_grid_samples_every_tile_on_at_most_a_16_by_16_grid():
    from models.quality import STAIN_GRID, stain_grid

    tiles = np.arange(2 * 64 * 64 * 3, dtype=np.uint32).reshape(2, 64, 64, 3).astype(np.uint8)
    step = 64 // STAIN_GRID
    np.testing.assert_array_equal(stain_grid(tiles), tiles[:, ::step, ::step].reshape(2, -1, 3))
    assert stain_grid(tiles).shape == (2, STAIN_GRID * STAIN_GRID, 3)
    np.testing.assert_array_equal(stain_grid(tiles[0]), tiles[0, ::step, ::step].reshape(-1, 3))  # one tile
    small = tiles[:, :20, :20]  # fewer than two pixels per grid cell: every pixel
    np.testing.assert_array_equal(stain_grid(small), small.reshape(2, -1, 3))
    for oblong in (tiles[:, :32, :], tiles[:, :, :32]):  # the shorter side sets the step, whichever it is
        np.testing.assert_array_equal(stain_grid(oblong), oblong[:, ::2, ::2].reshape(2, -1, 3))


def _focus_by_hand(images: np.ndarray) -> np.ndarray:
    """The focus measure spelled out: the grey level on a grid of at most 32 x 32 samples (the shorter side
    sets the step), its 4-neighbour Laplacian, the variance per tile."""
    step = max(1, min(images.shape[1], images.shape[2]) // 32)
    grey = images[:, ::step, ::step].astype(np.float64).mean(axis=-1)
    inner = grey[:, 1:-1, 1:-1]
    laplacian = grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] + grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] - 4 * inner
    return laplacian.reshape(len(images), -1).var(axis=1)


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 40, 40), (2, 70, 100), (1, 100, 70)])
def test_the_focus_measure_is_the_variance_of_the_grey_laplacian(shape):
    from models.quality import focus_measure

    rng = np.random.default_rng()
    images = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    images[..., 0] //= 3  # channels unlike each other: the grey level must weigh all three
    np.testing.assert_allclose(focus_measure(images), _focus_by_hand(images), rtol=1e-4)


def _everything_is_stain():
    from models.quality import StainModel

    return StainModel(basis=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], max_off_plane_degrees=90.0,
                      in_plane_degrees=(-180.0, 180.0), max_optical_density=100.0, mean_direction=[1.0, 0.0, 0.0],
                      direction_precision=np.eye(3).tolist())


def test_the_gate_measures_count_tissue_pixels_of_any_hue():
    from models.quality import measure_batch, optical_density

    white = np.full((6, 64, 64, 3), 255, np.uint8)  # 64 px: the stain grid samples every 4th pixel
    white[1, 0, 0] = (200, 100, 150)  # one tissue pixel on the grid
    white[2, 0:8:4, 0:12:4] = (150, 255, 255)  # six, dense in red only
    white[3, 0, 0:12:4] = (255, 150, 255)  # three, dense in green only
    white[4, 0, 0] = (150, 255, 255)  # one faint one: its density is far shorter than 1
    white[5, 0, 0] = (1, 0, 0)  # one nearly black one, still fully saturated
    measures = measure_batch(white, _everything_is_stain())
    np.testing.assert_allclose(measures["background_fraction"],
                               [1.0, 1 - 1 / 256, 1 - 6 / 256, 1 - 3 / 256, 1 - 1 / 256, 1 - 1 / 256])
    np.testing.assert_allclose(measures["stain_fraction"], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(measures["saturation"], [0.0, 0.5, 105 / 255, 105 / 255, 105 / 255, 1.0], rtol=1e-6)
    # No tissue: no stain direction to measure; one pixel of tissue is enough for one, however faint.
    density = optical_density(np.array([200, 100, 150], np.uint8)).astype(np.float64)
    direction = density / np.linalg.norm(density)
    black = optical_density(np.array([1, 0, 0], np.uint8)).astype(np.float64)
    black_direction = black / np.linalg.norm(black)
    assert measures["stain_distance"][0] == np.inf
    red = np.array([1.0, 0.0, 0.0])  # the stain model's mean direction
    expected = [np.linalg.norm(direction - red), 0.0, np.sqrt(2), 0.0, np.linalg.norm(black_direction - red)]
    np.testing.assert_allclose(measures["stain_distance"][1:], expected, atol=1e-5)


def _gate(focus):
    from models.quality import QualityGate, Range

    return QualityGate(input_size=64, stain=_everything_is_stain(), background_fraction=Range(high=0.5),
                       stain_fraction=Range(), stain_distance=Range(), saturation=Range(), focus=focus,
                       train_pass_rate=1.0, validation_pass_rate=1.0)


def test_the_focus_limits_are_closed_and_either_may_be_absent():
    from models.quality import CHECKS, Range, failed_checks_batch

    focus = np.array([10.0, 20.0, 30.0, 9.99, 30.01])
    columns = {"background_fraction": np.zeros(5), "stain_fraction": np.ones(5), "stain_distance": np.zeros(5),
               "saturation": np.full(5, 0.3), "focus": focus}
    blur, noise = CHECKS.index("blur"), CHECKS.index("noise")
    both = failed_checks_batch(columns, _gate(Range(low=10.0, high=30.0)))
    assert both[:, blur].tolist() == [False, False, False, True, False]
    assert both[:, noise].tolist() == [False, False, False, False, True]
    no_low = failed_checks_batch(columns, _gate(Range(high=30.0)))
    assert no_low[:, blur].tolist() == [False] * 5 and no_low[:, noise].tolist() == both[:, noise].tolist()
    no_high = failed_checks_batch(columns, _gate(Range(low=10.0)))
    assert no_high[:, noise].tolist() == [False] * 5 and no_high[:, blur].tolist() == both[:, blur].tolist()
    assert both.dtype == no_low.dtype == no_high.dtype == bool


def test_a_gate_report_shows_each_measure_to_four_decimals_and_no_distance_without_tissue():
    from models.quality import CHECKS, MEASURES, Range, assess_batch, failed_checks_batch, measure_batch

    tiles = np.full((3, 64, 64, 3), 255, np.uint8)
    tiles[1:] = np.random.default_rng().integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    gate = _gate(Range(low=1.0))
    reports = assess_batch(tiles, gate)
    columns = measure_batch(tiles, gate.stain)
    failed = failed_checks_batch(columns, gate)
    for index, report in enumerate(reports):
        for name in MEASURES:
            value = float(columns[name][index])
            assert getattr(report, name) == (round(value, 4) if np.isfinite(value) else None), (index, name)
        assert report.failed_checks == [check for check, hit in zip(CHECKS, failed[index], strict=True) if hit]
        assert report.passed is (not failed[index].any())
    assert reports[0].stain_distance is None and reports[0].failed_checks == ["background", "blur"]
