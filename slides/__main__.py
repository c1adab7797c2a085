"""The slide command line: analyse whole slides on this machine, one output folder each.

    python -m slides SLIDE [SLIDE ...] --out DIR [--model TAG] [--tile-size 768]

(`python -m slides.analyze` is the same command.) The model is traced once for
all the slides; a bad slide is logged and stops none of the others; the exit
status says how many failed. A progress bar goes to stderr and one JSON line
per slide (where its outputs are, and how much of its tissue was looked at)
to stdout. For a cohort on a cluster, see `python -m slides.cohort`.
"""


from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from config.settings import load_settings_or_exit
from models.prediction import Thresholds, TileClassifier
from models.store import DEFAULT_MODEL_TAG
from slides.analysis import DEFAULT_MIN_TISSUE, analyze
from slides.outputs import GEOJSON, OVERLAY, SUMMARY, write_outputs
from slides.reader import SlideError

logger = logging.getLogger(__name__)


PRINTED = ("tiles_analysed", "tissue_coverage", "tissue_answered", "scale_declared")  # summary fields on the CLI's line


def _progress_bar(name: str) -> Callable[[int, int], None]:
    """A one-line progress bar on stderr (the CLI's; stdout is for the output paths)."""
    def show(done: int, total: int) -> None:
        filled = round(30 * done / total) if total else 30
        sys.stderr.write(f"\r{name}: [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} tiles")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slides", description=__doc__.splitlines()[0])
    parser.add_argument("slides", type=Path, nargs="+",
                        help="whole-slide images (SVS, NDPI, MRXS, pyramidal TIFF, ...)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for analysis.geojson, overlay.png and summary.json; with several slides, "
                        "one sub-folder per slide, named after it")
    parser.add_argument("--model", default=DEFAULT_MODEL_TAG, help="model tag (default: %(default)s)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="tile side in level-0 pixels (default: the training images' size from the model card, "
                        "rescaled by microns per pixel when the card and the slide both declare it; else 768)")
    parser.add_argument("--min-tissue", type=float, default=DEFAULT_MIN_TISSUE,
                        help="share of a tile that must be tissue for it to be analysed (default: %(default)s)")
    settings = load_settings_or_exit()
    parser.add_argument("--abstain-threshold", type=float, default=settings.abstain_threshold,
                        help="answer `uncertain` below this confidence (default: HISTO_ABSTAIN_THRESHOLD, else the "
                        "model card's)")
    parser.add_argument("--ood-threshold", type=float, default=settings.ood_threshold,
                        help="out-of-distribution score above which a tile is `uncertain` (default: "
                        "HISTO_OOD_THRESHOLD, else the card's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from models.store import load_model

    stored = load_model(args.model)
    card = stored.card
    thresholds = Thresholds.resolve(card, args.abstain_threshold, args.ood_threshold)
    # Traced once for every slide; the trust checks as the service runs them (HISTO_OOD_GATE).
    classifier = TileClassifier(stored, thresholds, trust_checks=settings.ood_gate)
    names = [slide.stem for slide in args.slides]
    if len(set(names)) != len(names):
        parser.error("several slides share a name: their output folders would collide")
    failed = 0
    for slide in args.slides:
        out = args.out / slide.stem if len(args.slides) > 1 else args.out
        try:
            analysis = analyze(slide, stored, args.tile_size, args.min_tissue, progress=_progress_bar(slide.name),
                               classifier=classifier)
        except (SlideError, OSError) as exc:  # one bad slide does not stop the others
            logger.error("%s: %s", slide, exc)
            failed += 1
            continue
        facts = write_outputs(analysis, out, card.abstention.cancer_classes)
        # Where the outputs are and how much tissue was looked at is this command's result: stdout, one JSON
        # line per slide, for scripts.
        files = {"geojson": GEOJSON, "overlay": OVERLAY, "summary": SUMMARY}
        line = {"slide": str(slide), **{key: facts[key] for key in PRINTED},
                **{key: str(out / name) for key, name in files.items()}}
        sys.stdout.write(json.dumps(line) + "\n")
    if failed:
        raise SystemExit(f"{failed} of {len(args.slides)} slides could not be analysed")


if __name__ == "__main__":
    main()
