"""Simulated cryo-EM particles with known poses: projection, CTF, noise, junk, micrographs.

Conventions (those of RELION 3.1, checked against ``relion_project`` in the tests)
- Images are float32 arrays ``[..., y, x]``; the image centre is pixel ``n // 2`` (RELION's
  origin), maps are ``[z, y, x]`` with centre voxel ``n // 2``.
- Euler angles are RELION's ZYZ ``(rot, tilt, psi)`` in degrees; :func:`euler_matrices` is
  RELION's ``Euler_angles2matrix``. A map point ``r = (x, y, z)`` (voxels from the centre)
  projects to image point ``(A r)[:2] - origin``.
- Origins (``rlnOriginX/YAngst``) are in Angstrom; functions taking pixels say so. A positive
  origin moves the projected particle towards *negative* x/y (RELION's ``relion_project`` shifts
  the projection by ``-origin``): the particle centre sits at ``n // 2 - origin / pixel``.
- CTF: RELION's ``CTF::getCTF`` (defocus U/V in Angstrom, underfocus positive, astigmatism
  angle in degrees from the x axis, Cs in mm, voltage in kV, amplitude contrast Q0), positive
  at zero frequency, multiplied onto the projection's Fourier transform (``relion_project
  --ctf``), no phase flipping.
- Particle images are white on dark (contrast already inverted, as after RELION extraction with
  ``--invert_contrast``) and normalised as ``relion_preprocess --norm`` does: mean 0 and
  standard deviation 1 in the background outside a circle of radius 0.375 * box, after
  removing a least-squares plane fitted to that background. Micrographs keep raw contrast
  (particles dark, like real micrographs).
- SNR is per pixel: the variance of a noiseless CTF-modulated projection over the whole box,
  averaged over random views, divided by the variance of the background (white noise plus the
  low-frequency ice texture).

Junk kinds (:data:`JUNK_KINDS`), each a separate option:
``empty`` (background only), ``ice`` (a large high-contrast contamination blob),
``carbon_edge`` (a strong step across the box, sometimes with a particle beside it),
``aggregate`` (two to four overlapping particles), ``off_centre`` (a particle displaced by more
than a third of the box), ``fragment`` (a small piece of the map).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import fft as sfft

from particleseg_model.em.geometry import (
    centre_phase,
    euler_matrices,
    half_transform_freqs,
    random_euler,
    relion_freq,
)
from particleseg_model.em.maps import DensityMap, map_threshold, particle_diameter_px

__all__ = [
    "JUNK_KINDS",
    "FourierProjector",
    "SimulatedMicrographs",
    "SimulatedParticles",
    "SimulationConfig",
    "ctf_2d",
    "electron_wavelength_a",
    "euler_matrices",
    "normalise_images",
    "place",
    "random_euler",
    "simulate_micrographs",
    "simulate_particles",
]

JUNK_KINDS: tuple[str, ...] = ("empty", "ice", "carbon_edge", "aggregate", "off_centre", "fragment")
GOOD = "none"  # junk_kind of a good particle in the ground-truth tables

_WORKERS = max(1, min(4, os.cpu_count() or 1))


# ------------------------------------------------------------------------------ projector


class FourierProjector:
    """Projections of a map by central slices of its padded Fourier transform (RELION's
    ``Projector``: gridding pre-correction, zero-padding by ``pad``, trilinear interpolation,
    frequencies out to Nyquist), batched and threaded.

    Memory: one complex64 transform of ``(pad * box)^3 / 2`` voxels (67 MB at box 128).
    """

    def __init__(
        self, volume: np.ndarray, *, pad: int = 2, gridding: bool = True, workers: int = _WORKERS
    ):
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise ValueError(f"projector needs a cubic map, got shape {volume.shape}")
        n = volume.shape[0]
        size = pad * n
        self.box, self.pad, self.workers = n, pad, workers
        vol = volume.astype(np.float32)
        centre = n // 2
        if gridding:
            # linear interpolation in Fourier space multiplies real space by sinc^2: undo it
            z, y, x = np.ogrid[:n, :n, :n]
            r = np.sqrt((z - centre) ** 2 + (y - centre) ** 2 + (x - centre) ** 2) / size
            vol = (vol / np.sinc(r) ** 2).astype(np.float32)
        padded = np.zeros((size,) * 3, dtype=np.float32)
        start = size // 2 - centre
        padded[start : start + n, start : start + n, start : start + n] = vol
        spectrum = sfft.rfftn(padded, workers=workers)
        del padded
        # reference phases to the centre voxel size // 2: a factor (-1)^(kx + ky + kz)
        parity = np.ones(size, dtype=np.float32)
        parity[1::2] = -1
        spectrum *= parity[:, None, None]
        spectrum *= parity[None, :, None]
        spectrum *= parity[None, None, : size // 2 + 1]
        spectrum = sfft.fftshift(spectrum, axes=(0, 1))
        # keep frequencies inside the Nyquist sphere only (RELION's r_max)
        radius = round((n // 2) * pad)
        k = np.arange(size) - size // 2
        kx = np.arange(size // 2 + 1)
        outside = (
            k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2 > radius * radius
        )
        spectrum[outside] = 0
        # one zero plane beyond every upper edge, so trilinear neighbours never fall outside
        self._grid = np.zeros((size + 2, size + 2, size // 2 + 3), dtype=np.complex64)
        self._grid[:size, :size, : size // 2 + 1] = spectrum
        self._shape = self._grid.shape
        self._flat = self._grid.reshape(-1)
        self._size = size
        # the 2D half-plane frequencies RELION fills: inside the circle of radius box // 2
        ky = relion_freq(n)
        kxs = np.arange(n // 2 + 1, dtype=np.float64)
        keep = ky[:, None] ** 2 + kxs[None, :] ** 2 <= (n // 2) ** 2
        self._rows, self._cols = np.nonzero(keep)
        self._kx = kxs[self._cols]
        self._ky = ky[self._rows]

    # -- Fourier slices -----------------------------------------------------------------------
    def _interpolate(self, matrices: np.ndarray) -> np.ndarray:
        """Trilinear samples of the 3D transform on the slices of ``matrices``: ``(b, K)``."""
        q = self.pad * (
            self._kx[None, :, None] * matrices[:, None, 0, :]
            + self._ky[None, :, None] * matrices[:, None, 1, :]
        )  # (b, K, xyz)
        negative = q[..., 0] < 0
        q[negative] *= -1  # Friedel: F(-q) = conj F(q), the half transform stores qx >= 0
        centre = self._size // 2
        x, y, z = q[..., 0], q[..., 1] + centre, q[..., 2] + centre
        x0, y0, z0 = np.floor(x), np.floor(y), np.floor(z)
        fx, fy, fz = (
            (x - x0).astype(np.float32),
            (y - y0).astype(np.float32),
            (z - z0).astype(np.float32),
        )
        _, ny, nx = self._shape
        base = (z0.astype(np.int64) * ny + y0.astype(np.int64)) * nx + x0.astype(np.int64)
        out = np.zeros(base.shape, dtype=np.complex64)
        for dz, wz in ((0, 1 - fz), (1, fz)):
            for dy, wy in ((0, 1 - fy), (1, fy)):
                w = wz * wy
                index = base + (dz * ny + dy) * nx
                out += self._flat.take(index) * (w * (1 - fx))
                out += self._flat.take(index + 1) * (w * fx)
        np.conjugate(out, out=out, where=negative)
        return out

    def fourier_slices(
        self, rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray, chunk: int = 48
    ) -> np.ndarray:
        """Half transforms ``(b, box, box // 2 + 1)`` complex64 of the projections, phases
        referred to the image centre ``box // 2`` (apply :func:`centre_phase` before the
        inverse transform)."""
        matrices = euler_matrices(rot, tilt, psi)
        n = self.box
        out = np.zeros((len(matrices), n, n // 2 + 1), dtype=np.complex64)
        starts = range(0, len(matrices), chunk)

        def work(start: int) -> None:
            values = self._interpolate(matrices[start : start + chunk])
            out[start : start + chunk, self._rows, self._cols] = values

        if self.workers > 1 and len(matrices) > chunk:
            with ThreadPoolExecutor(self.workers) as pool:
                list(pool.map(work, starts))
        else:
            for start in starts:
                work(start)
        return out

    def project(
        self,
        rot: Sequence[float] | np.ndarray,
        tilt: Sequence[float] | np.ndarray,
        psi: Sequence[float] | np.ndarray,
        origin_x_px: np.ndarray | float = 0.0,
        origin_y_px: np.ndarray | float = 0.0,
        ctf: np.ndarray | None = None,
    ) -> np.ndarray:
        """Projections ``(b, box, box)`` float32 at the given poses; origins in *pixels*
        (RELION sign: the particle lands at ``box // 2 - origin``); ``ctf`` as from
        :func:`ctf_2d` (one per projection, or one for all)."""
        rot, tilt, psi = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi))
        spectra = self.fourier_slices(rot, tilt, psi)
        return to_images(
            spectra,
            self.box,
            -np.broadcast_to(origin_x_px, rot.shape),
            -np.broadcast_to(origin_y_px, rot.shape),
            ctf,
            workers=self.workers,
        )


def to_images(
    spectra: np.ndarray,
    n: int,
    dx: np.ndarray,
    dy: np.ndarray,
    ctf: np.ndarray | None = None,
    workers: int = _WORKERS,
) -> np.ndarray:
    """Images from centre-referenced half transforms: multiply by ``ctf``, move by ``(dx, dy)``
    pixels, inverse transform. Works in place on ``spectra``."""
    spectra *= centre_phase(n, dx, dy)
    if ctf is not None:
        spectra *= ctf
    return sfft.irfft2(spectra, s=(n, n), workers=workers).astype(np.float32)


# ------------------------------------------------------------------------------ CTF


def electron_wavelength_a(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Angstrom (RELION's formula)."""
    volts = voltage_kv * 1e3
    return 12.2643247 / math.sqrt(volts * (1.0 + volts * 0.978466e-6))


def ctf_2d(
    n: int,
    pixel_size_a: float,
    defocus_u_a: np.ndarray | float,
    defocus_v_a: np.ndarray | float,
    defocus_angle_deg: np.ndarray | float,
    *,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    phase_shift_deg: float = 0.0,
    bfactor: float = 0.0,
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """RELION's CTF on the half-transform grid: ``(b, ny, nx // 2 + 1)`` float32.

    ``n`` is the box (or give ``shape=(ny, nx)`` for a rectangular image); frequencies are
    ``k / (n * pixel)`` per Angstrom; ``CTF = -sin(pi lambda dz u^2 ... )`` as in
    ``CTF::getCTF`` with underfocus positive and ``CTF(0) = Q0``-like positive contrast.
    """
    ny, nx = shape if shape is not None else (n, n)
    du = np.atleast_1d(np.asarray(defocus_u_a, dtype=np.float64))[:, None, None]
    dv = np.atleast_1d(np.asarray(defocus_v_a, dtype=np.float64))[:, None, None]
    angle = np.radians(np.atleast_1d(np.asarray(defocus_angle_deg, dtype=np.float64)))
    angle = angle[:, None, None]
    fy = (relion_freq(ny) / (ny * pixel_size_a))[None, :, None]
    fx = (np.arange(nx // 2 + 1) / (nx * pixel_size_a))[None, None, :]
    lam = electron_wavelength_a(voltage_kv)
    k1 = math.pi * lam
    k2 = math.pi / 2 * cs_mm * 1e7 * lam**3
    k3 = math.atan(amplitude_contrast / math.sqrt(1 - amplitude_contrast**2))
    k5 = math.radians(phase_shift_deg)
    u2 = fx**2 + fy**2
    azimuth = np.arctan2(fy, fx)
    # cos(2 (azimuth - angle)) expanded, so that only the final sine is per particle and pixel
    cos2, sin2 = np.cos(2 * azimuth), np.sin(2 * azimuth)
    mean = -(du + dv) / 2
    half_diff = -(du - dv) / 2
    deltaf = mean + half_diff * (cos2 * np.cos(2 * angle) + sin2 * np.sin(2 * angle))
    chi = (k1 * u2) * deltaf + (k2 * u2 * u2 - k5 - k3)
    # RELION's getDeltaF is 0 at the origin, where u2 = 0 anyway
    ctf = -np.sin(chi.astype(np.float32))
    if bfactor:
        ctf = ctf * np.exp(-bfactor / 4 * u2).astype(np.float32)
    return ctf.astype(np.float32)


# ------------------------------------------------------------------------------ images


def normalise_images(
    images: np.ndarray, bg_radius_px: float | None = None, ramp: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RELION extraction normalisation: background (pixels farther than ``bg_radius_px``,
    default 0.375 * box, from the centre) to mean 0 and standard deviation 1, after subtracting
    the least-squares plane through it (``ramp``).

    Returns ``(normalised float32, plane-and-mean offset per pixel (b, n, n), std per image)``
    so that ``normalised = (images - offset) / std``.
    """
    b, ny, nx = images.shape
    radius = 0.375 * nx if bg_radius_px is None else bg_radius_px
    y, x = np.mgrid[:ny, :nx]
    y = (y - ny // 2).astype(np.float64)
    x = (x - nx // 2).astype(np.float64)
    background = ((x**2 + y**2) > radius**2).ravel()
    count = int(background.sum())
    flat = images.reshape(b, -1)
    # least squares on the background pixels only, as matrix products over whole images
    design = np.stack([x.ravel(), y.ravel(), np.ones(x.size)], axis=1) * background[:, None]
    if not ramp:
        design = design[:, 2:]
    moments = flat @ design.astype(np.float32)  # (b, k): X^T v per image
    normal = design.T @ design
    coef = np.linalg.solve(normal, moments.T.astype(np.float64)).T  # (b, k)
    squares = (flat * flat) @ background.astype(np.float32)
    # residual sum of squares of a least-squares fit: |v|^2 - c . X^T v; its mean is 0
    variance = np.maximum((squares - (coef * moments).sum(axis=1)) / count, 0.0)
    std = np.sqrt(variance)
    std = np.where(std > 0, std, 1.0)
    if ramp:
        offset = (
            coef[:, 0, None, None] * x + coef[:, 1, None, None] * y + coef[:, 2, None, None]
        ).astype(np.float32)
    else:
        offset = np.broadcast_to(coef[:, 0, None, None], (b, ny, nx)).astype(np.float32)
    out = (images - offset) / std[:, None, None].astype(np.float32)
    return out.astype(np.float32, copy=False), offset, std


def place(canvas: np.ndarray, image: np.ndarray, x: float, y: float) -> None:
    """Add ``image`` (centre pixel ``m // 2``) onto ``canvas`` with its centre at canvas pixel
    ``(x, y)`` (sub-pixel by a Fourier shift, truncated at the canvas edges)."""
    m = image.shape[-1]
    ix, iy = math.floor(x), math.floor(y)
    fx, fy = x - ix, y - iy
    if fx > 1e-6 or fy > 1e-6:
        ky = relion_freq(m)[:, None]
        kx = np.arange(m // 2 + 1)[None, :]
        ramp = np.exp(-2j * np.pi * (kx * fx + ky * fy) / m)  # moves the image by +(fx, fy)
        image = sfft.irfft2(sfft.rfft2(image) * ramp, s=(m, m)).astype(np.float32)
    h, w = canvas.shape
    x0, y0 = ix - m // 2, iy - m // 2
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + m, w), min(y0 + m, h)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    canvas[cy0:cy1, cx0:cx1] += image[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]


def _lowpass_noise(
    rng: np.random.Generator, shape: tuple[int, ...], correlation_px: float, workers: int = _WORKERS
) -> np.ndarray:
    """Gaussian noise smoothed to ``correlation_px`` (a Gaussian filter), scaled to unit
    standard deviation per image: the ice / background texture.

    Drawn directly in Fourier space, only where the filter is not negligible (a few low
    frequencies), which is much cheaper than filtering white noise of the full size.
    """
    ny, nx = shape[-2:]
    fy, fx = half_transform_freqs((ny, nx))
    gain = np.exp(-2 * np.pi**2 * correlation_px**2 * (fx**2 + fy**2))
    rows = np.flatnonzero(gain.max(axis=1) > 1e-4)
    cols = np.flatnonzero(gain.max(axis=0) > 1e-4)
    lead = shape[:-2]
    spectrum = np.zeros((*lead, ny, nx // 2 + 1), dtype=np.complex64)
    block = (*lead, len(rows), len(cols))
    coefficients = rng.standard_normal(block, dtype=np.float32) + 1j * rng.standard_normal(
        block, dtype=np.float32
    )
    spectrum[..., rows[:, None], cols[None, :]] = coefficients * gain[np.ix_(rows, cols)]
    smooth = sfft.irfft2(spectrum, s=(ny, nx), workers=workers)
    std = smooth.std(axis=(-2, -1), keepdims=True)
    return (smooth / np.where(std > 0, std, 1)).astype(np.float32)


# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. Lengths in Angstrom unless the name says px; angles in degrees.

    ``junk_kinds`` selects which junk kinds occur (each a separate option, equally often);
    ``junk_fraction`` in [0, 1) is the share of junk among all particles.
    """

    n_particles: int = 600
    junk_fraction: float = 0.3
    junk_kinds: tuple[str, ...] = JUNK_KINDS
    snr: float = 0.1
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    defocus_range_a: tuple[float, float] = (8000.0, 25000.0)
    astigmatism_max_a: float = 800.0
    particles_per_micrograph: int = 50
    origin_sigma_px: float | None = None  # good particles' origins; default 2% of the box
    ice_texture: float = 0.3  # low-frequency ice background std relative to the white noise
    apply_ctf: bool = True
    normalise: bool = True
    # realism (docs/realism.md measures real images against these; defaults: the old simulator)
    snr_range: tuple[float, float] | None = None
    """Per-particle SNR drawn log-uniformly from ``(low, high)`` (real stacks spread over
    more than a decade); ``None``: every particle at ``snr``. With a range, ``snr`` is
    unused and the junk's amplitudes refer to the range's geometric mean."""
    bfactor_a2: float = 0.0
    """CTF envelope ``exp(-B u^2 / 4)`` (A^2): the loss of high resolution to motion, drift
    and the detector; real data: 50-150 A^2."""
    noise_exponent_range: tuple[float, float] = (0.0, 0.0)
    """Coloured noise: per image, noise power ~ ``f^-a`` with ``a`` uniform in this range
    (0: white). Dose weighting and the detector's MTF take power from high frequencies."""
    blur_px_range: tuple[float, float] = (0.0, 0.0)
    """Per image, a Gaussian blur of sigma (px) uniform in this range on the whole image
    (signal and noise): binning, heavy low-pass filtering or denoising, as in micrographs
    prepared for pickers."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.junk_fraction < 1.0 or not math.isfinite(self.junk_fraction):
            raise ValueError(
                f"junk fraction {self.junk_fraction} is outside [0, 1): at least "
                "one particle must be good"
            )
        unknown = [k for k in self.junk_kinds if k not in JUNK_KINDS]
        if unknown:
            raise ValueError(f"unknown junk kinds {unknown}; choose from {list(JUNK_KINDS)}")
        if self.junk_fraction > 0 and not self.junk_kinds:
            raise ValueError("junk_fraction > 0 needs at least one junk kind")
        if self.n_particles < 1:
            raise ValueError(f"n_particles must be positive, got {self.n_particles}")
        if not self.snr > 0:
            raise ValueError(f"snr must be positive, got {self.snr}")
        if self.snr_range is not None and not 0 < self.snr_range[0] <= self.snr_range[1]:
            raise ValueError(f"bad snr_range {self.snr_range} (0 < low <= high)")
        for name in ("noise_exponent_range", "blur_px_range"):
            low, high = getattr(self, name)
            if not 0 <= low <= high or not math.isfinite(high):
                raise ValueError(f"bad {name} {(low, high)} (0 <= low <= high)")
        if self.bfactor_a2 < 0:
            raise ValueError(f"bfactor_a2 must be >= 0, got {self.bfactor_a2}")
        low, high = self.defocus_range_a
        if not 0 < low <= high:
            raise ValueError(f"bad defocus range {self.defocus_range_a} (Angstrom, low <= high)")

    @property
    def reference_snr(self) -> float:
        """The SNR that sets the noise level of the scene (``snr``, or the geometric mean of
        ``snr_range``)."""
        if self.snr_range is None:
            return self.snr
        return math.sqrt(self.snr_range[0] * self.snr_range[1])

    @classmethod
    def realistic(cls, **overrides: Any) -> SimulationConfig:
        """The simulator calibrated on real images (``benchmarks/realism.py``,
        docs/realism.md): SNR spread over two decades, a B-factor, noise from white to
        strongly coloured and blur from none to a denoised micrograph's, so that raw
        particles and denoised or binned ones both lie inside the training distribution."""
        values: dict[str, Any] = {
            "snr_range": (0.02, 1.0),
            "bfactor_a2": 80.0,
            "noise_exponent_range": (0.0, 3.5),
            "blur_px_range": (0.0, 2.0),
            "ice_texture": 0.5,
        }
        values.update(overrides)
        return cls(**values)

    def optics(self, pixel_size_a: float, box: int) -> dict[str, float | int | str]:
        """The RELION 3.1 optics row of the simulated data."""
        return {
            "rlnOpticsGroup": 1,
            "rlnOpticsGroupName": "opticsGroup1",
            "rlnAmplitudeContrast": self.amplitude_contrast,
            "rlnSphericalAberration": self.cs_mm,
            "rlnVoltage": self.voltage_kv,
            "rlnImagePixelSize": pixel_size_a,
            "rlnImageSize": box,
            "rlnImageDimensionality": 2,
        }


@dataclass
class SimulatedParticles:
    """Particle images and their tables.

    ``images``: float32 ``(n, box, box)`` noisy, normalised. ``clean``: the noiseless signal
    (CTF applied) in the same units (divided by the same per-image std). ``truth``: one row per
    particle (see :func:`simulate_particles`). ``star``: the RELION particle columns a
    depositor's file would hold (junk gets random poses). ``noise_sigma``: background std
    before normalisation; ``signal_sigma``: the signal std that the SNR refers to.
    """

    images: np.ndarray
    clean: np.ndarray | None
    truth: pd.DataFrame
    star: pd.DataFrame
    optics: dict[str, float | int | str]
    pixel_size_a: float
    box: int
    noise_sigma: float
    signal_sigma: float


@dataclass
class SimulatedMicrographs:
    """Micrographs (raw contrast, float32 ``(m, size, size)``) with picks and ground truth.

    ``picks``: one row per coordinate (micrograph_name, coordinate_x_px/_y_px as RELION reads
    them: 0-based column/row of the box centre, is_good, junk_kind, true pose and origin of the
    particle relative to the coordinate, CTF). ``ctf``: one row per micrograph (RELION
    micrograph columns).
    """

    micrographs: np.ndarray
    names: list[str]
    picks: pd.DataFrame
    ctf: pd.DataFrame
    optics: dict[str, float | int | str]
    pixel_size_a: float
    box: int
    noise_sigma: float
    signal_sigma: float
    clean_picks: np.ndarray | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------ building blocks


class _Scene:
    """Shared state of one simulation: map, projector, sizes, CTF settings, noise level."""

    def __init__(
        self,
        density: DensityMap,
        config: SimulationConfig,
        rng: np.random.Generator,
        diameter_px: float | None,
    ):
        self.density, self.config, self.rng = density, config, rng
        self.box = density.box
        self.pixel = density.pixel_size_a
        self.projector = FourierProjector(density.data)
        self.threshold = map_threshold(density)
        if diameter_px is None:
            diameter_px = particle_diameter_px((density.data >= self.threshold).astype(np.float32))
        self.diameter_px = float(min(max(diameter_px, 4.0), self.box))
        self.signal_sigma = self._signal_sigma()
        self.noise_sigma = self.signal_sigma / math.sqrt(config.reference_snr)
        self.white_sigma = self.noise_sigma / math.sqrt(1 + config.ice_texture**2)

    def ctf(
        self, du: np.ndarray, dv: np.ndarray, angle: np.ndarray, n: int | None = None
    ) -> np.ndarray | None:
        if not self.config.apply_ctf:
            return None
        c = self.config
        return ctf_2d(
            n or self.box,
            self.pixel,
            du,
            dv,
            angle,
            voltage_kv=c.voltage_kv,
            cs_mm=c.cs_mm,
            amplitude_contrast=c.amplitude_contrast,
            bfactor=c.bfactor_a2,
        )

    def _signal_sigma(self) -> float:
        """Std of noiseless CTF-modulated projections over the box, from 32 fixed views at
        mid-range defocus (independent of the particle count, so the SNR is stable)."""
        rng = np.random.default_rng(12345)
        rot, tilt, psi = random_euler(rng, 32)
        mid = float(np.mean(self.config.defocus_range_a))
        ctf = self.ctf(np.full(32, mid), np.full(32, mid), np.zeros(32))
        images = self.projector.project(rot, tilt, psi, ctf=ctf)
        sigma = float(np.sqrt(images.var(axis=(1, 2)).mean()))
        if not sigma > 0:
            raise ValueError(f"{self.density.source}: projections of the map are blank")
        return sigma

    def defocus_groups(self, n_groups: int) -> pd.DataFrame:
        low, high = self.config.defocus_range_a
        du = self.rng.uniform(low, high, n_groups)
        astig = self.rng.uniform(0, self.config.astigmatism_max_a, n_groups)
        return pd.DataFrame(
            {
                "defocus_u_a": du,
                "defocus_v_a": du - astig,
                "defocus_angle_deg": self.rng.uniform(0, 180, n_groups),
            }
        )

    def centred(
        self,
        rot: np.ndarray,
        tilt: np.ndarray,
        psi: np.ndarray,
        du: np.ndarray,
        dv: np.ndarray,
        angle: np.ndarray,
    ) -> np.ndarray:
        """CTF-modulated projections centred in the box (for placing)."""
        return self.projector.project(rot, tilt, psi, ctf=self.ctf(du, dv, angle))

    # -- junk ---------------------------------------------------------------------------------
    def ice_blob(self, n: int, du: float, dv: float, angle: float) -> tuple[np.ndarray, str]:
        """A large high-contrast contamination blob (bright after contrast inversion) with an
        irregular outline and CTF fringes at its edge, in a ``n``-pixel square."""
        rng = self.rng
        y, x = np.mgrid[:n, :n].astype(np.float64) - n // 2
        cx, cy = rng.uniform(-0.3, 0.3, 2) * self.box
        radius = rng.uniform(0.25, 0.5) * self.box
        theta = np.arctan2(y - cy, x - cx)
        wobble = 1 + sum(
            rng.uniform(0, 0.08) * np.cos(m * theta + rng.uniform(0, 2 * np.pi)) for m in (2, 3, 4)
        )
        r = np.hypot(x - cx, y - cy)
        blob = 0.5 * (1 - np.tanh((r - radius * wobble) / 2.0))
        amplitude = rng.uniform(6.0, 12.0) * self.noise_sigma
        image = amplitude * blob
        ctf = self.ctf(np.array([du]), np.array([dv]), np.array([angle]), n)
        if ctf is not None:  # the phase part of the contamination shows CTF fringes
            fringes = sfft.irfft2(sfft.rfft2(blob) * ctf[0], s=(n, n))
            image = image + 0.5 * amplitude * fringes
        detail = (
            f"centre_px={cx:.1f},{cy:.1f};radius_px={radius:.1f};"
            f"amplitude={amplitude / self.noise_sigma:.2f}"
        )
        return image.astype(np.float32), detail

    def carbon(
        self, n: int, du: float, dv: float, angle: float, normal_deg: float, offset_px: float
    ) -> tuple[np.ndarray, float]:
        """A carbon film edge: a strong step (carbon side brighter after inversion) with
        amorphous-carbon texture (CTF-filtered noise) on the carbon side. Returns the image
        and the step height in noise units."""
        rng = self.rng
        y, x = np.mgrid[:n, :n].astype(np.float64) - n // 2
        phi = math.radians(normal_deg)
        s = x * math.cos(phi) + y * math.sin(phi) - offset_px
        side = 0.5 * (1 + np.tanh(s / 1.5))
        height = rng.uniform(4.0, 8.0)
        texture = rng.standard_normal((n, n))
        ctf = self.ctf(np.array([du]), np.array([dv]), np.array([angle]), n)
        if ctf is not None:
            texture = sfft.irfft2(sfft.rfft2(texture) * ctf[0], s=(n, n))
        texture = texture / max(texture.std(), 1e-12)
        image = self.noise_sigma * side * (height + 0.5 * texture)
        return image.astype(np.float32), height

    def fragment_volume(self) -> tuple[np.ndarray, np.ndarray, float]:
        """A small piece of the map: the map inside a soft sphere of radius 15-25% of the
        particle diameter around a dense voxel away from the centre. Returns the piece cut to a
        small cube, its centre voxel (z, y, x) in the map and its radius (px)."""
        rng = self.rng
        data = self.density.data
        n = self.box
        dense = np.argwhere(data >= self.threshold)
        r_from_centre = np.sqrt(((dense - n // 2) ** 2).sum(axis=1))
        candidates = dense[r_from_centre >= 0.2 * self.diameter_px / 2]
        if len(candidates) == 0:
            candidates = dense
        centre = candidates[rng.integers(len(candidates))]
        radius = rng.uniform(0.15, 0.25) * self.diameter_px
        half = int(math.ceil(radius + 4))
        m = 2 * half
        cube = np.zeros((m, m, m), dtype=np.float32)
        lo = centre - half
        src = [slice(max(lo[a], 0), min(lo[a] + m, n)) for a in range(3)]
        dst = [slice(s.start - lo[a], s.stop - lo[a]) for a, s in enumerate(src)]
        cube[tuple(dst)] = data[tuple(src)]
        z, y, x = np.ogrid[:m, :m, :m]
        r = np.sqrt((z - half) ** 2 + (y - half) ** 2 + (x - half) ** 2)
        soft = np.clip((radius + 2 - r) / 4, 0, 1)  # 4-voxel linear edge
        cube *= (0.5 - 0.5 * np.cos(np.pi * soft)).astype(np.float32)
        return cube, centre, radius


def _noise_gain(box: int, exponent: np.ndarray) -> np.ndarray:
    """Amplitude gain ``(b, box, box // 2 + 1)`` of coloured noise, power ~ ``f^-a`` (``f``
    floored at one Fourier pixel), scaled to keep unit variance."""
    fy, fx = half_transform_freqs((box, box))
    f = np.maximum(np.hypot(fx, fy), 1.0 / box)
    gain = (f / 0.25)[None] ** (-exponent[:, None, None] / 2)
    gain[:, 0, 0] = 0.0
    # Parseval on the half transform: columns 1 .. n/2 - 1 count twice
    weight = np.full(gain.shape[-1], 2.0)
    weight[0] = 1.0
    if box % 2 == 0:
        weight[-1] = 1.0
    power = (gain**2 * weight).sum(axis=(1, 2)) / (box * box)
    return (gain / np.sqrt(power)[:, None, None]).astype(np.float32)


def _add_noise(clean: np.ndarray, scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """The recorded images: ``clean`` plus noise (white or coloured, and the ice texture) at
    each particle's SNR, then each image's blur. In chunks of 256 images."""
    config = scene.config
    n, box = clean.shape[0], clean.shape[-1]
    if config.snr_range is None:
        scale = np.ones(n, dtype=np.float32)
    else:  # noise of particle i: sigma * sqrt(reference / snr_i)
        low, high = config.snr_range
        snr = np.exp(rng.uniform(math.log(low), math.log(high), n))
        scale = np.sqrt(config.reference_snr / snr).astype(np.float32)
    # drawn only when asked for, so that the default keeps the old simulator's random stream
    coloured, blurred = config.noise_exponent_range[1] > 0, config.blur_px_range[1] > 0
    exponents = rng.uniform(*config.noise_exponent_range, n) if coloured else np.zeros(n)
    blurs = rng.uniform(*config.blur_px_range, n) if blurred else np.zeros(n)
    images = np.empty_like(clean)
    chunk = 256
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        shape = (stop - start, box, box)
        noise = rng.standard_normal(shape, dtype=np.float32)
        if coloured:
            spectrum = sfft.rfft2(noise, workers=_WORKERS) * _noise_gain(box, exponents[start:stop])
            noise = sfft.irfft2(spectrum, s=(box, box), workers=_WORKERS).astype(np.float32)
        noise *= scene.white_sigma
        if config.ice_texture > 0:
            noise += config.ice_texture * scene.white_sigma * _lowpass_noise(rng, shape, box / 12)
        block = clean[start:stop] + noise * scale[start:stop, None, None]
        if blurred:
            sigma = blurs[start:stop]
            fy, fx = half_transform_freqs((box, box))
            gain = np.exp(-2 * np.pi**2 * sigma[:, None, None] ** 2 * (fx**2 + fy**2)[None])
            for target in (block, clean[start:stop]):  # clean: the same signal, blurred
                target[...] = sfft.irfft2(
                    sfft.rfft2(target, workers=_WORKERS) * gain, s=(box, box), workers=_WORKERS
                )
        images[start:stop] = block
    return images


def _assign_kinds(n: int, config: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """Kinds per particle: round(junk_fraction * n) junk, the kinds in equal shares."""
    n_junk = int(round(config.junk_fraction * n))
    n_junk = min(n_junk, n - 1) if n > 1 else 0
    kinds = np.array(
        [GOOD] * (n - n_junk) + list(np.resize(np.array(config.junk_kinds), n_junk)), dtype=object
    )
    return kinds[rng.permutation(n)]


def _clip_origin(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    return np.clip(rng.normal(0, sigma, (n, 2)), -3 * sigma, 3 * sigma)


# ------------------------------------------------------------------------------ particles


def simulate_particles(
    density: DensityMap,
    config: SimulationConfig | None = None,
    *,
    seed: int | np.random.SeedSequence = 0,
    diameter_px: float | None = None,
    keep_clean: bool = True,
    stack_name: str = "Particles/particles_001.mrcs",
    micrograph_prefix: str = "Micrographs/sim_",
) -> SimulatedParticles:
    """Simulate ``config.n_particles`` particle images from ``density`` (prepared to the box).

    Good particles are projections at uniformly random orientations with origins
    ~ N(0, ``origin_sigma_px``), modulated by a per-micrograph CTF (defocus uniform in
    ``defocus_range_a``, astigmatism up to ``astigmatism_max_a``, a 50 A per-particle spread),
    plus white noise and low-frequency ice texture at ``snr``, then normalised. Junk kinds are
    mixed in at ``junk_fraction``.

    The truth table has: image_name, is_good, junk_kind ("none" for good particles),
    rot_deg, tilt_deg, psi_deg, origin_x_a, origin_y_a (the true pose; for aggregates that of
    the first component; NaN when there is no particle), defocus_u_a, defocus_v_a,
    defocus_angle_deg, micrograph_name, n_components, detail.
    """
    config = config or SimulationConfig()
    rng = np.random.default_rng(seed)
    scene = _Scene(density, config, rng, diameter_px)
    n, box, pixel = config.n_particles, scene.box, scene.pixel
    kinds = _assign_kinds(n, config, rng)

    # micrographs: defocus per micrograph, a small spread per particle (ice height)
    n_mics = max(1, math.ceil(n / config.particles_per_micrograph))
    groups = scene.defocus_groups(n_mics)
    mic_index = np.sort(rng.integers(0, n_mics, n))
    spread = rng.normal(0, 50.0, n)
    du = groups["defocus_u_a"].to_numpy()[mic_index] + spread
    dv = groups["defocus_v_a"].to_numpy()[mic_index] + spread
    dang = groups["defocus_angle_deg"].to_numpy()[mic_index]

    rot, tilt, psi = random_euler(rng, n)
    sigma = config.origin_sigma_px if config.origin_sigma_px is not None else 0.02 * box
    origin = _clip_origin(rng, n, sigma)  # pixels, RELION sign
    true_origin = np.full((n, 2), np.nan)
    true_angles = np.full((n, 3), np.nan)
    n_components = np.zeros(n, dtype=np.int64)
    detail = np.array([""] * n, dtype=object)
    clean = np.zeros((n, box, box), dtype=np.float32)

    good = np.flatnonzero(kinds == GOOD)
    if len(good):
        ctf = scene.ctf(du[good], dv[good], dang[good])
        clean[good] = scene.projector.project(
            rot[good], tilt[good], psi[good], origin[good, 0], origin[good, 1], ctf
        )
        true_angles[good] = np.stack([rot[good], tilt[good], psi[good]], axis=1)
        true_origin[good] = origin[good]
        n_components[good] = 1

    centre = box // 2
    for i in np.flatnonzero(kinds == "empty"):
        detail[i] = "background only"

    for i in np.flatnonzero(kinds == "ice"):
        clean[i], detail[i] = scene.ice_blob(box, du[i], dv[i], dang[i])

    for i in np.flatnonzero(kinds == "carbon_edge"):
        normal = rng.uniform(0, 360)
        offset = rng.uniform(-0.25, 0.25) * box
        image, height = scene.carbon(box, du[i], dv[i], dang[i], normal, offset)
        with_particle = rng.random() < 0.5
        if with_particle:  # a particle on the ice side, next to the edge
            phi = math.radians(normal)
            gap = offset - rng.uniform(0.25, 0.4) * scene.diameter_px
            dx, dy = gap * math.cos(phi), gap * math.sin(phi)
            one = scene.centred(
                rot[i : i + 1],
                tilt[i : i + 1],
                psi[i : i + 1],
                du[i : i + 1],
                dv[i : i + 1],
                dang[i : i + 1],
            )[0]
            place(image, one, centre + dx, centre + dy)
            true_angles[i] = rot[i], tilt[i], psi[i]
            true_origin[i] = -dx, -dy
            n_components[i] = 1
        clean[i] = image
        detail[i] = (
            f"normal_deg={normal:.1f};offset_px={offset:.1f};"
            f"step={height:.2f};with_particle={int(with_particle)}"
        )

    for i in np.flatnonzero(kinds == "off_centre"):
        distance = rng.uniform(box / 3 + 1, 0.45 * box)
        direction = rng.uniform(0, 2 * np.pi)
        dx, dy = distance * math.cos(direction), distance * math.sin(direction)
        one = scene.centred(
            rot[i : i + 1],
            tilt[i : i + 1],
            psi[i : i + 1],
            du[i : i + 1],
            dv[i : i + 1],
            dang[i : i + 1],
        )[0]
        place(clean[i], one, centre + dx, centre + dy)
        true_angles[i] = rot[i], tilt[i], psi[i]
        true_origin[i] = -dx, -dy
        n_components[i] = 1
        detail[i] = f"displacement_px={distance:.1f}"

    for i in np.flatnonzero(kinds == "aggregate"):
        k = int(rng.choice([2, 2, 3, 3, 4]))
        positions = [np.zeros(2)]
        for _ in range(k - 1):  # each new particle overlaps a previous one
            anchor = positions[rng.integers(len(positions))]
            step = rng.uniform(0.45, 0.8) * scene.diameter_px
            angle = rng.uniform(0, 2 * np.pi)
            positions.append(anchor + step * np.array([math.cos(angle), math.sin(angle)]))
        positions_arr = np.array(positions)
        positions_arr -= positions_arr.mean(axis=0) - rng.normal(0, sigma, 2)
        r2, t2, p2 = random_euler(rng, k)
        r2[0], t2[0], p2[0] = rot[i], tilt[i], psi[i]
        parts = scene.centred(r2, t2, p2, np.full(k, du[i]), np.full(k, dv[i]), np.full(k, dang[i]))
        for part, (dx, dy) in zip(parts, positions_arr, strict=True):
            place(clean[i], part, centre + dx, centre + dy)
        true_angles[i] = rot[i], tilt[i], psi[i]
        true_origin[i] = -positions_arr[0]
        n_components[i] = k
        detail[i] = "positions_px=" + ";".join(f"{x:.1f},{y:.1f}" for x, y in positions_arr)

    fragments = np.flatnonzero(kinds == "fragment")
    if len(fragments):
        variants = [scene.fragment_volume() for _ in range(min(3, len(fragments)))]
        projectors = [FourierProjector(cube) for cube, _, _ in variants]
        for j, i in enumerate(fragments):
            v = j % len(variants)
            cube, voxel, radius = variants[v]
            m = cube.shape[0]
            piece = projectors[v].project(
                rot[i : i + 1],
                tilt[i : i + 1],
                psi[i : i + 1],
                ctf=scene.ctf(du[i : i + 1], dv[i : i + 1], dang[i : i + 1], m),
            )[0]
            t = rng.normal(0, sigma, 2)  # the picker centred on the piece
            place(clean[i], piece, centre + t[0], centre + t[1])
            # pose of the whole map that puts this piece where it is: origin = (A c)_xy - t
            r_vec = np.array([voxel[2], voxel[1], voxel[0]], dtype=np.float64) - centre
            projected = euler_matrices(rot[i], tilt[i], psi[i])[0] @ r_vec
            true_angles[i] = rot[i], tilt[i], psi[i]
            true_origin[i] = projected[0] - t[0], projected[1] - t[1]
            n_components[i] = 1
            detail[i] = (
                f"piece_centre_voxel_zyx={voxel[0]},{voxel[1]},{voxel[2]};radius_px={radius:.1f}"
            )

    images = _add_noise(clean, scene, rng)
    if config.normalise:
        images, _, std = normalise_images(images)
        clean /= std[:, None, None].astype(np.float32)

    names = [f"{i + 1:06d}@{stack_name}" for i in range(n)]
    mic_names = [f"{micrograph_prefix}{m + 1:04d}.mrc" for m in mic_index]
    truth = pd.DataFrame(
        {
            "image_name": names,
            "is_good": kinds == GOOD,
            "junk_kind": kinds.astype(str),
            "rot_deg": true_angles[:, 0],
            "tilt_deg": true_angles[:, 1],
            "psi_deg": true_angles[:, 2],
            "origin_x_a": true_origin[:, 0] * pixel,
            "origin_y_a": true_origin[:, 1] * pixel,
            "defocus_u_a": du,
            "defocus_v_a": dv,
            "defocus_angle_deg": dang,
            "micrograph_name": mic_names,
            "n_components": n_components,
            "detail": detail.astype(str),
        }
    )
    # the depositor's file: true poses for good particles, plausible random ones for junk
    junk = kinds != GOOD
    star_origin = origin.copy()
    star_origin[junk] = _clip_origin(rng, int(junk.sum()), sigma)
    coord = rng.uniform(box, 4096 - box, (n, 2)).round()
    star = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnMicrographName": mic_names,
            "rlnCoordinateX": coord[:, 0],
            "rlnCoordinateY": coord[:, 1],
            "rlnAngleRot": rot,
            "rlnAngleTilt": tilt,
            "rlnAnglePsi": psi,
            "rlnOriginXAngst": star_origin[:, 0] * pixel,
            "rlnOriginYAngst": star_origin[:, 1] * pixel,
            "rlnDefocusU": du,
            "rlnDefocusV": dv,
            "rlnDefocusAngle": dang,
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
            "rlnRandomSubset": (np.arange(n) % 2 + 1).astype(np.int64),
        }
    )
    return SimulatedParticles(
        images=images,
        clean=clean if keep_clean else None,
        truth=truth,
        star=star,
        optics=config.optics(pixel, box),
        pixel_size_a=pixel,
        box=box,
        noise_sigma=scene.noise_sigma,
        signal_sigma=scene.signal_sigma,
    )


# ------------------------------------------------------------------------------ micrographs


def _signed_distance(
    x: np.ndarray | float, y: np.ndarray | float, carbon: tuple[float, float, float] | None
) -> np.ndarray | float:
    """Distance (px) of points from the carbon edge, positive on the carbon side."""
    if carbon is None:
        return -np.inf if np.isscalar(x) else np.full(np.shape(x), -np.inf)
    nx, ny, offset = carbon
    return x * nx + y * ny - offset


def _is_free(
    x: float,
    y: float,
    reach: float,
    taken: list[tuple[float, float, float]],
    min_dist: float,
    half: float,
) -> bool:
    """Whether a pick at (x, y) keeps ``min_dist`` from the others and neither pick's content
    (``reach`` px from it) enters the other's box (``half`` px around it)."""
    return all(
        (x - a) ** 2 + (y - b) ** 2 >= max(min_dist, reach + half, r + half) ** 2
        for a, b, r in taken
    )


def _pick_params(kind: str, scene: _Scene, rng: np.random.Generator, sigma: float) -> dict:
    """Random parameters of one micrograph pick, and ``reach``: how far (px) from the pick its
    content extends, so that neighbouring picks' boxes stay clear of it."""
    box, diameter = scene.box, scene.diameter_px
    if kind == "ice":
        radius = rng.uniform(0.25, 0.5) * box
        offset = rng.uniform(-0.2, 0.2, 2) * box
        wobble = [(k, rng.uniform(0, 0.08), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
        return {
            "radius": radius,
            "offset": offset,
            "wobble": wobble,
            "height": rng.uniform(6.0, 12.0),
            "reach": float(np.hypot(*offset) + 1.25 * radius + 4),
        }
    if kind == "aggregate":
        k = int(rng.choice([2, 2, 3, 3, 4]))
        positions = [np.zeros(2)]
        for _ in range(k - 1):  # each new particle overlaps a previous one
            anchor = positions[rng.integers(len(positions))]
            angle = rng.uniform(0, 2 * np.pi)
            positions.append(
                anchor
                + rng.uniform(0.45, 0.8) * diameter * np.array([math.cos(angle), math.sin(angle)])
            )
        pos = np.array(positions)
        pos -= pos.mean(axis=0) - rng.normal(0, sigma, 2)
        return {
            "positions": pos,
            "reach": float(np.sqrt((pos**2).sum(axis=1)).max() + diameter / 2),
        }
    if kind == "off_centre":
        distance = rng.uniform(box / 3 + 1, 0.45 * box)
        return {
            "distance": distance,
            "direction": rng.uniform(0, 2 * np.pi),
            "reach": distance + diameter / 2,
        }
    if kind == "carbon_edge":
        return {
            "with_particle": bool(rng.random() < 0.5),
            "depth": rng.uniform(0.25, 0.4) * diameter,
            "reach": diameter,
        }
    return {"reach": diameter / 2}


def _place_pick(
    kind: str,
    params: dict,
    spot: tuple[float, float],
    i: int,
    scene: _Scene,
    rng: np.random.Generator,
    phase: np.ndarray,
    amplitude: np.ndarray,
    carbon: tuple[float, float, float] | None,
    poses: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> dict:
    """Draw one pick's content onto the micrograph canvases; its ground-truth row.

    ``phase`` gets what the CTF filters (projections, contamination fringes), ``amplitude``
    what it does not (thickness), both in noise-sigma units times ``scene.noise_sigma`` for
    ``phase`` and plain noise-sigma units for ``amplitude``.
    """
    rot, tilt, psi = poses
    box, pixel = scene.box, scene.pixel
    x, y = spot
    row: dict = {
        "is_good": kind == GOOD,
        "junk_kind": str(kind),
        "rot_deg": np.nan,
        "tilt_deg": np.nan,
        "psi_deg": np.nan,
        "origin_x_a": np.nan,
        "origin_y_a": np.nan,
        "n_components": 0,
        "detail": "",
    }
    coord = np.array([round(x), round(y)], dtype=np.float64)
    pose = rot[i : i + 1], tilt[i : i + 1], psi[i : i + 1]
    true = None
    if kind == GOOD:
        true = np.array([x, y]) - rng.normal(0, 1.0, 2)  # picking error ~1 px
        place(phase, scene.projector.project(*pose)[0], *true)
        row["n_components"] = 1
    elif kind == "empty":
        row["detail"] = "background only"
    elif kind == "ice":
        centre = np.array([x, y]) + params["offset"]
        yy, xx = np.mgrid[: 2 * box, : 2 * box] - box
        theta = np.arctan2(yy, xx)
        wobble = 1 + sum(a * np.cos(k * theta + p) for k, a, p in params["wobble"])
        blob = 0.5 * (1 - np.tanh((np.hypot(xx, yy) - params["radius"] * wobble) / 2.0))
        blob = blob.astype(np.float32)
        place(amplitude, params["height"] * blob, *centre)
        place(phase, 0.5 * params["height"] * scene.noise_sigma * blob, *centre)
        row["detail"] = (
            f"centre_px={centre[0]:.1f},{centre[1]:.1f};"
            f"radius_px={params['radius']:.1f};amplitude={params['height']:.2f}"
        )
    elif kind == "carbon_edge":
        if params["with_particle"] and carbon is not None:
            # a particle on the ice side, its centre some way from the edge
            depth = _signed_distance(x, y, carbon) - params["depth"]
            true = np.array([x, y]) - np.array(carbon[:2]) * depth
            place(phase, scene.projector.project(*pose)[0], *true)
            row["n_components"] = 1
        row["detail"] = f"with_particle={int(params['with_particle'])}"
    elif kind == "off_centre":
        distance, direction = params["distance"], params["direction"]
        true = np.array([x + distance * math.cos(direction), y + distance * math.sin(direction)])
        place(phase, scene.projector.project(*pose)[0], *true)
        row.update(n_components=1, detail=f"displacement_px={distance:.1f}")
    elif kind == "aggregate":
        pos = params["positions"]
        r2, t2, p2 = random_euler(rng, len(pos) - 1)
        parts = scene.projector.project(np.r_[rot[i], r2], np.r_[tilt[i], t2], np.r_[psi[i], p2])
        for part, (dx, dy) in zip(parts, pos, strict=True):
            place(phase, part, x + dx, y + dy)
        true = np.array([x, y]) + pos[0]
        row["n_components"] = len(pos)
        row["detail"] = "positions_px=" + ";".join(f"{a:.1f},{b:.1f}" for a, b in pos)
    else:  # fragment
        cube, voxel, radius = scene.fragment_volume()
        piece = FourierProjector(cube, workers=1).project(*pose)[0]
        t = np.array([x, y]) + rng.normal(0, 1.0, 2)
        place(phase, piece, *t)
        r_vec = np.array([voxel[2], voxel[1], voxel[0]], dtype=np.float64) - box // 2
        projected = euler_matrices(rot[i], tilt[i], psi[i])[0] @ r_vec
        # the whole map at this pose puts the piece at t when its centre is t - (A c)_xy
        true = t - projected[:2]
        row.update(
            n_components=1,
            detail=(
                f"piece_centre_voxel_zyx={voxel[0]},{voxel[1]},{voxel[2]};radius_px={radius:.1f}"
            ),
        )
    if true is not None:
        row.update(
            rot_deg=rot[i],
            tilt_deg=tilt[i],
            psi_deg=psi[i],
            origin_x_a=(coord[0] - true[0]) * pixel,
            origin_y_a=(coord[1] - true[1]) * pixel,
        )
    row["coordinate_x_px"], row["coordinate_y_px"] = int(coord[0]), int(coord[1])
    return row


def simulate_micrographs(  # noqa: C901 - to split (pyproject: mccabe)
    density: DensityMap,
    config: SimulationConfig | None = None,
    *,
    seed: int | np.random.SeedSequence = 0,
    diameter_px: float | None = None,
    size: int = 1024,
    n_micrographs: int | None = None,
    spacing: float = 0.9,
    keep_clean: bool = False,
    name_prefix: str = "Micrographs/mic_",
) -> SimulatedMicrographs:
    """Simulate micrographs holding ``config.n_particles`` picks (good and junk), with an
    ice-thickness gradient, carbon film on about half of them, and one CTF per micrograph
    (applied to the whole image, as the microscope does).

    Picks are at least ``spacing`` boxes apart and a half box inside the micrograph; a good
    pick's coordinate is the particle centre rounded after a 1 px picking error, and its true
    origin is ``(coordinate - centre) * pixel`` (RELION sign: extraction at the coordinate then
    shows the particle at ``box // 2 - origin``). Micrographs are in raw contrast (particles and
    contamination dark), mean 0, background noise std about 1.
    """
    config = config or SimulationConfig()
    rng = np.random.default_rng(seed)
    scene = _Scene(density, config, rng, diameter_px)
    box, pixel, n = scene.box, scene.pixel, config.n_particles
    if size < 3 * box:
        raise ValueError(f"micrograph size {size} px too small for box {box} (need >= 3 boxes)")
    min_dist = spacing * box
    usable = size - box - 4
    capacity = max(1, int(0.8 * 0.547 * usable**2 / (np.pi * (min_dist / 2) ** 2)))
    n_mics = n_micrographs or max(1, math.ceil(n / capacity))
    kinds = _assign_kinds(n, config, rng)

    carbon_picks = list(np.flatnonzero(kinds == "carbon_edge"))
    other_picks = list(np.flatnonzero(kinds != "carbon_edge"))
    has_carbon = rng.random(n_mics) < 0.5
    if carbon_picks and not has_carbon.any():
        has_carbon[rng.integers(n_mics)] = True
    carbon_mics = np.flatnonzero(has_carbon)
    quota: list[list[int]] = [[] for _ in range(n_mics)]
    for j, i in enumerate(other_picks):
        quota[j % n_mics].append(int(i))
    for j, i in enumerate(carbon_picks):
        quota[int(carbon_mics[j % len(carbon_mics)])].append(int(i))

    groups = scene.defocus_groups(n_mics)
    rot, tilt, psi = random_euler(rng, n)
    sigma = config.origin_sigma_px if config.origin_sigma_px is not None else 0.02 * box
    rows: list[dict] = []
    micrographs: list[np.ndarray] = []
    names: list[str] = []
    clean_boxes: list[np.ndarray] = []
    pending: list[int] = []
    m = 0
    half = box // 2
    lo, hi = half + 2, size - half - 2
    while m < n_mics or pending:
        if m >= n_mics + 8:
            raise RuntimeError(
                f"{len(pending)} picks do not fit on {size} px micrographs "
                f"(box {box}, spacing {spacing}): use larger micrographs"
            )
        if m >= n_mics:  # leftovers that did not fit: one more micrograph
            quota.append([])
            has_carbon = np.append(has_carbon, any(kinds[i] == "carbon_edge" for i in pending))
            groups = pd.concat([groups, scene.defocus_groups(1)], ignore_index=True)
            n_mics += 1
        todo = pending + quota[m]
        pending = []
        name = f"{name_prefix}{m + 1:04d}.mrc"
        du, dv, dang = (
            # a float column of the optics/defocus table
            float(groups.at[m, c])  # pyright: ignore[reportArgumentType]
            for c in ("defocus_u_a", "defocus_v_a", "defocus_angle_deg")
        )
        carbon: tuple[float, float, float] | None = None
        if has_carbon[m]:
            phi = rng.uniform(0, 2 * np.pi)
            c, sn = math.cos(phi), math.sin(phi)
            # the edge runs across the micrograph; carbon covers the far 20-35% along the normal
            top = size * (max(c, 0) + max(sn, 0))
            bottom = size * (min(c, 0) + min(sn, 0))
            offset = top - rng.uniform(0.2, 0.35) * (top - bottom)
            carbon = (math.cos(phi), math.sin(phi), offset)
        phase = np.zeros((size, size), dtype=np.float32)  # CTF-filtered: particles, textures
        amplitude = np.zeros((size, size), dtype=np.float32)  # not CTF-filtered: thickness
        taken: list[tuple[float, float, float]] = []  # x, y, reach of the picks placed

        # carbon picks first: they need the edge line
        todo.sort(key=lambda i: kinds[i] != "carbon_edge")
        for i in todo:
            kind = kinds[i]
            if kind == "carbon_edge" and carbon is None:
                pending.append(i)  # only a micrograph with carbon film can hold it
                continue
            params = _pick_params(kind, scene, rng, sigma)
            reach = params["reach"]
            spot = None
            for _ in range(400):
                if kind == "carbon_edge" and carbon is not None:  # (always, see above)
                    # a point on the edge line, jittered by up to 15% of the box across it
                    nx_, ny_, off = carbon
                    t = rng.uniform(-size, size)
                    across = rng.uniform(-0.15, 0.15) * box
                    x = nx_ * (off + across) - ny_ * t
                    y = ny_ * (off + across) + nx_ * t
                else:
                    x, y = rng.uniform(lo, hi, 2)
                    if _signed_distance(x, y, carbon) > -(max(half, reach) + 4):
                        continue
                if lo <= x <= hi and lo <= y <= hi and _is_free(x, y, reach, taken, min_dist, half):
                    spot = (float(x), float(y))
                    break
            if spot is None:
                pending.append(i)
                continue
            taken.append((*spot, reach))
            row = _place_pick(
                kind, params, spot, i, scene, rng, phase, amplitude, carbon, (rot, tilt, psi)
            )
            row.update(
                micrograph_name=name,
                defocus_u_a=du,
                defocus_v_a=dv,
                defocus_angle_deg=dang,
                _order=int(i),
            )
            rows.append(row)

        yy, xx = np.mgrid[:size, :size].astype(np.float32)
        if carbon is not None:
            side = 0.5 * (1 + np.tanh(_signed_distance(xx, yy, carbon) / 1.5)).astype(np.float32)
            height = rng.uniform(4.0, 8.0)
            amplitude += height * side
            texture = rng.standard_normal((size, size), dtype=np.float32)
            phase += (0.5 * scene.noise_sigma) * side * texture  # amorphous carbon
        # ice thickness gradient across the micrograph (thicker ice is darker)
        direction = rng.uniform(0, 2 * np.pi)
        ramp = (xx - size / 2) * math.cos(direction) + (yy - size / 2) * math.sin(direction)
        amplitude += rng.uniform(1.0, 3.0) * ramp / size
        spectrum = sfft.rfft2(phase, workers=_WORKERS)
        if config.apply_ctf:
            c = config
            spectrum *= ctf_2d(
                size,
                pixel,
                du,
                dv,
                dang,
                voltage_kv=c.voltage_kv,
                cs_mm=c.cs_mm,
                amplitude_contrast=c.amplitude_contrast,
            )[0]
        signal = sfft.irfft2(spectrum, s=(size, size), workers=_WORKERS)
        # raw contrast: particles and thick regions dark; in units of the background noise std
        clean = -(signal / scene.noise_sigma) - amplitude
        noise = rng.standard_normal((size, size), dtype=np.float32) * (
            scene.white_sigma / scene.noise_sigma
        )
        if config.ice_texture > 0:
            noise += (
                config.ice_texture
                * scene.white_sigma
                / scene.noise_sigma
                * _lowpass_noise(rng, (size, size), box / 12)
            )
        image = clean + noise
        mean = float(image.mean())
        micrographs.append((image - mean).astype(np.float32))
        names.append(name)
        if keep_clean:
            for row in rows:
                if row["micrograph_name"] == name:
                    window = np.zeros((box, box), dtype=np.float32)
                    x0, y0 = row["coordinate_x_px"] - half, row["coordinate_y_px"] - half
                    window[:] = (clean - mean)[y0 : y0 + box, x0 : x0 + box]
                    clean_boxes.append(-window)  # contrast inverted like extracted particles
        m += 1

    picks = pd.DataFrame(rows).sort_values("_order", kind="stable").drop(columns="_order")
    order = [
        c
        for c in (
            "micrograph_name",
            "coordinate_x_px",
            "coordinate_y_px",
            "is_good",
            "junk_kind",
            "rot_deg",
            "tilt_deg",
            "psi_deg",
            "origin_x_a",
            "origin_y_a",
            "defocus_u_a",
            "defocus_v_a",
            "defocus_angle_deg",
            "n_components",
            "detail",
        )
    ]
    picks = picks[order].reset_index(drop=True)
    ctf = pd.DataFrame(
        {
            "rlnMicrographName": names,
            "rlnOpticsGroup": np.ones(len(names), dtype=np.int64),
            "rlnDefocusU": groups["defocus_u_a"].to_numpy()[: len(names)],
            "rlnDefocusV": groups["defocus_v_a"].to_numpy()[: len(names)],
            "rlnDefocusAngle": groups["defocus_angle_deg"].to_numpy()[: len(names)],
        }
    )
    ctf["rlnCtfAstigmatism"] = ctf["rlnDefocusU"] - ctf["rlnDefocusV"]
    optics = {
        "rlnOpticsGroup": 1,
        "rlnOpticsGroupName": "opticsGroup1",
        "rlnMicrographOriginalPixelSize": pixel,
        "rlnVoltage": config.voltage_kv,
        "rlnSphericalAberration": config.cs_mm,
        "rlnAmplitudeContrast": config.amplitude_contrast,
        "rlnMicrographPixelSize": pixel,
    }
    clean_stack = None
    if keep_clean:
        # rows were appended per micrograph; reorder the windows like the picks
        order_index = np.argsort([r["_order"] for r in rows], kind="stable")
        clean_stack = np.stack(clean_boxes)[order_index]
    return SimulatedMicrographs(
        micrographs=np.stack(micrographs),
        names=names,
        picks=picks,
        ctf=ctf,
        optics=optics,
        pixel_size_a=pixel,
        box=box,
        noise_sigma=scene.noise_sigma,
        signal_sigma=scene.signal_sigma,
        clean_picks=clean_stack,
    )
