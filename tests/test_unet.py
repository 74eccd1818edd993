"""The U-Nets: shapes, the paper's custom network, seeds, encoders, local weights, learning."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from particleseg_model.model.metrics import confusion_matrix, iou_scores
from particleseg_model.model.unet import (
    ARCHITECTURES,
    SKIP_LAYERS,
    build_unet,
    count_parameters,
    model_input_size,
)

keras = pytest.importorskip("keras")

# Keras 3.15 saving TensorFlow variables under NumPy 2 (keras/src/backend/tensorflow/core.py)
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

ENCODERS = [arch for arch in ARCHITECTURES if arch not in ("custom", "unet")]


def _images(n: int, size: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, channels)).astype(np.float32)


def _weights(model) -> list[np.ndarray]:
    return [np.asarray(w) for w in model.get_weights()]


def test_importing_the_module_loads_no_backend() -> None:
    code = (
        "import sys, particleseg_model.model.unet, particleseg_model.model.metrics; "
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.split() == ["False", "False"]


def test_custom_output_is_a_softmax_at_full_size() -> None:
    model = build_unet("custom", size=32, base_filters=4)
    assert model.name == "unet_custom_32"
    assert model_input_size(model) == (32, 1)
    probs = np.asarray(model(_images(3, 32), training=False))
    assert probs.shape == (3, 32, 32, 3) and probs.dtype == np.float32
    assert probs.min() >= 0.0
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)


def test_custom_at_256_base_32_is_the_papers_network() -> None:
    model = build_unet("custom", size=256)
    assert model.output_shape == (None, 256, 256, 3)
    assert model.get_layer("entry_conv").filters == 32
    assert model.get_layer("entry_conv").strides == (2, 2)
    assert [model.get_layer(f"down{i}_sepconv2").filters for i in (1, 2, 3)] == [64, 128, 256]
    assert [model.get_layer(f"up{i}_deconv2").filters for i in (1, 2, 3, 4)] == [256, 128, 64, 32]
    assert model.get_layer("output").filters == 3
    # features at size / 16 between the down and the up path
    assert model.get_layer("down3_add").output.shape == (None, 16, 16, 256)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("SeparableConv2D") == 6 and kinds.count("Conv2DTranspose") == 8
    assert kinds.count("Add") == 7 and kinds.count("BatchNormalization") == 15
    assert count_parameters(model) == 2_058_403
    assert count_parameters(build_unet("custom", size=64, base_filters=8)) == 131_947
    # the Keras Oxford-pets example (160x160x3, 3 classes) prints 2,058,979 / 2,055,203 trainable
    pets = build_unet("custom", size=160, channels=3)
    assert count_parameters(pets) == 2_058_979
    assert sum(int(np.prod(w.shape)) for w in pets.trainable_weights) == 2_055_203


def test_a_seed_gives_identical_initial_weights() -> None:
    first = _weights(build_unet("custom", size=32, base_filters=4, seed=3))
    again = _weights(build_unet("custom", size=32, base_filters=4, seed=3))
    other = _weights(build_unet("custom", size=32, base_filters=4, seed=4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    kernels = [i for i, w in enumerate(first) if w.ndim == 4]
    assert not any(np.array_equal(first[i], other[i]) for i in kernels)
    # encoder + pix2pix decoder too (its N(0, 0.02) kernels included)
    enc = [_weights(build_unet("efficientnetb0", size=32, seed=s)) for s in (7, 7, 8)]
    assert all(np.array_equal(a, b) for a, b in zip(enc[0], enc[1], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(enc[0], enc[2], strict=True))


@pytest.mark.parametrize("arch", ENCODERS)
def test_encoder_unet_takes_one_channel_and_returns_a_softmax(arch: str) -> None:
    model = build_unet(arch, size=64)
    assert model.name == f"unet_{arch}_64"
    assert model_input_size(model) == (64, 1)
    encoder = model.get_layer("encoder")
    # skips at size / 2, / 4, / 8, / 16 and the bottleneck at size / 32
    assert [tuple(t.shape[1:3]) for t in encoder.outputs] == [
        (32, 32),
        (16, 16),
        (8, 8),
        (4, 4),
        (2, 2),
    ]
    for tensor, name in zip(encoder.outputs, SKIP_LAYERS[arch], strict=False):
        assert tensor is encoder.get_layer(name).output
    assert [model.get_layer(f"up{i}_deconv").filters for i in (1, 2, 3, 4)] == [128, 64, 32, 16]
    assert model.get_layer("grey_to_rgb").output.shape == (None, 64, 64, 3)
    probs = np.asarray(model(_images(2, 64), training=False))
    assert probs.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    assert count_parameters(model) > count_parameters(encoder)


def test_three_channel_encoder_input_and_imagenet_scaling() -> None:
    model = build_unet("efficientnetb0", size=32, channels=3, n_classes=2)
    assert model_input_size(model) == (32, 3) and model.output_shape == (None, 32, 32, 2)
    assert "grey_to_rgb" not in [layer.name for layer in model.layers]
    # z = 0 is the ImageNet mean pixel in 0..255; z = 1 is one (square-rooted) std above it
    scale = model.get_layer("imagenet_scale")
    out = np.asarray(scale(np.array([[[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]]], np.float32)))
    np.testing.assert_allclose(out[0, 0, 0], [123.675, 116.28, 103.53], rtol=1e-6)
    np.testing.assert_allclose(
        out[0, 0, 1] - out[0, 0, 0], 255 * np.sqrt([0.229, 0.224, 0.225]), rtol=1e-5
    )


@pytest.mark.parametrize(
    ("arch", "size"), [("densenet121", 48), ("resnet101", 100), ("custom", 40), ("custom", 8)]
)
def test_a_size_the_network_cannot_halve_is_refused(arch: str, size: int) -> None:
    multiple = 16 if arch == "custom" else 32
    with pytest.raises(ValueError, match=f"size {size} .*multiple of {multiple}"):
        build_unet(arch, size=size)


def test_custom_takes_any_multiple_of_16_and_bad_arguments_are_refused() -> None:
    assert build_unet("custom", size=48, base_filters=2).output_shape == (None, 48, 48, 3)
    with pytest.raises(ValueError, match="unknown architecture 'vgg'.*densenet121.*resnet101"):
        build_unet("vgg")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        build_unet("densenet121", size=64, channels=2)


@pytest.mark.parametrize(
    ("arch", "application"), [("densenet121", "DenseNet121"), ("efficientnetb0", "EfficientNetB0")]
)
def test_encoder_weights_load_from_a_local_file(
    tmp_path: Path, arch: str, application: str
) -> None:
    keras.utils.set_random_seed(123)
    reference = getattr(keras.applications, application)(
        include_top=False, weights=None, input_shape=(64, 64, 3)
    )
    for layer in reference.layers:  # EfficientNet's ImageNet statistics, as its .h5 holds them
        if isinstance(layer, keras.layers.Normalization):
            layer.adapt_mean.assign([0.485, 0.456, 0.406])
            layer.adapt_variance.assign(np.square([0.229, 0.224, 0.225]))
            layer.finalize_state()
    path = tmp_path / "w.weights.h5"
    reference.save_weights(path)
    fresh = build_unet(arch, size=64, seed=0).get_layer("encoder")
    loaded = build_unet(arch, size=64, weights=path, seed=0).get_layer("encoder")
    want = [layer for layer in reference.layers if layer.weights]
    got = [layer for layer in loaded.layers if layer.weights]
    assert len(want) == len(got) > 50
    for a, b in zip(want, got, strict=True):
        assert type(a) is type(b)
        assert all(
            np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights(), strict=True)
        ), a.name
    # the loaded encoder computes what the saved network computes (Normalization included)
    x = np.repeat(_images(1, 64), 3, axis=-1)
    np.testing.assert_allclose(
        np.asarray(loaded(x, training=False)[-1]),
        np.asarray(reference(x, training=False)),
        rtol=1e-4,
        atol=1e-5,
    )
    # (without the file the encoder's weights are its own)
    first_conv = next(i for i, layer in enumerate(want) if isinstance(layer, keras.layers.Conv2D))
    kernel = [layer for layer in fresh.layers if layer.weights][first_conv].get_weights()[0]
    assert kernel.shape == want[first_conv].get_weights()[0].shape
    assert not np.array_equal(kernel, want[first_conv].get_weights()[0])


def test_custom_weights_load_the_whole_model(tmp_path: Path) -> None:
    source = build_unet("custom", size=32, base_filters=4, seed=1)
    path = tmp_path / "custom.weights.h5"
    source.save_weights(path)
    loaded = build_unet("custom", size=32, base_filters=4, seed=2, weights=path)
    assert all(
        np.array_equal(a, b) for a, b in zip(_weights(source), _weights(loaded), strict=True)
    )
    with warnings.catch_warnings():  # Keras warns about every variable it could not load
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"custom\.weights\.h5 does not fit"):
            build_unet("custom", size=32, base_filters=8, weights=path)


def test_a_missing_weights_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "imagenet_notop.h5"
    for arch in ("densenet121", "custom"):
        with pytest.raises(FileNotFoundError, match="imagenet_notop.h5"):
            build_unet(arch, size=64, weights=missing)


def test_models_survive_a_keras_save_and_load(tmp_path: Path) -> None:
    x = _images(2, 32)
    for arch in ("custom", "efficientnetb0"):
        model = build_unet(arch, size=32, base_filters=4)
        model.save(tmp_path / f"{arch}.keras")
        again = keras.models.load_model(tmp_path / f"{arch}.keras", compile=False)
        assert again.name == model.name and model_input_size(again) == (32, 1)
        np.testing.assert_allclose(
            np.asarray(again(x, training=False)), np.asarray(model(x, training=False)), atol=1e-6
        )


def test_model_input_size_needs_one_square_input() -> None:
    inputs = keras.Input((32, 16, 1))
    with pytest.raises(ValueError, match="square"):
        model_input_size(keras.Model(inputs, keras.layers.Activation("relu")(inputs)))


def _discs(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy bright discs, normalised per image; labels disc 1, a 2 px ring outside 2, rest 0."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(n):
        radius = rng.uniform(4, 8)
        cy, cx = rng.uniform(size / 2 - 5, size / 2 + 5, 2)
        dist = np.hypot(yy - cy, xx - cx)
        image = (dist <= radius) + rng.normal(0.0, 0.3, (size, size))
        images.append((image - image.mean()) / image.std())
        labels.append(np.where(dist <= radius, 1, np.where(dist <= radius + 2, 2, 0)))
    return np.stack(images)[..., None].astype(np.float32), np.stack(labels).astype(np.uint8)


def test_a_small_custom_unet_learns_synthetic_discs() -> None:
    x, y = _discs(8, 32)
    assert (y == 0).mean() > 0.8  # all-background would score > 0.8: the bar is 0.93
    model = build_unet("custom", size=32, base_filters=8, seed=0)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        jit_compile=False,
    )
    # 600 steps of one batch: the weights fit within ~100, but inference uses BatchNorm's moving
    # statistics (momentum 0.99), which need the rest to catch up
    steps = 600
    model.fit(
        np.tile(x, (steps, 1, 1, 1)),
        np.tile(y, (steps, 1, 1)),
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    pred = np.asarray(model.predict(x, verbose=0)).argmax(axis=-1)
    scores = iou_scores(confusion_matrix(y, pred))
    assert scores["pixel_accuracy"] > 0.93
    assert scores["iou_signal"] > 0.8 and scores["iou_edge"] > 0.5


def test_true_unet_shapes_and_a_parameter_count_like_the_custom_one() -> None:
    model = build_unet("unet", size=32, base_filters=4)
    assert model.name == "unet_unet_32" and model_input_size(model) == (32, 1)
    probs = np.asarray(model(_images(2, 32), training=False))
    assert probs.shape == (2, 32, 32, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    assert build_unet("unet", size=24, base_filters=2).output_shape == (None, 24, 24, 3)
    with pytest.raises(ValueError, match="size 20 .*multiple of 8"):
        build_unet("unet", size=20)
    for base in (8, 16):
        ours = count_parameters(build_unet("unet", size=64, base_filters=base))
        custom = count_parameters(build_unet("custom", size=64, base_filters=base))
        assert 0.7 < ours / custom < 1.3


def test_true_unet_concatenates_every_encoder_level_into_the_decoder() -> None:
    model = build_unet("unet", size=32, base_filters=4)
    concats = [layer for layer in model.layers if isinstance(layer, keras.layers.Concatenate)]
    assert [layer.name for layer in concats] == ["up1_concat", "up2_concat", "up3_concat"]
    for i, layer in enumerate(concats, start=1):
        fed_by = {t._keras_history[0].name for t in layer.input}
        # the decoder's upsampled features and the encoder level at the same scale
        assert fed_by == {f"up{i}_deconv", f"down{4 - i}_relu2"}
        deconv, skip = layer.input
        assert tuple(deconv.shape[1:]) == tuple(skip.shape[1:])
    assert tuple(model.get_layer("down1_relu2").output.shape[1:3]) == (32, 32)


def test_true_unet_trains_a_few_steps_and_the_loss_falls() -> None:
    x, y = _discs(8, 32)
    model = build_unet("unet", size=32, base_filters=4, seed=0)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        jit_compile=False,
    )
    losses = [float(model.train_on_batch(x, y)) for _ in range(15)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.7 * losses[0]
