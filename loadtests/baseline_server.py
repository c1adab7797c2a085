"""The baseline: the same model served the way the seed projects serve it.

FastAPI, one upload per request, the image decoded, then `model.predict` on
a batch of one, which builds a data pipeline on every call. Nothing is
batched and nothing is traced. `make benchmark` runs it next to the service
so that the gain is measured, not assumed.

    python -m loadtests.baseline_server --model TAG --port 3100
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import uvicorn
from fastapi import FastAPI, File, UploadFile
from fastapi.responses import JSONResponse

from models.preprocessing import ImageDecodeError, decode_image
from models.store import DEFAULT_MODEL_TAG, load_model
from models.tf_environment import prefer_onednn

logger = logging.getLogger(__name__)


def create_app(model_tag: str) -> FastAPI:
    stored = load_model(model_tag)
    model, card = stored.model, stored.card
    app = FastAPI(title="seed-style baseline")

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> JSONResponse:  # noqa: B008 - FastAPI's idiom
        try:
            image = decode_image(file.file.read(), card.input_size)
        except ImageDecodeError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        probabilities = model.predict(image[None], verbose=0)[0]
        best = int(np.argmax(probabilities))
        return JSONResponse({"predicted_class": card.class_names[best], "confidence": float(probabilities[best])})

    @app.get("/readyz")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_TAG, help="model tag (default: %(default)s)")
    parser.add_argument("--port", type=int, default=3100, help="port on 127.0.0.1 (default: %(default)s)")
    args = parser.parse_args(argv)
    prefer_onednn()  # the same TensorFlow kernels as the service: the comparison is about serving
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
