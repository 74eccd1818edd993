"""particleseg_model.em.geometry: RELION's Euler matrices and Fourier-frequency conventions."""

from __future__ import annotations

import numpy as np
import pytest

from particleseg_model.em.geometry import (
    centre_phase,
    euler_matrices,
    half_transform_freqs,
    random_euler,
    relion_freq,
)


def _rz(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def _ry(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


@pytest.mark.parametrize(
    ("rot", "tilt", "psi"),
    [(0.0, 0.0, 0.0), (30.0, 0.0, 0.0), (0.0, 45.0, 0.0), (10.0, 70.0, -120.0), (200, 135, 33)],
)
def test_euler_matrix_is_relion_zyz_product(rot: float, tilt: float, psi: float) -> None:
    # RELION's Euler_angles2matrix: A = Rz(psi) Ry(tilt) Rz(rot)
    expected = _rz(psi) @ _ry(tilt) @ _rz(rot)
    np.testing.assert_allclose(euler_matrices(rot, tilt, psi)[0], expected, atol=1e-12)


def test_euler_matrices_are_rotations() -> None:
    rot, tilt, psi = random_euler(np.random.default_rng(0), 500)
    matrices = euler_matrices(rot, tilt, psi)
    assert matrices.shape == (500, 3, 3)
    eye = np.broadcast_to(np.eye(3), matrices.shape)
    np.testing.assert_allclose(matrices @ matrices.transpose(0, 2, 1), eye, atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(matrices), 1.0, atol=1e-12)


def test_random_euler_ranges_and_uniform_tilt() -> None:
    rot, tilt, psi = random_euler(np.random.default_rng(1), 20000)
    assert rot.min() >= 0 and rot.max() < 360 and psi.min() >= 0 and psi.max() < 360
    assert tilt.min() >= 0 and tilt.max() <= 180
    # uniform on SO(3): cos(tilt) uniform on [-1, 1] (mean 0, variance 1/3)
    cos_tilt = np.cos(np.radians(tilt))
    assert abs(cos_tilt.mean()) < 0.02
    assert abs(cos_tilt.var() - 1 / 3) < 0.01


def test_relion_freq_even_and_odd() -> None:
    np.testing.assert_array_equal(relion_freq(4), [0.0, 1.0, 2.0, -1.0])  # n // 2 positive
    np.testing.assert_array_equal(relion_freq(5), [0.0, 1.0, 2.0, -2.0, -1.0])
    np.testing.assert_array_equal(relion_freq(1), [0.0])
    assert relion_freq(6).dtype == np.float64
    # the odd case is numpy's fftfreq in indices; the even one differs only at n // 2
    np.testing.assert_array_equal(relion_freq(7), np.fft.fftfreq(7) * 7)
    even = np.fft.fftfreq(8) * 8
    assert even[4] == -4.0 and relion_freq(8)[4] == 4.0


@pytest.mark.parametrize("shape", [(6,), (5, 8), (4, 7, 9)])
def test_half_transform_freqs_follow_numpy(shape: tuple[int, ...]) -> None:
    freqs = half_transform_freqs(shape)
    assert len(freqs) == len(shape)
    spectrum_shape = (*shape[:-1], shape[-1] // 2 + 1)
    for axis, (freq, n) in enumerate(zip(freqs, shape, strict=True)):
        expected = np.fft.rfftfreq(n) if axis == len(shape) - 1 else np.fft.fftfreq(n)
        np.testing.assert_array_equal(freq.ravel(), expected)
        assert freq.shape[axis] == spectrum_shape[axis]
        assert freq.size == spectrum_shape[axis]
    assert np.broadcast_shapes(*(f.shape for f in freqs)) == spectrum_shape


@pytest.mark.parametrize("n", [16, 17])
def test_centre_phase_moves_the_origin_to_the_centre_plus_shift(n: int) -> None:
    image = np.random.default_rng(n).standard_normal((n, n))
    spectrum = np.fft.rfft2(image)  # content referred to pixel 0
    dx, dy = np.array([0.0, 2.0, -3.0]), np.array([0.0, -1.0, 4.0])
    phase = centre_phase(n, dx, dy)
    assert phase.shape == (3, n, n // 2 + 1) and phase.dtype == np.complex64
    moved = np.fft.irfft2(spectrum[None] * phase, s=(n, n))
    for k in range(3):
        # pixel 0 goes to n // 2 + d: the image moves by +d on top of the centring
        expected = np.roll(image, (n // 2 + int(dy[k]), n // 2 + int(dx[k])), axis=(0, 1))
        np.testing.assert_allclose(moved[k], expected, atol=1e-5)


def test_centre_phase_places_a_delta_at_a_subpixel_shift_symmetrically() -> None:
    n = 32
    delta = np.zeros((n, n))
    delta[0, 0] = 1.0
    moved = np.fft.irfft2(np.fft.rfft2(delta)[None] * centre_phase(n, [0.5], [0.0]), s=(n, n))[0]
    row = moved[n // 2]
    # half a pixel to the right of n // 2: equal weight on n // 2 and n // 2 + 1
    assert row[n // 2] == pytest.approx(row[n // 2 + 1], abs=1e-6)
    assert row[n // 2] == pytest.approx(row.max(), abs=1e-6)
