"""Fast in-process inference: a traced function with a fixed input signature.

``model.predict`` builds a data pipeline on every call (~90 ms for one image on
2 cores); a ``tf.function`` traced once for ``uint8[None, S, S, 3]`` runs the
same graph in a few milliseconds. Calibration (temperature scaling of the
logits) happens inside the traced function too, and the same pass returns the
layer features that the out-of-distribution score needs
(:mod:`models.ood`), so the score costs no second forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from models.architectures import LOGITS_LAYER, tap_layers


def configure_threads(intra_op: int, inter_op: int) -> None:
    """Set TensorFlow's thread pools (0 = TensorFlow decides); call before the first op.

    A set `intra_op` also caps the BLAS library numpy loaded (the out-of-distribution score's and the
    gate's matrix products): OpenBLAS otherwise starts a thread per core for products as small as
    32x128 by 128x128, whose spinning on a busy machine cost 0.4 core-ms per image (vs 0.01 on one thread).
    """
    from threadpoolctl import threadpool_limits

    tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    if intra_op > 0:
        threadpool_limits(intra_op, user_api="blas")


def logits_model(model: keras.Model) -> keras.Model:
    """The same network, ending at the pre-softmax ``logits`` layer."""
    return keras.Model(model.inputs, model.get_layer(LOGITS_LAYER).output)


class ModelOutputs(NamedTuple):
    """One pass of the served graph over a batch."""

    probabilities: np.ndarray  # (batch, classes), calibrated
    features: np.ndarray  # (batch, sum of feature sizes): each tapped layer, averaged over space


def served_function(
    model: keras.Model, input_size: int, temperature: float, feature_layers: Sequence[str] = ()
) -> tf.types.experimental.PolymorphicFunction:
    """uint8 images (batch, S, S, 3) -> (calibrated probabilities, features), traced once.

    The features are each of `feature_layers` averaged over space and concatenated, in that order
    (none: an empty (batch, 0) array); they come from the same forward pass as the probabilities.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    network = tap_layers(model, tuple(feature_layers))
    spec = tf.TensorSpec([None, input_size, input_size, 3], tf.uint8, name="images")
    inverse_temperature = 1.0 / temperature

    def pooled(tensor: tf.Tensor) -> tf.Tensor:
        tensor = tf.cast(tensor, tf.float32)
        return tf.reduce_mean(tensor, axis=[1, 2]) if tensor.shape.rank == 4 else tensor

    @tf.function(input_signature=[spec], reduce_retracing=True)
    def outputs(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        results = network(tf.cast(images, tf.float32), training=False)
        # Keras hands back a bare tensor when the model has one output (no feature layer tapped).
        *tapped, logits = results if isinstance(results, (list, tuple)) else [results]
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32) * inverse_temperature, axis=-1)
        features = tf.concat([pooled(t) for t in tapped], axis=-1) if tapped else tf.zeros([tf.shape(images)[0], 0])
        return probabilities, features

    return outputs


def probability_function(
    model: keras.Model, input_size: int, temperature: float = 1.0
) -> tf.types.experimental.PolymorphicFunction:
    """The served graph: uint8 images (batch, S, S, 3) -> calibrated probabilities, traced once.

    What other runtimes are converted from (loadtests/runtimes.py): the served graph less its features output.
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
    """Calibrated class probabilities (and features) for batches of RGB uint8 images."""

    def __init__(
        self, model: keras.Model, input_size: int, temperature: float = 1.0, feature_layers: Sequence[str] = ()
    ) -> None:
        self.input_size = input_size
        self.temperature = float(temperature)
        self._fn = served_function(model, input_size, self.temperature, feature_layers)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities of shape (batch, classes) for uint8 images (batch, S, S, 3)."""
        return self.outputs(images).probabilities

    def outputs(self, images: np.ndarray) -> ModelOutputs:
        """Probabilities and features of uint8 images (batch, S, S, 3), from one pass."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(
                f"expected uint8 images of shape (batch, {self.input_size}, {self.input_size}, 3), "
                f"got {images.dtype} {images.shape}"
            )
        probabilities, features = self._fn(tf.convert_to_tensor(images))
        return ModelOutputs(probabilities.numpy(), features.numpy())

    def outputs_in_batches(self, images: np.ndarray, batch_size: int = 64) -> ModelOutputs:
        """:meth:`outputs` over many images, a batch at a time (training-time evaluation)."""
        parts = [self.outputs(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
        return ModelOutputs(*(np.concatenate(arrays) for arrays in zip(*parts, strict=True)))

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Run each batch size once so first requests do not pay graph set-up."""
        for batch_size in batch_sizes:
            self(np.zeros((batch_size, self.input_size, self.input_size, 3), np.uint8))
