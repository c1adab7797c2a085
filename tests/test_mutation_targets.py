"""Exact checks of the pieces every request crosses, written to kill what `make mutation` found surviving:
the answer rule, the micro-batcher's batching and order, and the gate's and score's arithmetic."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from models.prediction import LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, Thresholds, TileEvidence, answer
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
