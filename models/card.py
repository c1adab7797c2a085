"""The model card: what a stored model is, how it was made, how good it is.

Validated when training saves a model and again when the service loads one, so
a model with a missing, inconsistent or tampered card never serves.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.magnification import MagnificationCheck
from models.ood import OutOfDistribution
from models.quality import QualityGate

# 2: the quality gate and the out-of-distribution detector became part of every card.
# 3: the temperature and the abstain threshold live once, in `calibration` and `abstention`
#    (version 2 kept a copy of each at the top level); version-2 cards are migrated on load.
CARD_SCHEMA_VERSION = 3
MIGRATABLE_SCHEMA_VERSIONS = (2,)
CARD_FILE = "card.json"

Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassMetrics(_Strict):
    """Test-split metrics of one class (one-vs-rest where it applies)."""

    precision: Probability
    recall: Probability
    f1: Probability
    false_negative_rate: Probability
    support: int = Field(ge=0)
    roc_auc: Probability | None = None  # None when the class is absent from the test split


class Interval(_Strict):
    """A point estimate with its confidence interval."""

    estimate: float
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low


class ConfidenceIntervals(_Strict):
    """Bootstrap intervals of the test metrics."""

    method: str  # e.g. "percentile bootstrap, resampling near-duplicate groups"
    resamples: int = Field(gt=0)
    level: float = Field(gt=0.0, lt=1.0)
    accuracy: Interval
    macro_f1: Interval
    recall: dict[str, Interval]


class TestMetrics(_Strict):
    """Held-out test split metrics (calibrated); the test split never steered training."""

    n_images: int = Field(gt=0)
    accuracy: Probability
    macro_f1: Probability
    macro_roc_auc: Probability | None = None
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    expected_calibration_error: Probability | None = None
    confidence_intervals: ConfidenceIntervals | None = None


class Calibration(_Strict):
    """Temperature scaling fitted on the validation split; ECE and NLL on the test split."""

    method: str = "temperature scaling"
    fitted_on: str = "validation"
    temperature: float = Field(gt=0.0)  # applied: the service divides the logits by it
    validation_errors: int | None = Field(default=None, ge=0)  # 0: T cannot be fitted and stays 1
    fitted_temperature: float | None = Field(default=None, gt=0.0)  # on the whole validation split
    cross_validated_nll: float | None = Field(default=None, ge=0.0)  # 5-fold, T fitted without each fold
    uncalibrated_nll: float | None = Field(default=None, ge=0.0)  # the same images at T = 1
    gain_standard_error: float | None = Field(default=None, ge=0.0)  # T applied if the gain is >= 2 of these
    test_ece_fitted: Probability | None = None  # what the fitted T gives on test, applied or not
    test_nll_fitted: float | None = Field(default=None, ge=0.0)
    test_ece_before: Probability
    test_ece_after: Probability
    test_nll_before: float = Field(ge=0.0)
    test_nll_after: float = Field(ge=0.0)


class CoveragePoint(_Strict):
    """One point of the risk-coverage curve on the test split."""

    threshold: float
    coverage: Probability
    error_rate: Probability  # among answered images
    worst_cancer_fnr: Probability  # among answered images of each cancer class, the worst


class Abstention(_Strict):
    """How the abstain threshold was chosen, and what it does.

    False-negative rates are among the images the model answers (confidence >=
    threshold); coverage is the share it answers. The rest is referred.
    """

    threshold: Probability
    fnr_target: Probability
    cancer_classes: list[str]
    chosen_on: str = "validation"
    target_met_on_validation: bool
    validation_coverage: Probability
    validation_false_negative_rate: dict[str, Probability]
    test_coverage: Probability
    test_false_negative_rate: dict[str, Probability]
    risk_coverage: list[CoveragePoint] = []  # test split, coverage 100% down to 0%


class SiteMetrics(_Strict):
    """Test metrics on the images of one site (or of the held-out sites together)."""

    site: str
    n_images: int = Field(gt=0)
    accuracy: Probability
    macro_f1: Probability
    worst_cancer_fnr: Probability
    expected_calibration_error: Probability
    accuracy_interval: Interval | None = None  # percentile bootstrap over near-duplicate groups


class SiteShift(_Strict):
    """How the model does on sites it never saw, beside the sites it was trained on."""

    held_out_sites: list[str] = Field(min_length=1)
    in_site_test: list[SiteMetrics]  # the test split, per training site
    held_out: SiteMetrics  # every image of the held-out sites
    accuracy_drop: float  # in-site test accuracy minus held-out accuracy


class DatasetInfo(_Strict):
    """Where the training data came from and how it was split."""

    source: str  # folder name (never an absolute path of the trainer's machine)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")  # sha256 of file list + class counts
    class_counts: dict[str, int]
    n_images: int = Field(gt=0)
    split_policy: str
    split_seed: int
    split_sizes: dict[str, int]  # train / validation / test
    n_groups: int | None = Field(default=None, gt=0)  # near-duplicate groups (see training.grouping)
    largest_group: int | None = Field(default=None, gt=0)
    groups_across_splits: int | None = Field(default=None, ge=0)  # 0: no original on two sides
    tile_size: int | None = Field(default=None, gt=0)  # the training images' most common side, in pixels
    microns_per_pixel: float | None = Field(default=None, gt=0.0)  # of those pixels, when the trainer knows it
    microns_per_pixel_from: str | None = None  # where it was declared: the dataset's dataset.json, or the trainer


class TrainingConfig(_Strict):
    """Hyper-parameters and what the run actually did."""

    epochs_max: int = Field(gt=0)
    epochs_trained: int = Field(ge=0)
    batch_size: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    seed: int
    augmentation: list[str]
    early_stopping_monitor: str
    weights: str | None = None  # initial backbone weights (e.g. "imagenet")
    train_seconds: float = Field(ge=0)


class ModelCard(_Strict):
    """Everything the service and its users need to know about a model."""

    schema_version: int = CARD_SCHEMA_VERSION
    task: str
    class_names: list[str] = Field(min_length=2)  # ordered as the output layer
    input_size: int = Field(ge=16, le=1024)
    architecture: str
    parameter_count: int = Field(gt=0)
    training: TrainingConfig
    dataset: DatasetInfo
    metrics: TestMetrics
    calibration: Calibration  # its temperature divides the logits, in training's evaluation and in the service
    abstention: Abstention  # its threshold: confidence below it is flagged `uncertain`
    quality_gate: QualityGate  # tissue/stain/focus limits, fitted on the training split
    out_of_distribution: OutOfDistribution  # feature-space score and its threshold
    magnification: MagnificationCheck | None = None  # estimated scale and its limits (cards before it: none)
    site_shift: SiteShift | None = None  # when the data declares sites and some were held out
    framework_versions: dict[str, str]
    created_at: datetime
    intended_use: str = "Research use only. Not for diagnosis."

    @property
    def calibration_temperature(self) -> float:
        return self.calibration.temperature

    @property
    def abstain_threshold(self) -> float:
        return self.abstention.threshold

    @model_validator(mode="before")
    @classmethod
    def _known_schema(cls, data: object) -> object:
        # Before field validation: an old card should say "retrain" (or be migrated), not list missing fields.
        if not isinstance(data, dict):
            return data
        version = data.get("schema_version", CARD_SCHEMA_VERSION)
        if version in MIGRATABLE_SCHEMA_VERSIONS:
            return _from_version_2(data)
        if version != CARD_SCHEMA_VERSION:
            raise ValueError(
                f"unsupported card schema_version {version} (this service reads {CARD_SCHEMA_VERSION}; "
                "a model from before the out-of-distribution gate must be retrained: `make model`)"
            )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique")
        if self.quality_gate.input_size != self.input_size:
            raise ValueError("quality_gate.input_size differs from input_size")
        names = set(self.class_names)
        if set(self.metrics.per_class) != names:
            raise ValueError("metrics.per_class must cover exactly class_names")
        if set(self.dataset.class_counts) != names:
            raise ValueError("dataset.class_counts must cover exactly class_names")
        n = len(self.class_names)
        matrix = self.metrics.confusion_matrix
        if len(matrix) != n or any(len(row) != n for row in matrix):
            raise ValueError(f"confusion_matrix must be {n}x{n}")
        if sum(map(sum, matrix)) != self.metrics.n_images:
            raise ValueError("confusion_matrix does not add up to metrics.n_images")
        if not set(self.abstention.cancer_classes) <= names:
            raise ValueError("abstention.cancer_classes must be among class_names")
        if self.magnification and len(self.magnification.weights) != sum(self.out_of_distribution.feature_dims):
            raise ValueError("magnification.weights must have one weight per out-of-distribution feature")
        return self


def _from_version_2(card: dict) -> dict:
    """A version-2 card as version 3: its top-level copies of the temperature and threshold dropped.

    A version-2 card always carried `calibration` and `abstention` with the same values (its
    validator enforced it); a card where they differ was tampered with and is refused.
    """
    copies = {
        "calibration_temperature": ("calibration", "temperature"),
        "abstain_threshold": ("abstention", "threshold"),
    }
    for copy, (section, key) in copies.items():
        if copy in card and card.get(section) and card[section].get(key) != card[copy]:
            raise ValueError(f"{section}.{key} differs from {copy}")
    migrated = {key: value for key, value in card.items() if key not in copies}
    return {**migrated, "schema_version": CARD_SCHEMA_VERSION}
