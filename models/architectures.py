"""Model architectures. Resizing and scaling live INSIDE every model.

Every model takes RGB images with values 0..255 of any height and width
(``(None, None, None, 3)``), resizes them to its input size, scales them as its
backbone expects, and ends in a ``Dense`` layer named ``logits`` followed by a
softmax named ``probabilities``. The named logits layer lets calibration
(temperature scaling) and Grad-CAM reach the pre-softmax outputs.

* ``cnn``: a compact CNN designed for CPU serving (the default: ~0.2 M
  parameters, ~400 images/s in-process on 2 cores at 128x128).
* ``efficientnetb0``: EfficientNetB0 transfer learning. ``weights="imagenet"``
  for users online, fine-tuned in the usual three phases (head, top blocks,
  all layers) at falling rates; ``None`` (random init, offline) trains every
  layer from the start in one phase.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

LOGITS_LAYER = "logits"
ARCHITECTURES = ("cnn", "efficientnetb0")
# The last convolutional activation of each architecture, which Grad-CAM explains
# (for efficientnetb0 it lives inside the nested Keras backbone).
GRADCAM_LAYERS = {"cnn": "block4_relu", "efficientnetb0": "top_activation"}
# Feature maps the out-of-distribution score reads, shallow to deep (models.ood): a feature
# ensemble as in Lee et al. (2018). The deepest layer alone learns only what separates the
# training classes; shallower ones still see texture and colour a new kind of input changes.
OOD_FEATURE_LAYERS = {
    "cnn": ("block1_relu", "block2_relu", "block3_relu", "block4_relu"),
    "efficientnetb0": ("block2b_add", "block4c_add", "block6d_add", "top_activation"),
}
# Small datasets give few steps per epoch; the Keras default (0.99) leaves the
# inference statistics far behind the trained weights for many epochs.
BN_MOMENTUM = 0.9


def _input_block(input_size: int) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    inputs = keras.Input(shape=(None, None, 3), name="image")
    resized = layers.Resizing(input_size, input_size, name="resize")(inputs)
    return inputs, resized


def _classifier_head(features: keras.KerasTensor, num_classes: int, dropout: float) -> keras.KerasTensor:
    x = layers.Dropout(dropout, name="head_dropout")(features)
    logits = layers.Dense(num_classes, name=LOGITS_LAYER)(x)
    return layers.Activation("softmax", dtype="float32", name="probabilities")(logits)


def build_compact_cnn(
    num_classes: int, input_size: int = 128, widths: tuple[int, ...] = (16, 32, 64, 96, 128), dropout: float = 0.25
) -> keras.Model:
    """A small CNN for CPU serving: strided stem, four conv/pool stages, GAP head.

    Tissue classes differ by texture and architecture at several scales, so
    four downsampling stages feed a global average pool. Plain 3x3
    convolutions beat separable ones here: same inference speed on 2 cores at
    this width, and their backward pass trains ~15% faster on CPU.
    """
    inputs, x = _input_block(input_size)
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    x = layers.Conv2D(widths[0], 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate(widths[1:], start=1):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{stage}_conv")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"block{stage}_bn")(x)
        x = layers.ReLU(name=f"block{stage}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{stage}_pool")(x)
    features = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, _classifier_head(features, num_classes, dropout), name="compact_cnn")


def build_efficientnetb0(
    num_classes: int, input_size: int = 224, weights: str | None = None, dropout: float = 0.3
) -> keras.Model:
    """EfficientNetB0 backbone with a new classification head.

    With pretrained ``weights`` the backbone starts frozen and runs in inference
    mode (BatchNormalization keeps its statistics), for the phased fine-tuning of
    :func:`fine_tune_schedule`. Without (``None``, offline), there is nothing to
    preserve: everything trains from the start, BatchNormalization included; a
    frozen random backbone gives constant features and the head never learns
    (measured: loss stuck at ln 3 for 8 epochs).
    Keras' EfficientNet includes its own rescaling/normalisation and expects
    0..255 inputs, so no Rescaling layer is added here.
    """
    inputs, x = _input_block(input_size)
    backbone = keras.applications.EfficientNetB0(
        include_top=False, weights=weights, input_shape=(input_size, input_size, 3), pooling="avg"
    )
    pretrained = weights is not None
    backbone.trainable = not pretrained
    if not pretrained:  # as for the compact CNN: Keras' 0.99 leaves BN statistics behind on small sets
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = BN_MOMENTUM
    features = backbone(x, training=False) if pretrained else backbone(x)
    return keras.Model(inputs, _classifier_head(features, num_classes, dropout), name="efficientnetb0_transfer")


def tap_layers(model: keras.Model, layer_names: tuple[str, ...]) -> keras.Model:
    """The same network from the image to (each named layer's output..., logits).

    Layers of a nested backbone (transfer models) are reached by rebuilding
    image -> resize -> backbone -> head around the backbone.
    """
    logits_layer = model.get_layer(LOGITS_LAYER)
    top_level = {layer.name for layer in model.layers}
    if all(name in top_level for name in layer_names):  # a flat model: every tensor lives in one graph
        return keras.Model(model.inputs, [*(model.get_layer(n).output for n in layer_names), logits_layer.output])
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    inner = keras.Model(backbone.inputs, [*(backbone.get_layer(n).output for n in layer_names), backbone.output])
    image = keras.Input(shape=(None, None, 3))
    *tapped, pooled = inner(model.get_layer("resize")(image))
    return keras.Model(image, [*tapped, logits_layer(pooled)])


def build_model(arch: str, num_classes: int, input_size: int, weights: str | None = None) -> keras.Model:
    """Build an architecture by name (see :data:`ARCHITECTURES`)."""
    if arch == "cnn":
        return build_compact_cnn(num_classes, input_size)
    if arch == "efficientnetb0":
        return build_efficientnetb0(num_classes, input_size, weights=weights)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")


@dataclass(frozen=True)
class FineTunePhase:
    """One phase of transfer learning: what is trainable, at which rate."""

    name: str
    trainable_backbone_layers: int  # counted from the top; 0 = head only, -1 = all
    learning_rate: float
    epoch_fraction: float  # share of the epoch budget


def fine_tune_schedule(base_learning_rate: float) -> tuple[FineTunePhase, ...]:
    """Head only, then the top blocks, then everything, each at a lower rate."""
    return (
        FineTunePhase("head", 0, base_learning_rate, 0.4),
        FineTunePhase("top_blocks", 40, base_learning_rate / 10, 0.35),
        FineTunePhase("all_layers", -1, base_learning_rate / 100, 0.25),
    )


def apply_phase(model: keras.Model, phase: FineTunePhase) -> None:
    """Set which backbone layers train for a fine-tuning phase.

    BatchNormalization layers stay frozen throughout: with small batches
    their statistics would be destroyed (the Keras transfer-learning guide).
    """
    backbone = next((layer for layer in model.layers if isinstance(layer, keras.Model)), None)
    if backbone is None:
        return  # not a transfer model: everything trains
    backbone.trainable = phase.trainable_backbone_layers != 0
    if not backbone.trainable:
        return
    cut = 0 if phase.trainable_backbone_layers < 0 else len(backbone.layers) - phase.trainable_backbone_layers
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= cut and not isinstance(layer, layers.BatchNormalization)
