"""The particleSeg U-Nets (Keras 3, any backend): the paper's custom network, four encoders and a
true U-Net.

Input ``(b, size, size, channels)`` float32, images normalised per particle (mean 0, std 1);
output ``(b, size, size, n_classes)`` float32 softmax probabilities over the label codes (0
background, 1 signal, 2 edge). Keras is imported inside the functions only, so importing this
module is cheap and never loads a backend.

``"custom"`` (the paper's S. Fig. 1.1)
    The Keras example "Image segmentation with a U-Net-like architecture" (Oxford pets), which
    the paper used: an entry ``Conv2D`` stride 2, three down blocks of separable convolutions
    (``2, 4, 8 x base_filters``: 64/128/256 at base 32) ending in a stride-2 max-pool, four up
    blocks of transposed convolutions (``8, 4, 2, 1 x base_filters``) ending in a 2x
    upsampling, 1x1-convolution residuals around every block, a 3x3 softmax convolution. The
    residuals skip within a block only (no encoder-decoder concatenation). ``size`` must be a
    multiple of 16 (one stride-2 entry + three pools: features at ``size / 16``).

``"unet"`` (Ronneberger et al. 2015, not in the paper)
    A true U-Net: the custom network has no encoder-decoder skip connections, so its decoder
    must rebuild the particle's outline from ``size / 16`` features. Here every encoder level's
    output is concatenated into the decoder at the same scale. Encoder: two ``Conv2D`` 3x3 +
    BatchNorm + ReLU per level with ``1, 2, 4 x base_filters`` at ``size, / 2, / 4`` (a 2x2
    max-pool between levels), a bottleneck of ``8 x base_filters`` at ``size / 8``; decoder: a
    ``Conv2DTranspose`` 2x2 stride 2 halving the filters, ``Concatenate`` with the encoder
    level (``up<i>_concat``, fed by ``down<j>_relu2``), two convolutions; a 1x1 softmax
    convolution. Parameters: about ``1880 base_filters^2`` (481 k at base 16, the custom
    network 519 k). ``size`` must be a multiple of 8.

Encoders (the paper's S. Fig. 1.2-1.5: ``densenet121``, ``densenet169``, ``efficientnetb0``,
``resnet101``)
    The ``keras.applications`` network (``include_top=False``, always built with
    ``weights=None``: nothing is ever downloaded) as the down path, wrapped in a sub-model
    named ``"encoder"`` (``model.get_layer("encoder")``, e.g. to freeze it) whose outputs are
    the activations at ``size / 2, / 4, / 8, / 16`` (:data:`SKIP_LAYERS`) and the encoder's
    output at ``size / 32``. The up path: four pix2pix ``upsample`` blocks (``Conv2DTranspose``
    3x3 stride 2 without bias, ``N(0, 0.02)`` kernels, BatchNorm, ReLU) with
    ``128, 64, 32, 16 x base_filters / 32`` filters (the paper's 128/64/32/16 at base 32),
    each concatenated with the skip at its scale, then a ``Conv2DTranspose`` stride 2 to
    ``n_classes`` with softmax at full size. ``size`` must be a multiple of 32.

    These encoders take 3 channels: a 1-channel input is repeated to 3 by a ``Concatenate``
    layer (``"grey_to_rgb"``) inside the model, so the model's input stays ``(size, size, 1)``.
    A fixed ``Rescaling`` (``"imagenet_scale"``) then maps the per-particle standardised values
    to what each encoder's ImageNet weights expect from ``keras.applications.*.preprocess_input``
    (grey taken as a standardised ImageNet pixel): DenseNet ("torch" mode) takes standardised
    values as they are; ResNet ("caffe" mode, BGR, mean subtracted, 0-255) gets ``255 std_c z``;
    EfficientNet (which rescales by 1/255 and normalises inside) gets
    ``255 (mean_c + sqrt(std_c) z)``, the square root standing in for the extra
    ``Rescaling(1 / sqrt(std))`` that Keras adds to EfficientNet only when it is built with
    ``weights="imagenet"`` (absent from a ``weights=None`` build).

``weights``
    A local file only: for an encoder, ImageNet weights in the ``keras.applications`` format
    (``*_notop.h5`` or a ``.weights.h5`` saved from the same application with
    ``include_top=False``), loaded with ``encoder.load_weights``; for ``"custom"``, weights of
    the whole model. A missing file is a :class:`FileNotFoundError`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

__all__ = [
    "ARCHITECTURES",
    "SKIP_LAYERS",
    "build_unet",
    "count_parameters",
    "model_input_size",
]

BN_MOMENTUM = 0.9
"""Batch-norm moving-average momentum of our layers (Keras' default 0.99 needs hundreds of
steps before the inference-mode statistics settle: too slow for a corpus of a few thousand
particles, where validation loss then swung by 2x between epochs and stopped training early)."""

ARCHITECTURES: tuple[str, ...] = (
    "custom",
    "densenet121",
    "densenet169",
    "efficientnetb0",
    "resnet101",
    "unet",
)

# Skip connections per encoder, at size / 2, / 4, / 8, / 16 (checked on Keras 3.15); the
# encoder's own output (size / 32) is the bottleneck.
SKIP_LAYERS: dict[str, tuple[str, ...]] = {
    "densenet121": ("conv1_relu", "pool2_relu", "pool3_relu", "pool4_relu"),
    "densenet169": ("conv1_relu", "pool2_relu", "pool3_relu", "pool4_relu"),
    "efficientnetb0": (
        "block2a_expand_activation",
        "block3a_expand_activation",
        "block4a_expand_activation",
        "block6a_expand_activation",
    ),
    "resnet101": ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block23_out"),
}

_APPLICATIONS = {
    "densenet121": "DenseNet121",
    "densenet169": "DenseNet169",
    "efficientnetb0": "EfficientNetB0",
    "resnet101": "ResNet101",
}

# ImageNet pixel statistics (RGB, fractions of 255), as in keras.applications.imagenet_utils
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# per-channel (scale, offset) of the input Rescaling, None for none (see the module docstring)
_INPUT_SCALE: dict[str, tuple[list[float], list[float]] | None] = {
    "densenet121": None,
    "densenet169": None,
    "efficientnetb0": (
        [255.0 * math.sqrt(s) for s in _IMAGENET_STD],
        [255.0 * m for m in _IMAGENET_MEAN],
    ),
    "resnet101": ([255.0 * s for s in reversed(_IMAGENET_STD)], [0.0, 0.0, 0.0]),
}

# pix2pix up path of the encoder U-Nets at base_filters 32 (deepest first)
_DECODER_FILTERS = (128, 64, 32, 16)


def build_unet(
    arch: str = "custom",
    *,
    size: int = 256,
    channels: int = 1,
    n_classes: int = 3,
    base_filters: int = 32,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
) -> keras.Model:
    """A U-Net ``(b, size, size, channels) -> (b, size, size, n_classes)`` softmax, named
    ``unet_<arch>_<size>``.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        size: image side in pixels; a multiple of 16 for ``"custom"``, of 8 for ``"unet"``, of
            32 for the encoders.
        channels: input channels; 1 or 3 for the encoders.
        n_classes: output classes (3: background, signal, edge).
        base_filters: width: ``"custom"`` uses 1, 2, 4, 8 x ``base_filters`` (32: the paper's
            network, 8: a small fast one); ``"unet"`` 1, 2, 4, 8 x ``base_filters``; the
            encoders' up path scales with it (32: paper).
        weights: a local weights file (see the module docstring); never downloaded.
        seed: ``keras.utils.set_random_seed(seed)`` runs first (it also seeds Python's and
            NumPy's global generators): a seed gives identical initial weights.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    size, channels, n_classes = int(size), int(channels), int(n_classes)
    base_filters = int(base_filters)
    multiple = {"custom": 16, "unet": 8}.get(arch, 32)
    if size < multiple or size % multiple:
        raise ValueError(
            f"size {size} does not fit arch {arch!r}: it must be a positive multiple "
            f"of {multiple} (the network halves the image "
            f"{int(math.log2(multiple))} times)"
        )
    own = arch in ("custom", "unet")  # our networks take any number of channels
    if channels < 1 or (not own and channels not in (1, 3)):
        allowed = ">= 1" if own else "1 or 3"
        raise ValueError(f"channels must be {allowed} for arch {arch!r}, got {channels}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if base_filters < 1:
        raise ValueError(f"base_filters must be >= 1, got {base_filters}")
    path = None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")

    import keras

    keras.utils.set_random_seed(int(seed))
    if arch in ("custom", "unet"):
        build = _custom_unet if arch == "custom" else _true_unet
        model = build(size, channels, n_classes, base_filters)
        if path is not None:
            _load(model, path, f"the {arch} U-Net (size {size}, base_filters {base_filters})")
    else:
        model = _encoder_unet(arch, size, channels, n_classes, base_filters, path)
    return model


def count_parameters(model: keras.Model) -> int:
    """All parameters of ``model``: trainable + non-trainable (BatchNorm statistics included)."""
    return int(model.count_params())


def model_input_size(model: keras.Model) -> tuple[int, int]:
    """``(size, channels)`` of a model whose input is ``(b, size, size, channels)``."""
    shape = model.input_shape
    if not (
        isinstance(shape, tuple)
        and len(shape) == 4
        and all(isinstance(d, int) for d in shape[1:])
        and shape[1] == shape[2]
    ):
        raise ValueError(f"expected one square input (b, size, size, channels), got {shape}")
    return int(shape[1]), int(shape[3])


def _load(model: Any, path: Path, what: str) -> None:
    try:
        model.load_weights(str(path))
    except ValueError as exc:
        detail = str(exc)
        if len(detail) > 400:  # Keras appends the variable's values
            detail = detail[:400] + " ..."
        raise ValueError(f"weights file {path} does not fit {what}: {detail}") from exc


def _custom_unet(size: int, channels: int, n_classes: int, base: int) -> keras.Model:
    """The Keras Oxford-pets U-Net (the paper's custom network), named layers."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, channels), name="image")
    x = layers.Conv2D(base, 3, strides=2, padding="same", name="entry_conv")(inputs)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="entry_bn")(x)
    x = layers.Activation("relu", name="entry_relu")(x)
    previous = x
    for i, filters in enumerate((2 * base, 4 * base, 8 * base), start=1):
        for j in (1, 2):
            x = layers.Activation("relu", name=f"down{i}_relu{j}")(x)
            x = layers.SeparableConv2D(filters, 3, padding="same", name=f"down{i}_sepconv{j}")(x)
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"down{i}_bn{j}")(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"down{i}_pool")(x)
        residual = layers.Conv2D(filters, 1, strides=2, padding="same", name=f"down{i}_residual")(
            previous
        )
        x = layers.Add(name=f"down{i}_add")([x, residual])
        previous = x
    for i, filters in enumerate((8 * base, 4 * base, 2 * base, base), start=1):
        for j in (1, 2):
            x = layers.Activation("relu", name=f"up{i}_relu{j}")(x)
            x = layers.Conv2DTranspose(filters, 3, padding="same", name=f"up{i}_deconv{j}")(x)
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"up{i}_bn{j}")(x)
        x = layers.UpSampling2D(2, name=f"up{i}_upsample")(x)
        residual = layers.UpSampling2D(2, name=f"up{i}_residual_upsample")(previous)
        residual = layers.Conv2D(filters, 1, padding="same", name=f"up{i}_residual")(residual)
        x = layers.Add(name=f"up{i}_add")([x, residual])
        previous = x
    # float32 softmax also under a mixed-precision policy
    outputs = layers.Conv2D(
        n_classes, 3, activation="softmax", padding="same", dtype="float32", name="output"
    )(x)
    return keras.Model(inputs, outputs, name=f"unet_custom_{size}")


def _true_unet(size: int, channels: int, n_classes: int, base: int) -> keras.Model:
    """A Ronneberger U-Net: encoder levels concatenated into the decoder, named layers."""
    import keras
    from keras import layers

    def block(x: Any, filters: int, name: str) -> Any:
        for j in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{j}")(x)
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn{j}")(x)
            x = layers.Activation("relu", name=f"{name}_relu{j}")(x)
        return x

    inputs = keras.Input((size, size, channels), name="image")
    x = inputs
    skips = []
    for i, filters in enumerate((base, 2 * base, 4 * base), start=1):
        x = block(x, filters, f"down{i}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{i}_pool")(x)
    x = block(x, 8 * base, "bottleneck")
    for i, skip in enumerate(reversed(skips), start=1):
        filters = int(skip.shape[-1])
        x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"up{i}_deconv")(x)
        x = layers.Concatenate(axis=-1, name=f"up{i}_concat")([x, skip])
        x = block(x, filters, f"up{i}")
    # float32 softmax also under a mixed-precision policy
    outputs = layers.Conv2D(n_classes, 1, activation="softmax", dtype="float32", name="output")(x)
    return keras.Model(inputs, outputs, name=f"unet_unet_{size}")


def _encoder_unet(
    arch: str, size: int, channels: int, n_classes: int, base: int, path: Path | None
) -> keras.Model:
    """A ``keras.applications`` encoder + pix2pix up path with skip concatenations."""
    import keras
    from keras import layers

    application = getattr(keras.applications, _APPLICATIONS[arch])(
        include_top=False, weights=None, input_shape=(size, size, 3)
    )
    if path is not None:
        _load(
            application,
            path,
            f"the {_APPLICATIONS[arch]} encoder (include_top=False, input {size}x{size}x3)",
        )
    outputs = [application.get_layer(name).output for name in SKIP_LAYERS[arch]]
    outputs.append(application.output)
    encoder = keras.Model(application.input, outputs, name="encoder")

    inputs = keras.Input((size, size, channels), name="image")
    x = inputs
    if channels == 1:
        x = layers.Concatenate(axis=-1, name="grey_to_rgb")([x, x, x])
    input_scale = _INPUT_SCALE[arch]
    if input_scale is not None:
        scale, offset = input_scale
        # Rescaling broadcasts per-channel lists; Keras types them as float
        x = layers.Rescaling(scale, offset, name="imagenet_scale")(x)  # pyright: ignore[reportArgumentType]
    *skips, x = encoder(x)
    for i, (filters, skip) in enumerate(
        zip(_DECODER_FILTERS, reversed(skips), strict=True), start=1
    ):
        x = layers.Conv2DTranspose(
            max(1, filters * base // 32),
            3,
            strides=2,
            padding="same",
            use_bias=False,
            # Keras types it as str; an Initializer instance is accepted
            kernel_initializer=keras.initializers.RandomNormal(0.0, 0.02),  # pyright: ignore[reportArgumentType]
            name=f"up{i}_deconv",
        )(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"up{i}_bn")(x)
        x = layers.Activation("relu", name=f"up{i}_relu")(x)
        x = layers.Concatenate(axis=-1, name=f"up{i}_concat")([x, skip])
    outputs = layers.Conv2DTranspose(
        n_classes,
        3,
        strides=2,
        padding="same",
        activation="softmax",
        dtype="float32",
        name="output",
    )(x)
    return keras.Model(inputs, outputs, name=f"unet_{arch}_{size}")
