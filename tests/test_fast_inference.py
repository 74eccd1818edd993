"""The fast prediction path (issue 15, "Speed") against a straightforward reference computation.

What ``particleseg clean`` and ``segment`` run: the resize by taps (``resize_images_taps``), the
plane removal from background moments (``predict._plane_removed``), the network through an
engine (``model.inference``: ONNX Runtime or Keras), only the signal map resized back when the
edge is derived from it. The reference is the previous implementation written out plainly:
the resize as matrix products (``resize_images``), the plane through the background rows'
pseudo-inverse, ``predict_on_batch``, all three maps resized back, the 11 x 11 dilation by
SciPy. Labels must agree on every pixel here (>= 99.9 % is the issue's bar for an engine that
rounds differently), the centred score to float32 rounding.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from particleseg_model.corpus.labels import resize_images, resize_images_taps
from particleseg_model.model import inference, predict
from particleseg_model.model.predict import (
    BG_RADIUS_FRACTION,
    central_disc,
    normalise_for_model,
    predict_labels_and_centre,
    stack_scale,
)

SIZE = 16  # the test networks' input: particles of 32 and 40 px are resized both ways


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch) -> None:
    """Every test exports into a cache of its own, never the user's."""
    monkeypatch.setenv(inference.CACHE_ENV, str(tmp_path / "onnx-cache"))
    monkeypatch.delenv(inference.ENGINE_ENV, raising=False)


def particles(n: int, box: int, seed: int = 0, mean: float = 0.0, sd: float = 1.0) -> np.ndarray:
    """Bright discs of random radius and centre on a tilted background, in noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:box, :box] - box / 2
    out = np.empty((n, box, box), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(-box / 8, box / 8, 2)
        radius = rng.uniform(box / 8, box / 3)
        disc = (np.hypot(y - cy, x - cx) < radius) * rng.uniform(1.0, 3.0)
        tilt = rng.normal(0, 0.02) * x + rng.normal(0, 0.02) * y
        out[i] = mean + sd * (disc + tilt + rng.normal(0, 0.7, (box, box)))
    return out


# ------------------------------------------------------------------------------ reference


def reference_normalise(images: np.ndarray, scale: float | None) -> np.ndarray:
    """The plane through the background rows by their pseudo-inverse (float64), then the mean
    removed and the spread (or ``scale``) divided: the original implementation."""
    n, box, _ = images.shape
    y, x = np.mgrid[:box, :box]
    y = (y - box // 2).astype(np.float64).ravel()
    x = (x - box // 2).astype(np.float64).ravel()
    background = x**2 + y**2 > (BG_RADIUS_FRACTION * box) ** 2
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    flat = images.reshape(n, -1).astype(np.float64)
    coef = flat[:, background] @ np.linalg.pinv(design[background]).T
    flat = flat - coef @ design.T
    flat = flat - flat.mean(axis=1, keepdims=True)
    spread = flat.std(axis=1, keepdims=True) if scale is None else scale
    return (flat / spread).reshape(images.shape).astype(np.float32)


AT_MODEL_SIZE = hasattr(predict, "model_input")
"""Whether ``predict`` normalises the images after resizing them to the model's size (the
training loader's order since it changed) or at the particles' box first: the reference
follows the library, the pieces under test are the same either way."""


def fast_labels(
    network, images: np.ndarray, scale: float | None, edge_from_signal: bool, batch: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """``predict_labels_and_centre`` as ``clean`` calls it (``scale`` at the size it is for)."""
    if AT_MODEL_SIZE:
        return predict_labels_and_centre(
            network, images, batch=batch, edge_from_signal=edge_from_signal, scale=scale
        )
    return predict_labels_and_centre(
        network,
        normalise_for_model(images, scale=scale),
        batch=batch,
        edge_from_signal=edge_from_signal,
    )


def reference_labels(
    network, images: np.ndarray, scale: float | None, edge_from_signal: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centred score) the plain way: matrix resizes, every class map resized back,
    SciPy's dilation by an 11 x 11 square for the edge, the argmax with the first class winning
    ties otherwise."""
    size, box = int(network.input_shape[1]), images.shape[1]
    if AT_MODEL_SIZE:
        x = reference_normalise(resize_images(images, size) if box != size else images, scale)
    else:
        x = reference_normalise(images, scale)
        x = resize_images(x, size) if box != size else x
    probs = np.asarray(network.predict_on_batch(x[..., None]), np.float32)
    n, _, _, classes = probs.shape
    maps = probs.transpose(0, 3, 1, 2).reshape(n * classes, size, size)
    if box != size:
        maps = resize_images(maps, box, "bilinear")
    maps = maps.reshape(n, classes, box, box)
    centre = maps[:, 1][:, central_disc(box)].mean(axis=1)
    if edge_from_signal:
        signal = maps[:, 1] > 0.5
        dilated = ndimage.binary_dilation(signal, np.ones((1, 11, 11), bool))
        labels = np.where(signal, 1, np.where(dilated, 2, 0)).astype(np.uint8)
    else:
        labels = maps.argmax(axis=1).astype(np.uint8)
    return labels, centre


def bright_model(size: int = SIZE):
    """A fixed 3 x 3 convolution and softmax: signal where the smoothed image is bright, edge
    on its rim (class maps with large areas on both sides of 0.5)."""
    import keras

    inputs = keras.Input((size, size, 1))
    conv = keras.layers.Conv2D(3, 3, padding="same", activation="softmax")
    network = keras.Model(inputs, conv(inputs))
    kernel = np.zeros((3, 3, 1, 3), np.float32)
    kernel[..., 0, 0] = -0.5
    kernel[..., 0, 1] = 0.5
    kernel[1, 1, 0, 2] = 0.8
    conv.set_weights([kernel, np.array([0.0, -1.0, 0.2], np.float32)])
    return network


def register(network, root: Path, edge_from_signal: bool = True):
    from particleseg_model.model.registry import register_model, staging_dir

    staged = staging_dir(root)
    network.save(staged / "model.keras")
    size = int(network.input_shape[1])
    return register_model(
        root,
        staged,
        {"input_size": size, "arch": "custom", "edge_from_signal": edge_from_signal},
    )


# ------------------------------------------------------------------------------ the pieces


@pytest.mark.parametrize(
    ("box", "size", "method"),
    [(128, 64, "auto"), (96, 48, "area"), (200, 64, "auto"), (40, 16, "auto"),
     (64, 128, "bilinear"), (16, 40, "auto"), (48, 64, "auto"), (37, (20, 50), "auto")],
)  # fmt: skip
def test_resize_by_taps_is_the_matrix_resize(box: int, size, method: str) -> None:
    images = particles(6, box, seed=box)
    fast, plain = resize_images_taps(images, size, method), resize_images(images, size, method)
    assert fast.shape == plain.shape and fast.dtype == np.float32 and fast.flags.c_contiguous
    if isinstance(size, int) and size < box and box % size == 0:
        assert np.array_equal(fast, plain)  # an integer shrink: the same bits
    else:  # one float32 rounding at most (values of order 1-5 here)
        assert np.abs(fast - plain).max() <= 4 * np.finfo(np.float32).eps * np.abs(plain).max()
    flat = np.full((2, box, box), 3.5, np.float32)
    assert np.allclose(resize_images_taps(flat, size, method), 3.5, rtol=0, atol=1e-6)
    assert resize_images_taps(images[0], size, method).shape == plain.shape[1:]


@pytest.mark.parametrize(("mean", "sd"), [(0.0, 1.0), (12.0, 0.0015)])
@pytest.mark.parametrize("box", [64, 33])
def test_plane_removal_from_moments_is_the_pseudo_inverse(box: int, mean: float, sd: float):
    images = particles(40, box, seed=3, mean=mean, sd=sd)
    for scale in (None, sd):
        fast, plain = normalise_for_model(images, scale=scale), reference_normalise(images, scale)
        same = np.mean(fast == plain)
        # float64 sums in another order: at most one float32 rounding, on few pixels; in
        # arbitrary units (a mean 8,000 times the spread) the float64 error is amplified
        assert same >= (0.9999 if mean == 0 else 0.995), same
        assert np.abs(fast - plain).max() <= 4 * np.finfo(np.float32).eps * np.abs(plain).max()
    assert stack_scale(images) == pytest.approx(
        float(np.median(reference_normalise(images, 1.0).reshape(40, -1).std(axis=1))), rel=1e-6
    )


@pytest.mark.parametrize("edge_from_signal", [True, False])
@pytest.mark.parametrize("box", [32, 40, SIZE])
def test_labels_and_centre_agree_with_the_reference(box: int, edge_from_signal: bool) -> None:
    network = bright_model()
    images = particles(48, box, seed=box)
    scale = stack_scale(images, size=SIZE) if AT_MODEL_SIZE else stack_scale(images)
    labels, centre = fast_labels(network, images, scale, edge_from_signal)
    plain, plain_centre = reference_labels(network, images, scale, edge_from_signal)
    assert labels.dtype == np.uint8 and labels.shape == images.shape
    assert {1, 2} <= set(np.unique(labels))  # signal and edge on both sides of the cut
    assert np.mean(labels == plain) >= 0.9999
    assert np.abs(centre - plain_centre).max() <= 1e-6


# ------------------------------------------------------------------------------ engines


def test_keras_engine_and_plain_models_are_the_same_call(tmp_path: Path) -> None:
    version = register(bright_model(), tmp_path / "models")
    engine = inference.load_engine(version, engine="keras")
    assert isinstance(engine, inference.KerasEngine) and engine.input_shape[1:3] == (SIZE, SIZE)
    x = particles(5, SIZE)[..., None]
    assert np.array_equal(
        inference.predict_batch(engine, x), inference.predict_batch(engine.network, x)
    )
    with pytest.raises(ValueError, match="unknown inference engine 'tpu'"):
        inference.load_engine(version, engine="tpu")


onnx_only = pytest.mark.skipif(
    not inference.onnx_available(), reason="ONNX Runtime / tf2onnx not installed (onnx extra)"
)


@onnx_only
def test_onnx_engine_agrees_with_keras_and_is_cached(tmp_path: Path, monkeypatch) -> None:
    from particleseg_model.model.unet import build_unet

    # a true U-Net (batch norm, pooling, transposed convolutions, skip concatenations)
    unet = build_unet("unet", size=SIZE, base_filters=4, seed=1)
    version = register(unet, tmp_path / "models")
    onnx = inference.load_engine(version)  # auto: ONNX Runtime, exported on first use
    assert isinstance(onnx, inference.OnnxEngine) and onnx.input_shape[1:3] == (SIZE, SIZE)
    cached = list(inference.onnx_cache_dir().glob("*.onnx"))
    assert len(cached) == 1 and cached[0].name.startswith(inference.sha256_file(version.model_path))
    x = normalise_for_model(particles(70, SIZE, seed=5))[..., None]
    fast = inference.predict_batch(onnx, x)
    plain = np.asarray(unet.predict_on_batch(x))
    assert fast.shape == plain.shape and fast.dtype == np.float32
    assert np.abs(fast - plain).max() < 1e-5  # float rounding only
    assert np.mean(fast.argmax(-1) == plain.argmax(-1)) >= 0.999

    # the second load takes the cached export: no Keras model is loaded
    def no_keras(*args, **kwargs):
        raise AssertionError("the Keras model was loaded although the export is cached")

    monkeypatch.setattr(inference, "load_model", no_keras)
    again = inference.load_engine(version, engine="onnx")
    assert np.array_equal(inference.predict_batch(again, x), fast)


@onnx_only
def test_an_export_that_fails_falls_back_to_keras_in_one_line(tmp_path, monkeypatch) -> None:
    version = register(bright_model(), tmp_path / "models")

    def broken(network, path):
        raise RuntimeError("unsupported op Foo\nlong traceback")

    monkeypatch.setattr(inference, "export_onnx", broken)
    lines: list[str] = []
    engine = inference.load_engine(version, log=lines.append)
    assert isinstance(engine, inference.KerasEngine)
    assert lines == [
        f"model {version.version}: ONNX export failed (RuntimeError: unsupported op Foo); "
        "running it with Keras"
    ]
    with pytest.raises(inference.ModelError, match="cannot be exported to ONNX"):
        inference.load_engine(version, engine="onnx")
    monkeypatch.setattr(inference, "onnx_available", lambda: False)
    assert isinstance(inference.load_engine(version), inference.KerasEngine)
    with pytest.raises(inference.ModelError, match=r"particleseg\[onnx\]"):
        inference.load_engine(version, engine="onnx")


@onnx_only
def test_an_export_that_computes_something_else_is_never_cached(tmp_path, monkeypatch) -> None:
    version = register(bright_model(), tmp_path / "models")
    other = bright_model()
    other.layers[-1].set_weights([w * 2 for w in other.layers[-1].get_weights()])
    real_export = inference.export_onnx
    monkeypatch.setattr(inference, "export_onnx", lambda network, path: real_export(other, path))
    lines: list[str] = []
    engine = inference.load_engine(version, log=lines.append)
    assert isinstance(engine, inference.KerasEngine)
    assert len(lines) == 1 and "the export's softmax differs from Keras' by" in lines[0]
    assert not list(inference.onnx_cache_dir().glob("*.onnx"))


@onnx_only
def test_an_unwritable_cache_exports_for_the_run_only(tmp_path: Path, monkeypatch) -> None:
    version = register(bright_model(), tmp_path / "models")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv(inference.CACHE_ENV, str(blocker / "onnx"))
    engine = inference.load_engine(version)
    assert isinstance(engine, inference.OnnxEngine)
    assert blocker.is_file()  # nothing cached, and the scratch export is gone again
    assert not list(Path(tempfile.gettempdir()).glob("particleseg-onnx-*"))


def test_the_cache_keeps_the_most_recently_used(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.onnx").write_bytes(b"x")
        os.utime(folder / f"{i}.onnx", (1000 + i, 1000 + i))
    inference._prune(folder, 3)
    assert sorted(p.name for p in folder.glob("*.onnx")) == ["2.onnx", "3.onnx", "4.onnx"]


@onnx_only
def test_clean_scores_are_the_same_with_either_engine(tmp_path: Path, monkeypatch) -> None:
    from edge_inputs import project

    from particleseg_model.cleaning.clean import score_particles

    root = tmp_path / "models"
    register(bright_model(), root)
    star = project(tmp_path / "p", n=40, boxes=(40,))
    tables = {}
    for engine in ("keras", "onnx"):
        monkeypatch.setenv(inference.ENGINE_ENV, engine)
        tables[engine] = score_particles(star, models_root=root, progress=False)[1]
    keras, onnx = tables["keras"], tables["onnx"]
    assert (keras["signal_px"] > 0).sum() > 20
    for column in ("signal_px", "edge_px", "ets"):
        assert keras[column].equals(onnx[column]), column
    assert np.abs(keras["centred"] - onnx["centred"]).max() < 1e-5
