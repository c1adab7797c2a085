"""How often a stored model's trust checks flag fresh tiles and a folder of images.

Runs the service's own decode, quality gate, traced graph and score in-process
(the service tests prove the server answers the same), so it measures what
`/predict` would answer:

* fresh synthetic tiles the model never saw, drawn by `synthetic.tiles`
  with a seed of your choice (for models trained on the synthetic tiles):
  the share flagged should stay near 1 - the card's target acceptance;
* every image in `--images` (e.g. photographs, other stains, other
  modalities): the share flagged, refused (4xx) or answered.

    python -m training.ood_check --model lung_histopathology:latest --fresh-per-class 150 --seed 101
    python -m training.ood_check --model lung_histopathology:latest --images ~/not-tissue
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from models.prediction import TileClassifier, trust_reasons
from models.preprocessing import ImageDecodeError, decode_image
from models.store import DEFAULT_MODEL_TAG, StoredModel, load_model
from synthetic.tiles import generate_dataset
from training import data

logger = logging.getLogger(__name__)


def flag_reasons(stored: StoredModel, images: np.ndarray) -> list[list[str]]:
    """Per image (N, S, S, 3): the reasons it would be flagged (out_of_distribution, failed checks), in the
    service's order (the answer rule's); empty if not."""
    classifier = TileClassifier(stored)
    threshold = classifier.thresholds.out_of_distribution
    return [trust_reasons(evidence, threshold) for start in range(0, len(images), 64)
            for evidence in classifier.evidence(images[start : start + 64])]


def fresh_tiles(stored: StoredModel, per_class: int, seed: int) -> str:
    """One line: the share of freshly generated synthetic tiles flagged."""
    with tempfile.TemporaryDirectory(prefix="fresh-tiles-") as folder:
        root = generate_dataset(Path(folder), per_class=per_class, seed=seed)
        images = data.load_images(sorted(root.rglob("*.jpeg")), stored.card.input_size)
    reasons = flag_reasons(stored, images)
    flagged = sum(bool(r) for r in reasons)
    counts = Counter(reason for r in reasons for reason in r)
    return (f"fresh synthetic tiles (seed {seed}): {flagged} of {len(images)} flagged "
            f"({100 * flagged / len(images):.2f}%); by reason {dict(counts)}")


def image_folder(stored: StoredModel, folder: Path) -> str:
    """A line per image and a summary: flagged, refused (the 4xx the service would give) or answered."""
    lines, outcomes = [], Counter()
    decoded: dict[str, np.ndarray] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        try:
            decoded[name] = decode_image(path, stored.card.input_size)
        except ImageDecodeError as exc:
            outcomes["refused"] += 1
            lines.append(f"{name}: refused ({type(exc).__name__})")
    if decoded:  # one traced graph and one batch for all of them
        for name, reasons in zip(decoded, flag_reasons(stored, np.stack(list(decoded.values()))), strict=True):
            outcomes["flagged" if reasons else "ANSWERED"] += 1
            lines.append(f"{name}: {', '.join(reasons) if reasons else 'ANSWERED as tissue'}")
    total = sum(outcomes.values())
    caught = outcomes["flagged"] + outcomes["refused"]
    lines.append(f"{folder}: {caught} of {total} flagged or refused ({100 * caught / max(total, 1):.1f}%); "
                 f"{dict(outcomes)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.ood_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_TAG, help="model tag (default: %(default)s)")
    parser.add_argument("--fresh-per-class", type=int, default=0,
                        help="fresh synthetic tiles to draw per class (0: none; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=101, help="seed of the fresh tiles (default: %(default)s)")
    parser.add_argument("--images", type=Path, help="a folder of images to check (searched recursively)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stored = load_model(args.model)
    card = stored.card
    out = [f"model {stored.tag}: OOD threshold {card.out_of_distribution.threshold:.3f} "
           f"(target acceptance {card.out_of_distribution.target_acceptance:.1%})"]
    if args.fresh_per_class:
        out.append(fresh_tiles(stored, args.fresh_per_class, args.seed))
    if args.images:
        out.append(image_folder(stored, args.images))
    sys.stdout.write("\n".join(out) + "\n")  # the report is the command's output


if __name__ == "__main__":
    main()
