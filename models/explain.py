"""Grad-CAM (Selvaraju et al., 2017): where in the tile the model looked.

The gradient of one class's logit with respect to the last convolutional
feature map, averaged over space, weights that map's channels; the ReLU of the
weighted sum is the heat map. It is computed at the feature map's resolution
(e.g. 8x8 for the compact CNN at 128 px) and drawn over the tile with a jet
colour map. A traced function with a fixed input signature keeps it at a few
milliseconds per tile on CPU.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from models.architectures import GRADCAM_LAYERS, tap_layers

OVERLAY_ALPHA = 0.45  # share of the colour map where the heat is full
MAX_OVERLAY_SIDE = 2048  # px: larger uploads get an overlay scaled down to this long side


def _feature_and_logits_model(model: keras.Model, architecture: str) -> keras.Model:
    """A model from the image to (last conv feature map, logits)."""
    layer_name = GRADCAM_LAYERS.get(architecture)
    if layer_name is None:
        raise ValueError(f"no Grad-CAM layer known for architecture {architecture!r}")
    return tap_layers(model, (layer_name,))


class GradCam:
    """Heat maps for RGB uint8 tiles of the model's input size."""

    def __init__(self, model: keras.Model, architecture: str, input_size: int) -> None:
        self.input_size = input_size
        network = _feature_and_logits_model(model, architecture)
        spec = tf.TensorSpec([1, input_size, input_size, 3], tf.uint8, name="image")

        @tf.function(input_signature=[spec, tf.TensorSpec([], tf.int32, name="class_index")])
        def _heat_map(image: tf.Tensor, class_index: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                features, logits = network(tf.cast(image, tf.float32), training=False)
                score = logits[0, class_index]
            gradients = tape.gradient(score, features)[0]
            weights = tf.reduce_mean(gradients, axis=(0, 1))
            heat = tf.nn.relu(tf.reduce_sum(features[0] * weights, axis=-1))
            peak = tf.reduce_max(heat)
            return tf.where(peak > 0, heat / peak, heat)

        self._heat_map = _heat_map

    def heat_map(self, image: np.ndarray, class_index: int) -> np.ndarray:
        """Grad-CAM in [0, 1] at the feature map's resolution for one (S, S, 3) uint8 tile."""
        if image.dtype != np.uint8 or image.shape != (self.input_size, self.input_size, 3):
            raise ValueError(f"expected a uint8 ({self.input_size}, {self.input_size}, 3) tile, got {image.shape}")
        return self._heat_map(tf.convert_to_tensor(image[None]), tf.constant(class_index, tf.int32)).numpy()


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map (blue -> cyan -> yellow -> red) for values in [0, 1], as uint8 RGB."""
    v = np.clip(values, 0.0, 1.0, dtype=np.float32)[..., None]
    channels = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (channels * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The heat map upsampled (bilinear) to `image`'s size and blended over it, uint8 RGB."""
    height, width = image.shape[:2]
    upsampled = Image.fromarray((heat * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR)
    weight = np.asarray(upsampled, np.float32)[..., None] / 255.0
    blend = image * (1 - OVERLAY_ALPHA * weight) + jet(weight[..., 0]).astype(np.float32) * (OVERLAY_ALPHA * weight)
    return np.clip(blend, 0, 255).astype(np.uint8)


def fit_within(image: np.ndarray, max_side: int = MAX_OVERLAY_SIDE) -> np.ndarray:
    """`image` scaled down so that its longer side is at most `max_side` (unchanged if it already is)."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)  # 768 px in ~90 ms, ~300 at the default level
    return buffer.getvalue()


@dataclass(frozen=True)
class Explanation:
    heat_map: np.ndarray  # [0, 1], feature-map resolution
    overlay_png: bytes  # the upload (at most MAX_OVERLAY_SIDE) with the heat map over it


def explain(cam: GradCam, model_input: np.ndarray, full_image: np.ndarray, class_index: int) -> Explanation:
    """Grad-CAM of `class_index` for one tile: the map, and its overlay on the full-size upload."""
    heat = cam.heat_map(model_input, class_index)
    return Explanation(heat, png_bytes(overlay(fit_within(full_image), heat)))
