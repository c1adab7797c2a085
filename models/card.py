"""The model card: what a stored model is, how it was made, how good it is.

Validated when training saves a model and again when the service loads one, so
a model with a missing, inconsistent or tampered card never serves.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

CARD_SCHEMA_VERSION = 1
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


class TestMetrics(_Strict):
    """Held-out test split metrics; the test split never steered training."""

    n_images: int = Field(gt=0)
    accuracy: Probability
    macro_f1: Probability
    macro_roc_auc: Probability | None = None
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    expected_calibration_error: Probability | None = None


class DatasetInfo(_Strict):
    """Where the training data came from and how it was split."""

    source: str  # folder name (never an absolute path of the trainer's machine)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")  # sha256 of file list + class counts
    class_counts: dict[str, int]
    n_images: int = Field(gt=0)
    split_policy: str
    split_seed: int
    split_sizes: dict[str, int]  # train / validation / test


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
    calibration_temperature: float = Field(default=1.0, gt=0.0)
    abstain_threshold: Probability = 0.5  # confidence below this is flagged `uncertain`
    framework_versions: dict[str, str]
    created_at: datetime
    intended_use: str = "Research use only. Not for diagnosis."

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique")
        if self.schema_version != CARD_SCHEMA_VERSION:
            raise ValueError(f"unsupported card schema_version {self.schema_version}")
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
        return self
