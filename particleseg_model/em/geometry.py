"""Geometry shared by the projectors, the simulator and RELION's wrappers.

Conventions: Euler angles are RELION's ZYZ ``(rot, tilt, psi)`` in degrees
(``Euler_angles2matrix``); Fourier indices follow FFTW's half transform as RELION indexes
them (index ``n // 2`` counts as positive, :func:`relion_freq`), except
:func:`half_transform_freqs`, which keeps numpy's ``fftfreq`` (index ``n // 2`` of an even
axis negative) for the map filters and shifts that always used it; shifts are in pixels, an
image moving by ``+d``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "centre_phase",
    "euler_matrices",
    "half_transform_freqs",
    "random_euler",
    "relion_freq",
]


def euler_matrices(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """RELION's ``Euler_angles2matrix`` (ZYZ, degrees) for arrays of angles: ``(n, 3, 3)``."""
    a, b, g = (np.radians(np.atleast_1d(np.asarray(v, dtype=np.float64))) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty((len(a), 3, 3))
    m[:, 0, 0] = cg * cc - sg * sa
    m[:, 0, 1] = cg * cs + sg * ca
    m[:, 0, 2] = -cg * sb
    m[:, 1, 0] = -sg * cc - cg * sa
    m[:, 1, 1] = -sg * cs + cg * ca
    m[:, 1, 2] = sg * sb
    m[:, 2, 0] = sc
    m[:, 2, 1] = ss
    m[:, 2, 2] = cb
    return m


def random_euler(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniformly random orientations (uniform on SO(3)): rot, tilt, psi in degrees."""
    rot = rng.uniform(0.0, 360.0, n)
    tilt = np.degrees(np.arccos(rng.uniform(-1.0, 1.0, n)))
    psi = rng.uniform(0.0, 360.0, n)
    return rot, tilt, psi


def relion_freq(n: int) -> np.ndarray:
    """Signed frequencies of the full axis of an FFTW half transform as RELION indexes them
    (index ``n // 2`` counts as positive)."""
    index = np.arange(n)
    return np.where(index <= n // 2, index, index - n).astype(np.float64)


def half_transform_freqs(shape: Sequence[int]) -> tuple[np.ndarray, ...]:
    """The frequencies of the real half transform (``rfftn``) of an array of ``shape``.

    Parameters
    ----------
    shape
        The real array's shape, e.g. ``(z, y, x)`` or ``(y, x)``.

    Returns
    -------
    tuple of numpy.ndarray
        One float64 array per axis, in cycles per pixel, shaped to broadcast against the
        half transform (length 1 on every other axis): ``numpy.fft.fftfreq`` on every axis
        but the last (index ``n // 2`` of an even axis is ``-0.5``), ``rfftfreq`` on the
        last. Multiply by the axis length for Fourier indices.
    """
    ndim = len(shape)
    freqs = []
    for axis, n in enumerate(shape):
        values = np.fft.rfftfreq(n) if axis == ndim - 1 else np.fft.fftfreq(n)
        view = [1] * ndim
        view[axis] = len(values)
        freqs.append(values.reshape(view))
    return tuple(freqs)


def centre_phase(n: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Phase factors ``(b, n, n // 2 + 1)`` that put a centre-referenced transform's origin at
    pixel ``n // 2 + (dx, dy)`` (the image moves by ``+d`` pixels)."""
    ky = relion_freq(n)[None, :]
    kx = np.arange(n // 2 + 1, dtype=np.float64)[None, :]
    cx = (n // 2 + np.asarray(dx, dtype=np.float64))[:, None]
    cy = (n // 2 + np.asarray(dy, dtype=np.float64))[:, None]
    # separable: one exp per row and per column, then an outer product
    row = np.exp(-2j * np.pi * ky * cy / n).astype(np.complex64)
    col = np.exp(-2j * np.pi * kx * cx / n).astype(np.complex64)
    return row[:, :, None] * col[:, None, :]
