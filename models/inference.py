"""Fast in-process inference: a traced function with a fixed input signature.

``model.predict`` builds a data pipeline on every call (~90 ms for one image on
2 cores); a ``tf.function`` traced once for ``uint8[None, S, S, 3]`` runs the
same graph in a few milliseconds. Calibration (temperature scaling of the
logits) happens inside the traced function too.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf

from models.architectures import LOGITS_LAYER


def configure_threads(intra_op: int, inter_op: int) -> None:
    """Set TensorFlow's thread pools (0 = TensorFlow decides); call before the first op."""
    tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op)


def logits_model(model: keras.Model) -> keras.Model:
    """The same network, ending at the pre-softmax ``logits`` layer."""
    return keras.Model(model.inputs, model.get_layer(LOGITS_LAYER).output)


def probability_function(
    model: keras.Model, input_size: int, temperature: float = 1.0
) -> tf.types.experimental.PolymorphicFunction:
    """The served graph: uint8 images (batch, S, S, 3) -> calibrated probabilities, traced once.

    Also what other runtimes are converted from (loadtests/runtimes.py), so they run the same graph.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    logits_net = logits_model(model)
    spec = tf.TensorSpec([None, input_size, input_size, 3], tf.uint8, name="images")
    inverse_temperature = 1.0 / temperature  # a Python float: a constant in the graph, not a captured input

    @tf.function(input_signature=[spec], reduce_retracing=True)
    def probabilities(images: tf.Tensor) -> tf.Tensor:
        logits = logits_net(tf.cast(images, tf.float32), training=False)
        return tf.nn.softmax(tf.cast(logits, tf.float32) * inverse_temperature, axis=-1)

    return probabilities


class Predictor:
    """Calibrated class probabilities for batches of RGB uint8 images."""

    def __init__(self, model: keras.Model, input_size: int, temperature: float = 1.0) -> None:
        self.input_size = input_size
        self.temperature = float(temperature)
        self._fn = probability_function(model, input_size, self.temperature)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities of shape (batch, classes) for uint8 images (batch, S, S, 3)."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(
                f"expected uint8 images of shape (batch, {self.input_size}, {self.input_size}, 3), "
                f"got {images.dtype} {images.shape}"
            )
        return self._fn(tf.convert_to_tensor(images)).numpy()

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Run each batch size once so first requests do not pay graph set-up."""
        for batch_size in batch_sizes:
            self(np.zeros((batch_size, self.input_size, self.input_size, 3), np.uint8))
