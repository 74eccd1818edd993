"""Simulated particles on real backgrounds (simulation.composite, issue 15 item 1)."""

from __future__ import annotations

import numpy as np
import pytest

from particleseg_model.simulation.composite import (
    background_pool,
    blur_images,
    composite_on_backgrounds,
    disc_variance,
)

BOX = 32


def disc_particles(n: int, amplitude: float = 3.0) -> np.ndarray:
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    return np.broadcast_to(amplitude * (np.hypot(x, y) <= 6), (n, BOX, BOX)).astype(np.float32)


def test_pool_is_planeless_spread_1_and_drops_what_cannot_be_used():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:BOX, :BOX]
    boxes = rng.normal(5, 0.01, (6, BOX, BOX)) + 0.3 * x + 0.1 * y  # units, offset and a ramp
    boxes[4] = 7.0  # no contrast at all
    boxes[5, 3, 3] = np.nan
    pool = background_pool(boxes)
    assert pool.shape == (4, BOX, BOX) and pool.dtype == np.float32
    np.testing.assert_allclose(pool.std(axis=(1, 2)), 1, atol=1e-5)
    np.testing.assert_allclose(pool.mean(axis=(1, 2)), 0, atol=1e-4)
    # the ramp (60x the noise) is gone: what is left is the noise
    assert abs(np.corrcoef(pool[0].ravel(), x.ravel())[0, 1]) < 0.1
    with pytest.raises(ValueError, match="squares"):
        background_pool(np.zeros((2, 8, 9)))


def test_particle_plus_scaled_background_from_the_pool():
    rng = np.random.default_rng(1)
    pool = background_pool(rng.normal(size=(5, BOX, BOX)))
    clean = disc_particles(40)
    images, index = composite_on_backgrounds(clean, pool, 0.5, np.random.default_rng(2))
    assert images.shape == clean.shape and index.min() >= 0 and index.max() < 5
    residual = (images - clean) / 0.5
    for i in range(40):  # one of the 8 symmetries of the square of the chosen background
        variants = [np.rot90(pool[index[i]], k) for k in range(4)]
        variants += [v[:, ::-1] for v in variants]
        assert any(np.allclose(residual[i], v, atol=1e-5) for v in variants)
    again, index2 = composite_on_backgrounds(clean, pool, 0.5, np.random.default_rng(2))
    np.testing.assert_array_equal(again, images)  # the generator decides everything
    np.testing.assert_array_equal(index2, index)


def test_contrast_sets_how_visible_the_particle_is():
    rng = np.random.default_rng(3)
    pool = background_pool(rng.normal(size=(50, BOX, BOX)))
    clean = disc_particles(200)
    wanted = np.where(np.arange(200) < 100, 0.2, 2.0)
    images, _ = composite_on_backgrounds(clean, pool, None, rng, contrast=wanted)
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    outside = np.hypot(x, y) > BOX / 3
    measured = disc_variance(images) / images[:, outside].var(axis=1) - 1
    assert abs(np.median(measured[:100]) - 0.2) < 0.1
    assert abs(np.median(measured[100:]) - 2.0) < 0.5
    with pytest.raises(ValueError, match="exactly one"):
        composite_on_backgrounds(clean, pool, 0.5, rng, contrast=wanted)
    with pytest.raises(ValueError, match="positive"):
        composite_on_backgrounds(clean, pool, None, rng, contrast=np.zeros(200))


def test_blur_softens_the_particle_only():
    pool = background_pool(np.random.default_rng(4).normal(size=(3, BOX, BOX)))
    clean = disc_particles(2)
    sharp, idx = composite_on_backgrounds(clean, pool, 1.0, np.random.default_rng(5))
    soft, idx2 = composite_on_backgrounds(
        clean, pool, 1.0, np.random.default_rng(5), blur_px=np.array([0.0, 2.0])
    )
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_allclose(soft[0], sharp[0], atol=1e-5)  # sigma 0: unchanged
    blurred = blur_images(clean[1:], np.array([2.0]))[0]
    np.testing.assert_allclose(soft[1] - blurred, sharp[1] - clean[1], atol=1e-5)
    assert abs(blurred.sum() - clean[1].sum()) < 1e-2 * clean[1].sum()  # mass kept


def test_mismatched_or_empty_inputs_are_refused():
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match="one box"):
        composite_on_backgrounds(disc_particles(2), np.zeros((3, 16, 16)), 1.0, rng)
    with pytest.raises(ValueError, match="empty"):
        composite_on_backgrounds(disc_particles(2), np.zeros((0, BOX, BOX)), 1.0, rng)
