"""The label rule (codes, threshold, edge band) and the resizing of labels and images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from particleseg_model.corpus.labels import (
    BACKGROUND,
    EDGE,
    SIGNAL,
    label_fractions,
    labels_from_projection,
    resize_images,
    resize_labels,
)

N = 64


def _disc(
    radius: float, value: float = 20.0, centre: tuple[int, int] = (N // 2, N // 2)
) -> np.ndarray:
    y, x = np.mgrid[:N, :N]
    return np.where(np.hypot(x - centre[0], y - centre[1]) <= radius, value, 0.0)


def _chebyshev_distance_to(signal: np.ndarray) -> np.ndarray:
    """Brute force: the Chebyshev distance of every pixel to the nearest signal pixel."""
    ys, xs = np.nonzero(signal)
    y, x = np.mgrid[: signal.shape[0], : signal.shape[1]]
    d = np.maximum(np.abs(y[..., None] - ys), np.abs(x[..., None] - xs))
    return d.min(axis=-1)


def test_disc_gives_signal_and_a_five_pixel_edge_band() -> None:
    projection = np.stack([_disc(12.0), _disc(7.5, centre=(20, 40))]).astype(np.float32)
    labels = labels_from_projection(projection)
    assert labels.dtype == np.uint8 and labels.shape == (2, N, N)
    assert set(np.unique(labels)) == {BACKGROUND, SIGNAL, EDGE} == {0, 1, 2}
    for image, lab in zip(projection, labels, strict=True):
        signal = image > 10
        np.testing.assert_array_equal(lab == SIGNAL, signal)
        distance = _chebyshev_distance_to(signal)
        # edge: 1 to 5 px outside the signal (an 11 x 11 square), the rest background
        np.testing.assert_array_equal(lab == EDGE, (distance >= 1) & (distance <= 5))
        np.testing.assert_array_equal(lab == BACKGROUND, distance > 5)
    # the row through the centre: 12 px of signal each side of it, then exactly 5 px of edge
    row = labels[0, N // 2]
    c = N // 2
    assert (row[c - 12 : c + 13] == SIGNAL).all() and row[c - 13] == EDGE and row[c + 13] == EDGE
    assert (row[c - 17 : c - 12] == EDGE).all() and (row[c + 13 : c + 18] == EDGE).all()
    assert row[c - 18] == BACKGROUND and row[c + 18] == BACKGROUND


def test_threshold_is_strict_and_configurable() -> None:
    image = np.array([[9.0, 10.0, 10.5, 30.0]], dtype=np.float32)
    assert labels_from_projection(image, edge_px=1).tolist() == [[0, 0, 1, 1]]
    assert labels_from_projection(image, threshold=20, edge_px=1).tolist() == [[0, 0, 0, 1]]
    assert labels_from_projection(image, edge_px=3).tolist() == [[0, 2, 1, 1]]
    assert labels_from_projection(image[None], edge_px=3).shape == (1, 1, 4)


def test_edge_width_is_configurable_and_does_not_wrap() -> None:
    image = np.zeros((N, N), dtype=np.float32)
    image[:, :3] = 50.0  # signal along the left border
    for edge_px in (1, 3, 7, 11, 21):
        labels = labels_from_projection(image, edge_px=edge_px)
        width = (edge_px - 1) // 2
        assert (labels[:, :3] == SIGNAL).all()
        assert (labels[:, 3 : 3 + width] == EDGE).all()
        assert (labels[:, 3 + width :] == BACKGROUND).all()  # nothing at the right border
    for bad in (0, 2, 10, -3):
        with pytest.raises(ValueError, match="odd"):
            labels_from_projection(image, edge_px=bad)
    with pytest.raises(ValueError, match="shape"):
        labels_from_projection(np.zeros(5))


def test_matches_a_maximum_filter_dilation() -> None:
    rng = np.random.default_rng(0)
    projection = (rng.random((6, N, N)) > 0.995) * 20.0 + rng.random((6, N, N))
    for edge_px in (3, 5, 11, 13):
        signal = projection > 10
        dilated = (
            ndimage.maximum_filter(
                signal.astype(np.uint8), size=(1, edge_px, edge_px), mode="constant"
            )
            > 0
        )
        expected = np.where(signal, SIGNAL, np.where(dilated, EDGE, BACKGROUND))
        np.testing.assert_array_equal(labels_from_projection(projection, edge_px=edge_px), expected)


def test_label_fractions() -> None:
    labels = np.zeros((2, 4, 4), dtype=np.uint8)
    labels[0, :2] = SIGNAL
    labels[0, 2] = EDGE
    fractions = label_fractions(labels)
    assert fractions.shape == (2, 3)
    np.testing.assert_allclose(fractions, [[0.25, 0.5, 0.25], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(label_fractions(labels[0]), [0.25, 0.5, 0.25])
    with pytest.raises(ValueError, match="code 3"):
        label_fractions(np.full((2, 2), 3, dtype=np.uint8))


def test_resize_labels_is_nearest_and_keeps_codes() -> None:
    labels = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    up = resize_labels(labels, 4)
    np.testing.assert_array_equal(up, np.kron(labels, np.ones((2, 2), dtype=np.uint8)))
    assert up.dtype == np.uint8
    big = labels_from_projection(np.stack([_disc(12.0)] * 3).astype(np.float32))
    small = resize_labels(big, 32)
    assert small.shape == (3, 32, 32) and set(np.unique(small)) <= {0, 1, 2}
    np.testing.assert_array_equal(small[0], big[0, 1::2, 1::2])  # centres of 2 x 2 blocks
    assert resize_labels(big, (16, 48)).shape == (3, 16, 48)
    assert set(np.unique(resize_labels(big, 100))) == {0, 1, 2}


def test_resize_images_area_and_bilinear() -> None:
    rng = np.random.default_rng(1)
    images = rng.random((3, 8, 8)).astype(np.float32)
    half = resize_images(images, 4)  # area: means of 2 x 2 blocks
    np.testing.assert_allclose(half, images.reshape(3, 4, 2, 4, 2).mean(axis=(2, 4)), atol=1e-6)
    constant = np.full((2, 10, 10), 3.5, dtype=np.float32)
    for size, method in ((7, "area"), (7, "bilinear"), (23, "auto"), ((5, 13), "auto")):
        out = resize_images(constant, size, method)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, 3.5, atol=1e-5)
    ramp = np.tile(np.arange(8, dtype=np.float32), (8, 1))  # x ramp, one image
    up = resize_images(ramp, 16, "bilinear")
    # half-pixel centres: output pixel i sits at input (i + 0.5) / 2 - 0.5
    np.testing.assert_allclose(up[5, 1:15], (np.arange(1, 15) + 0.5) / 2 - 0.5, atol=1e-5)
    np.testing.assert_allclose(resize_images(images, 8), images, atol=1e-6)  # same size
    with pytest.raises(ValueError, match="method"):
        resize_images(images, 4, "bicubic")
