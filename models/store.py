"""Save models into, and load them from, the BentoML model store.

A store entry holds ``model.keras``, ``card.json`` (the validated
:class:`~models.card.ModelCard`) and the evaluation report files. The card is
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

import bentoml
import keras
from pydantic import ValidationError

from models.card import CARD_FILE, ModelCard

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "lung_histopathology"
MODEL_FILE = "model.keras"


class ModelLoadError(RuntimeError):
    """A stored model cannot be served: missing, bad card, or card/model mismatch."""


@dataclass(frozen=True)
class StoredModel:
    """A loaded model with its validated card and its store tag."""

    tag: str
    model: keras.Model
    card: ModelCard
    path: Path


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


def load_model(tag: str = f"{DEFAULT_MODEL_NAME}:latest") -> StoredModel:
    """Load a model from the store and validate its card.

    Raises:
        ModelLoadError: the model is missing, its card is missing or invalid,
            or the card does not match the network's output.
    """
    try:
        entry = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as exc:
        raise ModelLoadError(f"model {tag!r} is not in the BentoML model store; train one with `make model`") from exc
    folder = Path(entry.path)
    tag = str(entry.tag)
    card = read_card(folder)
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise ModelLoadError(f"{MODEL_FILE} is missing from {folder}")
    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as exc:  # Keras raises many types for damaged archives
        raise ModelLoadError(f"cannot load {model_path.name}: {exc}") from exc
    check_card_matches_model(card, model)
    return StoredModel(tag=tag, model=model, card=card, path=folder)
