"""Save models into, and load them from, the BentoML model store.

A store entry holds ``model.keras``, ``card.json`` (the validated
:class:`~models.card.ModelCard`), the out-of-distribution scorer's parameters
(``ood.npz``, named and hashed in the card) and the evaluation report files
(:data:`REPORT_FILES`). The card is
also the entry's BentoML metadata, so ``bentoml models get`` shows it (less its
empty fields: BentoML metadata cannot hold None), and the class names travel
as a label. ``card.json`` is the full record and the one that is validated.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import bentoml
from pydantic import ValidationError

from models.card import CARD_FILE, ModelCard
from models.ood import FeatureScorer

if TYPE_CHECKING:  # keras (and TensorFlow) load only when a model does: `python -m models.store` stays fast
    import keras

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "lung_histopathology"
DEFAULT_MODEL_TAG = f"{DEFAULT_MODEL_NAME}:latest"
MODEL_FILE = "model.keras"
# The evaluation report stored beside the model (written by training.report), with media types.
REPORT_MARKDOWN = "report.md"
REPORT_JSON = "report.json"
REPORT_TEXT = "report.txt"
CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc_curves.png"
RELIABILITY_PNG = "reliability_diagram.png"
OOD_PNG = "ood_detection.png"
RISK_COVERAGE_PNG = "risk_coverage.png"
MAGNIFICATION_PNG = "magnification.png"
REPORT_FILES: dict[str, str] = {
    REPORT_MARKDOWN: "text/markdown; charset=utf-8",
    REPORT_JSON: "application/json",
    REPORT_TEXT: "text/plain; charset=utf-8",
    **{figure: "image/png"
       for figure in (CONFUSION_PNG, ROC_PNG, RELIABILITY_PNG, RISK_COVERAGE_PNG, OOD_PNG, MAGNIFICATION_PNG)},
}


class ModelLoadError(RuntimeError):
    """A stored model cannot be served: missing, bad card, or card/model mismatch."""


@dataclass(frozen=True)
class StoredModel:
    """A loaded model with its validated card and its store tag."""

    tag: str
    model: keras.Model
    card: ModelCard
    path: Path
    ood_scorer: FeatureScorer


def check_card_matches_model(card: ModelCard, model: keras.Model) -> None:
    """Raise ModelLoadError unless the model's output matches the card's classes."""
    outputs = model.outputs[0].shape[-1]
    if outputs != len(card.class_names):
        raise ModelLoadError(f"model has {outputs} outputs but its card lists {len(card.class_names)} classes")


def save_model(
    model: keras.Model,
    card: ModelCard,
    name: str = DEFAULT_MODEL_NAME,
    extra_files: dict[str, Path] | None = None,
) -> str:
    """Save a model, its card and report files as a new store version; return the tag."""
    card = ModelCard.model_validate(card.model_dump())  # re-validate before persisting
    check_card_matches_model(card, model)
    labels = {
        "task": card.task,
        "architecture": card.architecture,
        "classes": ",".join(card.class_names),
    }
    with bentoml.models.create(name, labels=labels, metadata=card.model_dump(mode="json", exclude_none=True)) as entry:
        folder = Path(entry.path)
        model.save(folder / MODEL_FILE)
        (folder / CARD_FILE).write_text(card.model_dump_json(indent=2))
        for filename, source in (extra_files or {}).items():
            shutil.copyfile(source, folder / filename)
    tag = str(entry.tag)
    logger.info("saved %s", tag)
    return tag


def read_card(folder: Path) -> ModelCard:
    """Read and validate ``card.json`` from a store entry folder."""
    path = folder / CARD_FILE
    if not path.is_file():
        raise ModelLoadError(f"model card {CARD_FILE} is missing from {folder}")
    try:
        return ModelCard.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0:3]
        raise ModelLoadError(f"model card is invalid: {' '.join(first)}") from exc


def load_model(tag: str = DEFAULT_MODEL_TAG) -> StoredModel:
    """Load a model from the store and validate its card.

    Raises:
        ModelLoadError: the model is missing, its card is missing or invalid,
            or the card does not match the network's output.
    """
    entry = store_entry(tag)
    return load_model_from(Path(entry.path), str(entry.tag))


def load_model_from(folder: Path, tag: str) -> StoredModel:
    """Load and validate the store entry in `folder` (known to the caller as `tag`)."""
    card = read_card(folder)
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise ModelLoadError(f"{MODEL_FILE} is missing from {folder}")
    import keras

    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as exc:  # Keras raises many types for damaged archives
        raise ModelLoadError(f"cannot load {model_path.name}: {exc}") from exc
    check_card_matches_model(card, model)
    return StoredModel(tag=tag, model=model, card=card, path=folder, ood_scorer=load_ood_scorer(folder, card))


def load_ood_scorer(folder: Path, card: ModelCard) -> FeatureScorer:
    """The out-of-distribution scorer stored beside the model, checked against the card's hash and sizes."""
    ood = card.out_of_distribution
    path = folder / ood.parameters_file
    if not path.is_file():
        raise ModelLoadError(f"{ood.parameters_file} (the out-of-distribution scorer) is missing from {folder}")
    try:
        scorer = FeatureScorer.load(path, ood.parameters_sha256)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"cannot load {ood.parameters_file}: {exc}") from exc
    if scorer.sizes != ood.feature_dims:
        raise ModelLoadError(f"{ood.parameters_file} has layer sizes {scorer.sizes}, the card {ood.feature_dims}")
    return scorer


def store_entry(tag: str) -> bentoml.Model:
    """The store entry a tag points to, in the store BentoML uses (a Bento's own when serving one)."""
    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as exc:
        raise ModelLoadError(f"model {tag!r} is not in the BentoML model store; train one with `make model`") from exc


def resolve_tag(tag: str) -> str:
    """The exact ``name:version`` a tag such as ``name:latest`` points to.

    Raises:
        ModelLoadError: no such model in the store.
    """
    return str(store_entry(tag).tag)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the exact tag a model reference resolves to; with --check, load and validate it first.

    Exit status 1, with the reason on stderr, when the model is absent or cannot serve.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m models.store", description=main.__doc__)
    parser.add_argument("tag", help=f"model reference, e.g. {DEFAULT_MODEL_TAG}")
    parser.add_argument("--check", action="store_true", help="load the model and validate its card")
    parser.add_argument("--path", type=Path, help="with --check: the store entry folder (default: looked up)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            tag = load_model_from(args.path, args.tag).tag if args.path else load_model(args.tag).tag
        else:
            tag = resolve_tag(args.tag)
    except ModelLoadError as exc:
        logger.error("%s", exc)
        return 1
    sys.stdout.write(f"{tag}\n")  # the tag on stdout is the CLI's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
