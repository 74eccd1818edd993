"""Prediction: label masks and class probabilities of particle images with a trained model.

Images are ``(N, S, S)`` particles in any units. What the network sees is
:func:`model_input`: each image resized to the model's input (area averaging when shrinking,
bilinear when enlarging), *then* normalised at that size (background plane and mean removed,
divided by its spread, or by one ``scale`` for a whole stack: :func:`stack_scale`). The class
maps are resized back to ``S`` (bilinear), so labels come at the particles' own box. Label
codes: 0 background, 1 signal, 2 edge.

Why normalise after the resize: area averaging a box of 320 px down to 64 px averages the
noise of 25 pixels into one and leaves the particle's low frequencies, so an image normalised
at its own box has a spread of 0.2-0.4 at the model's size (measured on EMPIAR-10076 and
ASPIRE's raw particles), and a model trained on spread-1 images sees no contrast (it found
signal on 0 of 17 raw particles, 17 of 17 once renormalised). The training loader does the
same (:class:`particleseg_model.model.loader.CorpusBatches`), so training and prediction see
one distribution whatever the box.

``edge_from_signal`` derives the edge from the predicted signal with the label rule itself
(the paper's edge is a function of its signal).

Speed (issue 15; docs/pretrained.md, "Speed"): the network is called through an engine of
:mod:`particleseg_model.model.inference` (ONNX Runtime or Keras; a plain Keras model works
too), the resizes are :func:`~particleseg_model.corpus.labels.resize_images_taps` and the plane
removal is made of moments and broadcasts: nothing here calls BLAS, whose OpenBLAS thread pool
spins against the other threads of a busy 2-core machine (measured 10-60x slower per resize).
With ``edge_from_signal`` only the signal map is resized back to the box.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from particleseg_model.corpus.labels import labels_from_projection, resize_images_taps
from particleseg_model.model.inference import predict_batch

__all__ = [
    "BG_RADIUS_FRACTION",
    "SCALE_SAMPLE",
    "finite_images",
    "model_input",
    "normalise_for_model",
    "predict_labels",
    "predict_probabilities",
    "stack_scale",
]

BG_RADIUS_FRACTION = 0.375
"""The background disc's radius as a fraction of the box: RELION's default ``--bg_radius``
(37.5 % of the box), which ``relion.extract`` and ``simulation.normalise_images`` use."""


def finite_images(images: np.ndarray) -> np.ndarray:
    """Which images hold finite pixels only.

    Parameters
    ----------
    images
        ``(N, S, S)`` particle images, any float dtype.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` bool: False for an image with a NaN or infinite pixel (it cannot be scored).
    """
    data = np.asarray(images)
    return np.asarray(np.isfinite(data).all(axis=tuple(range(1, data.ndim))))


SCALE_SAMPLE = 1024
"""Particles read, evenly spaced through a stack, for its :func:`stack_scale` (the median of
a thousand per-particle spreads is within a few % of the whole stack's)."""


PLANE_CHUNK_BYTES = 1 << 20
"""Images are made planeless this many float64 bytes at a time: a chunk that stays in a core's
L2 cache (1 MB here) through the passes over it (measured on 256 particles: 6.0 against
9.7 ms of CPU at 64 px, 18 against 27 ms at 128 px for the whole batch at once)."""


@lru_cache(maxsize=16)
def _plane_design(ny: int, nx: int, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background mask (ny, nx) float64 0/1, ``pinv(X_b^T X_b)`` (3, 3), the design's mean
    over the whole box (3,)) of a box, computed once per box (read-only). ``X_b`` is the design
    ``[x, y, 1]`` (pixels from the centre pixel ``(ny // 2, nx // 2)``) of the background
    pixels, those farther than ``radius`` from the centre; ``pinv(X_b) = pinv(X_b^T X_b)
    X_b^T`` (an identity of the pseudo-inverse), so a plane's coefficients are the 3x3 matrix
    times the image's three background moments (sum of v, x v, y v), with no (N, pixels)
    matrix product: no BLAS call (whose thread pool spins on a busy machine) and no copy of
    the background pixels."""
    y, x = np.mgrid[:ny, :nx]
    y = (y - ny // 2).astype(np.float64)
    x = (x - nx // 2).astype(np.float64)
    background = (x**2 + y**2) > radius**2
    design = np.stack([x[background], y[background], np.ones(int(background.sum()))], axis=1)
    normal = np.linalg.pinv(design.T @ design) if background.sum() >= 3 else np.zeros((3, 3))
    mean = np.array([x.mean(), y.mean(), 1.0])
    mask = background.astype(np.float64)
    for array in (mask, normal, mean):
        array.setflags(write=False)
    return mask, normal, mean


def _plane_removed(images: np.ndarray, bg_radius_px: float | None) -> np.ndarray:
    """``(N, S*S)`` float64: each image minus the least-squares plane through its background
    disc (pixels farther than ``bg_radius_px`` from the centre) and minus its mean.

    The same numbers as ``flat[:, background] @ pinv(X_b).T`` and the plane's subtraction (to
    float64 rounding, about 1e-16 of the image's values), from moments and broadcasts instead
    (see :func:`_plane_design`): 5x less CPU than the matrix products at 64 px, and none of
    OpenBLAS' threads."""
    data = np.asarray(images)
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise ValueError(f"particle images must be (N, S, S) squares, got {data.shape}")
    n, ny, nx = data.shape
    radius = BG_RADIUS_FRACTION * nx if bg_radius_px is None else float(bg_radius_px)
    mask, normal, mean = _plane_design(ny, nx, radius)
    xs = np.arange(nx, dtype=np.float64) - nx // 2
    ys = np.arange(ny, dtype=np.float64) - ny // 2
    out = np.empty((n, ny, nx), dtype=np.float64)
    chunk = max(1, PLANE_CHUNK_BYTES // (8 * ny * nx))
    for start in range(0, n, chunk):
        v = out[start : start + chunk]
        v[...] = data[start : start + chunk]
        vb = v * mask  # the background pixels, the rest 0
        # X_b^T v_b: the background's sums of x v, y v and v
        moments = np.stack(
            [
                (vb.sum(axis=1) * xs).sum(axis=1),
                (vb.sum(axis=2) * ys).sum(axis=1),
                vb.sum(axis=(1, 2)),
            ],
            axis=1,
        )
        coef = moments @ normal.T  # (c, 3): the plane a x + b y + d
        # the residual's mean over the whole box, subtracted with the plane's constant
        offset = v.mean(axis=(1, 2)) - coef @ mean + coef[:, 2]
        v -= (coef[:, 0:1] * xs)[:, None, :]
        v -= (coef[:, 1:2] * ys + offset[:, None])[:, :, None]
    return out.reshape(n, -1)


def stack_scale(
    images: np.ndarray, *, size: int | None = None, bg_radius_px: float | None = None
) -> float | None:
    """One scale for a whole stack: the median over its finite images of the standard
    deviation left after :func:`normalise_for_model`'s plane and mean removal.

    Parameters
    ----------
    images
        ``(N, S, S)`` particle images (a sample of the stack: :data:`SCALE_SAMPLE`), any units.
    size
        Measure the spread at this box (px; the model's input size: the images resized as
        :func:`model_input` resizes them), which is what :func:`model_input`'s ``scale``
        needs; None: at ``S``.
    bg_radius_px
        As :func:`normalise_for_model`, at the box measured.

    Returns
    -------
    float or None
        The scale in the images' units; None without a finite, non-constant image.
    """
    data = np.asarray(images)
    finite = finite_images(data) if len(data) else np.zeros(0, bool)
    if not finite.any():
        return None
    data = data[finite]
    if size is not None and data.shape[-1] != size:
        data = resize_images_taps(data, size)
    # a block at a time: a thousand boxes of 128 px are 134 MB of float64 at once
    block = max(1, (8 << 20) // (8 * data.shape[-1] * data.shape[-2]))
    spread = np.concatenate(
        [
            _plane_removed(data[start : start + block], bg_radius_px).std(axis=1)
            for start in range(0, len(data), block)
        ]
    )
    spread = spread[spread > 0]
    return float(np.median(spread)) if len(spread) else None


def model_input(images: np.ndarray, size: int, *, scale: float | None = None) -> np.ndarray:
    """What the network sees: the images resized to ``size``, then normalised at that size.

    Parameters
    ----------
    images
        ``(N, S, S)`` particle images in any units (contrast as the corpus: particles bright).
    size
        The model's input size (px).
    scale
        The stack's :func:`stack_scale` measured at ``size`` (one scale for a whole stack, see
        :func:`normalise_for_model`); None: each image's own spread.

    Returns
    -------
    numpy.ndarray
        ``(N, size, size)`` float32: resized (area averaging when shrinking, bilinear when
        enlarging: :func:`particleseg_model.corpus.labels.resize_images`' weights, applied
        by :func:`~particleseg_model.corpus.labels.resize_images_taps`), the background
        plane and the mean removed, divided by ``scale`` or by each image's spread.
    """
    data = _checked_images(images)
    if data.shape[-1] != size:
        data = resize_images_taps(data, size)
    return normalise_for_model(data, scale=scale)


def normalise_for_model(
    images: np.ndarray, *, scale: float | None = None, bg_radius_px: float | None = None
) -> np.ndarray:
    """Particle images on the scale the corpus trained on, whatever their units.

    The corpus normalised every particle twice: at extraction as RELION does (``relion.extract``
    ``--norm``, ``simulation.normalise_images``: the least-squares plane through the background
    disc, the pixels farther than ``bg_radius_px`` from the centre, subtracted, the background
    scaled to std 1), then in the store (``corpus.store``'s ``NORMALISATION``: mean 0, std 1 over
    the whole box). The background scaling is undone by the second step, so the composition is:
    subtract the background plane, then bring the whole box to mean 0 and std 1 (``scale``
    None: exactly the corpus' normalisation, to float32 rounding).

    ``particleseg clean`` and ``segment`` pass one ``scale`` for the whole stack
    (:func:`stack_scale`) instead of each particle's own: it removes the stack's unit as well,
    and a box without contrast (empty ice in a normalised stack, a padded box) stays without
    contrast rather than being blown up into noise in which a network finds specks. On a stack
    that is already normalised per particle the two agree (the median spread is 1). Either way
    the result is affine-invariant: ``a x + b`` (``a > 0``; the scale taken from it) gives the
    same images, so a stack in arbitrary units (std 0.0015, mean 12) gives the labels of the same
    stack normalised. Computed in float64 (a mean of 12 against an std of 0.0015 needs it).

    Parameters
    ----------
    images
        ``(N, S, S)`` particle images (any units; contrast as the corpus: particles bright).
    scale
        Divide every image by this (the images' units, > 0); None: by its own standard
        deviation after the plane removal (a constant image becomes all 0).
    bg_radius_px
        Radius of the background disc in pixels; None: :data:`BG_RADIUS_FRACTION` x box.

    Returns
    -------
    numpy.ndarray
        ``(N, S, S)`` float32. An image with a non-finite pixel becomes all NaN (check
        :func:`finite_images` first).
    """
    data = np.asarray(images)
    flat = _plane_removed(data, bg_radius_px)
    if scale is None:
        std = flat.std(axis=1, keepdims=True)
        flat = flat / np.where(std > 0, std, 1.0)
    elif not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    else:
        flat = flat / float(scale)
    return flat.reshape(data.shape).astype(np.float32)


def _class_maps(
    model: Any, images: np.ndarray, scale: float | None = None, classes: int | None = None
) -> np.ndarray:
    """Softmax ``(n, classes, S, S)`` at the images' box for one batch ``(n, S, S)``;
    ``classes`` an index: that class's map only, ``(n, 1, S, S)`` (resizing the maps back is
    the most costly step after the network: one map instead of three when only the signal
    counts)."""
    size, box = int(model.input_shape[1]), images.shape[1]
    x = model_input(images, size, scale=scale)
    probs = predict_batch(model, x[..., None])
    if classes is not None:
        probs = probs[..., classes : classes + 1]
    n, _, _, count = probs.shape
    maps = np.ascontiguousarray(probs.transpose(0, 3, 1, 2))
    if box != size:  # every class map of the batch in one resize
        maps = resize_images_taps(maps.reshape(n * count, size, size), box, "bilinear")
    return maps.reshape(n, count, box, box)


def _checked_images(images: np.ndarray) -> np.ndarray:
    data = np.asarray(images, dtype=np.float32)
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise ValueError(f"particle images must be (N, S, S) squares, got {data.shape}")
    return data


def predict_probabilities(
    model: Any, images: np.ndarray, *, batch: int = 64, scale: float | None = None
) -> np.ndarray:
    """Softmax ``(N, S, S, 3)`` float32 at the images' own box ``S`` (``(N, S, S)`` particle
    images in any units): the network sees :func:`model_input` (``scale`` as there), the
    softmax is resized back (bilinear)."""
    data = _checked_images(images)
    out = np.empty(data.shape + (3,), dtype=np.float32)
    for start in range(0, len(data), batch):
        maps = _class_maps(model, data[start : start + batch], scale)
        out[start : start + len(maps)] = maps.transpose(0, 2, 3, 1)
    return out


def predict_labels(
    model: Any,
    images: np.ndarray,
    *,
    batch: int = 64,
    edge_from_signal: bool = False,
    edge_px: int = 11,
    scale: float | None = None,
) -> np.ndarray:
    """Label codes of particle images at their own box.

    Parameters
    ----------
    model
        A Keras model ``(b, size, size, 1) -> (b, size, size, classes)`` softmax, or an
        engine of :mod:`particleseg_model.model.inference` running one.
    images
        ``(N, S, S)`` particle images in any units (particles bright); the network sees
        :func:`model_input` of them.
    batch
        Images per model call.
    edge_from_signal
        False: the argmax of :func:`predict_probabilities` (the first class wins a tie). True:
        signal where the signal probability is > 0.5 (signal against not-signal, i.e. against
        background and edge together), the edge made from it by the label rule itself
        (``corpus.labels.labels_from_projection``: the ``edge_px`` x ``edge_px`` dilation of
        the signal minus the signal, at the particle's box ``S``), so the edge is a function of
        the signal as in the paper; the model's edge class is not used.
    edge_px
        The label rule's dilation square (odd; the corpus' 11: a 5 px band), with
        ``edge_from_signal`` only.
    scale
        The stack's :func:`stack_scale` at the model's input size (one scale for a whole
        stack); None: each image normalised by its own spread.

    Returns
    -------
    numpy.ndarray
        ``(N, S, S)`` uint8: 0 background, 1 signal, 2 edge.
    """
    return predict_labels_and_centre(
        model,
        images,
        batch=batch,
        edge_from_signal=edge_from_signal,
        edge_px=edge_px,
        scale=scale,
    )[0]


def central_disc(box: int) -> np.ndarray:
    """Boolean ``(box, box)``: the pixels within ``box / 4`` of the centre pixel ``box // 2``
    (the particle's radius when, as usual, the box is twice the particle)."""
    y, x = np.mgrid[:box, :box] - box // 2
    return np.hypot(x, y) <= box / 4


def predict_labels_and_centre(
    model: Any,
    images: np.ndarray,
    *,
    batch: int = 64,
    edge_from_signal: bool = False,
    edge_px: int = 11,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict_labels` and, per particle, the mean signal probability inside
    :func:`central_disc` (float64 ``(N,)`` in [0, 1]): how sure the model is that a particle
    sits at the box centre (``particleseg clean --score centred``), from the same model call."""
    data = _checked_images(images)
    labels = np.empty(data.shape, dtype=np.uint8)
    centre = np.empty(len(data), dtype=np.float64)
    disc = central_disc(data.shape[-1]) if data.ndim == 3 else None
    for start in range(0, len(data), batch):
        if edge_from_signal:  # the signal map alone: the model's edge class is not used
            signal = _class_maps(model, data[start : start + batch], scale, classes=1)[:, 0]
            centre[start : start + len(signal)] = signal[:, disc].mean(axis=1)
            # the label rule on the map itself: signal where > 0.5, the edge its dilation
            labels[start : start + len(signal)] = labels_from_projection(
                signal, threshold=0.5, edge_px=edge_px
            )
            continue
        maps = _class_maps(model, data[start : start + batch], scale)
        centre[start : start + len(maps)] = maps[:, 1][:, disc].mean(axis=1)
        if maps.shape[1] != 3:
            labels[start : start + len(maps)] = maps.argmax(axis=1)
            continue
        # the argmax of three maps by two comparisons: 3x faster than argmax over axis 1
        background, signal, edge = maps[:, 0], maps[:, 1], maps[:, 2]
        out = labels[start : start + len(maps)]
        np.greater(signal, background, out=out, casting="unsafe")
        out[edge > np.maximum(background, signal)] = 2
    return labels, centre
