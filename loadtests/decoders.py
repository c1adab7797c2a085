"""`make decoders`: JPEG decoders for the model input, next to the service's, and the decision.

The service decodes with Pillow and libjpeg's DCT-domain scaling (`draft`: a
768-pixel tile decodes at 192 pixels for a 128-pixel model), then resizes as
`models.preprocessing` does. A candidate must give the same answers on
synthetic tiles (identical argmax, max |dp| <= 1e-4 through the served
model) and make the service at least 1.1x faster end to end. A decoder
changes only the decode's share of a request's CPU, so the gain is bounded
by the service's CPU per request (latest `make benchmark`) over that CPU less
what the decoder saves per image.

    python -m loadtests.decoders [--model TAG] [--repeats 300]
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from PIL import Image

from loadtests.inprocess import sample_jpeg, served_model
from loadtests.report import write_section
from loadtests.runtimes import MAX_ABS_DIFFERENCE, SERVICE_CLIENTS, service_core_ms
from models.preprocessing import DecodeLimits, decode_upload
from models.tf_environment import prefer_onednn
from synthetic.tissue import LUNG_CLASSES

logger = logging.getLogger(__name__)

REQUIRED_END_TO_END_GAIN = 1.1
TILES_PER_CLASS = 8
COMMAND = "make decoders"
Decoder = Callable[[bytes, int], np.ndarray]  # JPEG bytes, model input size -> (size, size, 3) uint8


def _resized(image: Image.Image, size: int) -> np.ndarray:
    """The service's resize (models.preprocessing): whole factors by box filter, then bilinear."""
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))


def pillow_service(data: bytes, size: int) -> np.ndarray:
    return decode_upload(data, size, DecodeLimits())[0]


def pillow_full(data: bytes, size: int) -> np.ndarray:
    """Pillow without DCT scaling: what the DCT scaling already saves."""
    with Image.open(io.BytesIO(data)) as image:
        return _resized(image.convert("RGB"), size)


def simplejpeg_scaled(data: bytes, size: int, fast: bool = False) -> np.ndarray:
    import simplejpeg

    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size, min_height=size, fastdct=fast,
                                    fastupsample=fast)
    return _resized(Image.fromarray(pixels), size)


DECODERS: dict[str, Decoder] = {
    "pillow + DCT scaling (the service)": pillow_service,
    "pillow, full decode": pillow_full,
    "simplejpeg + DCT scaling": simplejpeg_scaled,
    "simplejpeg + DCT scaling, fast IDCT and upsampling": lambda data, size: simplejpeg_scaled(data, size, True),
}


@dataclass(frozen=True)
class DecoderResult:
    name: str
    core_ms: float  # process CPU per decode of a 768x768 tile
    max_abs_difference: float  # of the served model's probabilities against the service's decode
    argmax_agrees: bool

    @property
    def agrees(self) -> bool:
        return self.argmax_agrees and self.max_abs_difference <= MAX_ABS_DIFFERENCE


def core_ms(decode: Callable[[], object], repeats: int) -> float:
    for _ in range(min(20, repeats)):
        decode()
    started = time.process_time()
    for _ in range(repeats):
        decode()
    return (time.process_time() - started) * 1000 / repeats


def measure(model_tag: str | None, repeats: int) -> tuple[list[DecoderResult], str]:
    """Every decoder's CPU per tile and its answers against the service's; and the model's tag."""
    prefer_onednn()
    from models.inference import Predictor

    served = served_model(model_tag)
    predict = Predictor(served.model, served.input_size, served.temperature)
    tiles = [sample_jpeg(768, name, seed) for name in LUNG_CLASSES for seed in range(1, TILES_PER_CLASS + 1)]
    reference = predict(np.stack([pillow_service(t, served.input_size) for t in tiles]))
    results = []
    for name, decoder in DECODERS.items():
        probabilities = predict(np.stack([decoder(t, served.input_size) for t in tiles]))
        results.append(DecoderResult(
            name,
            core_ms(lambda decoder=decoder: decoder(tiles[0], served.input_size), repeats),
            float(np.abs(probabilities - reference).max()),
            bool((probabilities.argmax(1) == reference.argmax(1)).all()),
        ))
    return results, served.tag or "(random weights)"


def markdown(results: list[DecoderResult], request_core_ms: float | None, model: str) -> list[str]:
    service = results[0]
    base = request_core_ms if request_core_ms is not None else service.core_ms
    when = datetime.now(UTC).isoformat(timespec="seconds")
    lines = [
        "## JPEG decoders",
        "",
        f"Latest run of `{COMMAND}` ({when}; model `{model}`): a 768x768 JPEG decoded for the model's input, "
        f"answers checked on {len(LUNG_CLASSES) * TILES_PER_CLASS} synthetic tiles through the served model. "
        f"End-to-end bound: the service's {base:.2f} core-ms per request "
        f"({'latest `make benchmark`, ' + str(SERVICE_CLIENTS) + ' clients' if request_core_ms else 'no benchmark'})"
        " over that less what the decoder saves.",
        "",
        "| decoder | core-ms per tile | max abs dp | argmax same | end-to-end bound |",
        "|---|---:|---:|---|---:|",
    ]
    adopted = None
    for r in results:
        gain = base / max(1e-9, base - (service.core_ms - r.core_ms))
        lines.append(f"| {r.name} | {r.core_ms:.3f} | {r.max_abs_difference:.1e} | "
                     f"{'yes' if r.argmax_agrees else 'NO'} | {gain:.2f}x |")
        if r is not service and r.agrees and gain >= REQUIRED_END_TO_END_GAIN and adopted is None:
            adopted = r.name
    verdict = f"adopt {adopted}" if adopted else "keep Pillow with DCT scaling: no agreeing decoder reaches the gain"
    lines += ["", f"Decision: **{verdict}** (required: the same answers and {REQUIRED_END_TO_END_GAIN}x end to end).",
              ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="store tag (default: the latest lung_histopathology)")
    parser.add_argument("--repeats", type=int, default=300, help="decodes timed per decoder (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results, model = measure(args.model, args.repeats)
    logger.info("\n%s", "\n".join(write_section("decoders.md", markdown(results, service_core_ms(), model))))


if __name__ == "__main__":
    main()
