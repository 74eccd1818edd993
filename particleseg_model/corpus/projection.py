"""Projections of a mask volume at every particle's pose: in process (fast) and by RELION.

This is the first step of the label rule (``particleseg_model.corpus.labels``): the MaskCreate-style
mask of the refined map, projected with each particle's rot/tilt/psi and origin exactly as
``relion_project --i mask --ang particles.star`` does it, then thresholded at the particle's box.

Backends
- :class:`MaskProjector` / :func:`project_masks`: in-process, batched, threaded, streamed
  (batches of ``(b, box, box)`` float32 in particle order; never the whole stack in memory).
- :func:`project_with_relion`: the reference, one ``relion_project --ang`` process for a whole
  STAR file (RELION 3.1 writes ``<root>.mrcs`` and ``<root>.star``).
- :func:`project_with_relion_per_particle`: the original particleSeg approach, one
  ``relion_project`` process per particle (kept for the benchmark).

Conventions (RELION 3.1's, see ``particleseg_model.simulation.simulate``)
- Maps ``[z, y, x]`` and images ``[y, x]`` are centred on voxel/pixel ``n // 2``. Euler angles are
  RELION's ZYZ (rot, tilt, psi) in degrees. Origins in the particle table are Angstrom
  (``origin_x_a``, ``origin_y_a``; canonical table of ``particleseg_model.em.star``); the
  projected particle lands at ``box // 2 - origin / pixel`` (``relion_project`` shifts by
  ``-origin``). Absent origin columns count as 0, as in ``relion_project``.
- Scale: ``relion_project``'s, i.e. the sum of the mask along the ray in voxels (a 0..1 mask
  30 voxels thick projects to 30), so that the original threshold of 10 keeps its meaning. Our
  projector reproduces RELION's Fourier-slice projection (gridding pre-correction, 2x zero
  padding, trilinear interpolation, frequencies inside the Nyquist circle, the same FFT
  normalisation): at full band it equals ``relion_project``'s output to float32 rounding.
- ``relion_project --ang`` converts origins to pixels with the pixel size of the *first optics
  group* of the STAR file and ignores the map's header; :func:`project_masks` instead checks
  that the mask and the particles have the same pixel size and box (or rescales on request).
- Odd boxes: images are centred on ``box // 2`` like every RELION image; ``relion_project``
  itself writes odd-sized projections one pixel off, at ``(box + 1) // 2`` (see
  ``tests/test_simulate.py``). Particles extracted by RELION have even boxes.

Speed: projecting at a reduced band (the design choice)
A mask is smooth (low-passed, extended, soft cosine edge), and a label only asks whether the
projection exceeds the threshold, so the projection is computed from its low frequencies: the
2D Fourier slice is sampled inside the circle ``|k| <= band`` (``band`` < ``box / 2``) and
zero-padded to the full box before one inverse FFT at the particle's box (exact Fourier
upsampling; the origin shift is a phase on the kept coefficients). By the Fourier slice theorem
the result is exactly RELION's projection low-passed to ``band``. Only the part of the 2x padded
3D transform within ``2 * band + 2`` of the origin is computed (padded 1D FFTs along x, y, z,
keeping the low frequencies after each), so at box 256 the set-up takes 0.2-0.3 s and about
200 MiB (a 30 MiB grid) instead of RELION's ~7 s and 2.2 GB, and each projection interpolates
``pi band^2 / 2`` samples instead of ``pi box^2 / 8``. Everything is float32/complex64; batches
are split over ``workers`` threads (numpy's take, ufuncs and pocketfft release the GIL).

``band="auto"`` (the default) calibrates the band on the mask itself: the three axis-aligned
projections are exact sums of the volume (the slice falls on grid points, no interpolation),
so the smallest band of :data:`BAND_CANDIDATES` whose low-passed axis views give the same
labels (threshold, edge band) on all but ``tolerance`` (0.2%) of their labelled pixels is used;
a sharper mask gets a larger band (a binary mask at box 64 gets the full band).

Measured (band against accuracy and cost on the EMD-1832 mask, throughput against
``relion_project`` by ``benchmarks/projection_speed.py``): ``docs/projection.md``; ``auto``
picks band 48 of 128 at box 256, 15x RELION's throughput, 99.96% of label pixels identical.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pandas as pd
from scipy import fft as sfft

from particleseg_model.atomic import atomic_write_text
from particleseg_model.corpus.labels import labels_from_projection
from particleseg_model.em.geometry import euler_matrices, relion_freq
from particleseg_model.em.maps import write_mrc
from particleseg_model.em.star import format_loop_blocks
from particleseg_model.relion.runner import RelionError, run_relion

__all__ = [
    "BAND_CANDIDATES",
    "MaskProjector",
    "Poses",
    "ProjectionError",
    "particle_poses",
    "project_masks",
    "project_with_relion",
    "project_with_relion_per_particle",
    "relion_mask_projections",
    "write_pose_star",
]

# bands tried by band="auto", smallest first (the largest usable band is always a candidate)
BAND_CANDIDATES: tuple[int, ...] = (
    16,
    24,
    32,
    40,
    48,
    56,
    64,
    80,
    96,
    112,
    128,
    160,
    192,
    256,
    320,
    384,
    512,
)

_ANGLE_COLUMNS = {"rot_deg": "rlnAngleRot", "tilt_deg": "rlnAngleTilt", "psi_deg": "rlnAnglePsi"}
_ORIGIN_COLUMNS = {"origin_x_a": "rlnOriginXAngst", "origin_y_a": "rlnOriginYAngst"}
_PIXEL_ORIGINS = {"origin_x_a": "rlnOriginX", "origin_y_a": "rlnOriginY"}  # RELION 3.0, px
_RTOL = 1e-4  # pixel sizes closer than this (relative) are the same


class ProjectionError(ValueError):
    """Inputs that cannot be projected (missing or NaN poses, mismatched box or pixel size)."""


# ------------------------------------------------------------------------------ poses


@dataclass(frozen=True)
class Poses:
    """Per-particle projection parameters: angles in degrees, origins in *pixels* of the
    particle image (RELION sign), the particles' pixel size and box when the table gives them."""

    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    origin_x_px: np.ndarray
    origin_y_px: np.ndarray
    pixel_size_a: float | None = None
    box: int | None = None
    names: np.ndarray | None = None  # image names, for error messages and STAR files

    def __len__(self) -> int:
        return len(self.rot)

    def subset(self, index: slice | np.ndarray) -> Poses:
        names = None if self.names is None else self.names[index]
        return Poses(
            self.rot[index],
            self.tilt[index],
            self.psi[index],
            self.origin_x_px[index],
            self.origin_y_px[index],
            self.pixel_size_a,
            self.box,
            names,
        )


def _describe_rows(bad: np.ndarray, names: np.ndarray | None, limit: int = 5) -> str:
    rows = np.flatnonzero(bad)
    parts = []
    for i in rows[:limit]:
        label = f"{i + 1}"
        if names is not None:
            label += f" ({names[i]})"
        parts.append(label)
    more = len(rows) - len(parts)
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def _single_value(values: pd.Series, what: str) -> float | None:
    finite = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    finite = finite[np.isfinite(finite)]
    if len(finite) == 0:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo > _RTOL * hi:
        raise ProjectionError(
            f"the particles have several {what}s ({lo:g} to {hi:g}): project "
            "each optics group separately"
        )
    return float(np.median(finite))


def particle_poses(  # noqa: C901 - to split (pyproject: mccabe)
    particles: pd.DataFrame, *, pixel_size_a: float | None = None
) -> Poses:
    """Validated poses from a particle table: the canonical one of
    :func:`particleseg_model.em.star.read_star` (``rot_deg, tilt_deg, psi_deg, origin_x_a,
    origin_y_a, pixel_size_a, image_size_px``) or RELION column names (``rlnAngleRot``, ...,
    ``rlnOriginXAngst`` in Angstrom or RELION 3.0 ``rlnOriginX`` in pixels).

    Origins are converted to pixels with the table's pixel size, else ``pixel_size_a``.

    Raises:
        ProjectionError: angle columns missing (named), NaN/infinite angles or origins (rows
            named, 1-based, with their image names), several pixel sizes or boxes in one table,
            Angstrom origins without any pixel size.
    """
    if not isinstance(particles, pd.DataFrame):
        raise ProjectionError(f"particles must be a pandas DataFrame, got {type(particles)}")
    names = None
    for col in ("image_name", "rlnImageName"):
        if col in particles:
            names = particles[col].astype(str).to_numpy()
            break

    def column(canonical: str, relion: str) -> np.ndarray | None:
        for col in (canonical, relion):
            if col in particles:
                return pd.to_numeric(particles[col], errors="coerce").to_numpy(
                    dtype=np.float64, na_value=np.nan
                )
        return None

    angles = {c: column(c, r) for c, r in _ANGLE_COLUMNS.items()}
    missing = [f"{c} (or {_ANGLE_COLUMNS[c]})" for c, v in angles.items() if v is None]
    if missing:
        raise ProjectionError(
            f"the particle table has no angle column(s) {', '.join(missing)}; "
            f"columns present: {', '.join(map(str, particles.columns[:12]))}"
            + (" ..." if len(particles.columns) > 12 else "")
        )
    for col, values in angles.items():
        bad = ~np.isfinite(values)  # type: ignore[arg-type]
        if bad.any():
            raise ProjectionError(
                f"{col}: missing (NaN) or non-numeric angle for "
                f"{int(bad.sum())} particle row(s) "
                f"{_describe_rows(bad, names)} (1-based)"
            )

    pixel = None
    for col in ("pixel_size_a", "rlnImagePixelSize"):
        if col in particles:
            pixel = _single_value(particles[col], "pixel size")
            break
    box = None
    for col in ("image_size_px", "rlnImageSize"):
        if col in particles:
            value = _single_value(particles[col], "box size")
            box = None if value is None else int(round(value))
            break
    to_px = pixel if pixel is not None else pixel_size_a

    origins = {}
    for col, label in _ORIGIN_COLUMNS.items():
        angst = column(col, label)
        if angst is None and _PIXEL_ORIGINS[col] in particles:
            origins[col] = pd.to_numeric(particles[_PIXEL_ORIGINS[col]], errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
            continue
        if angst is None:  # relion_project reads an absent origin as 0
            origins[col] = np.zeros(len(particles))
            continue
        bad = ~np.isfinite(angst)
        if bad.any():
            raise ProjectionError(
                f"{col}: missing (NaN) or non-numeric origin for "
                f"{int(bad.sum())} particle row(s) "
                f"{_describe_rows(bad, names)} (1-based); set absent origins "
                "to 0 if the particles are centred"
            )
        if to_px is None:
            if np.any(angst != 0):
                raise ProjectionError(
                    "origins are in Angstrom but neither the particle table "
                    "(pixel_size_a) nor the caller gives a pixel size"
                )
            origins[col] = angst
        else:
            origins[col] = angst / to_px
    for col, values in origins.items():
        bad = ~np.isfinite(values)
        if bad.any():
            raise ProjectionError(
                f"{col}: missing (NaN) origin for particle row(s) "
                f"{_describe_rows(bad, names)} (1-based)"
            )
    return Poses(
        angles["rot_deg"],  # type: ignore[arg-type]
        angles["tilt_deg"],  # type: ignore[arg-type]
        angles["psi_deg"],  # type: ignore[arg-type]
        origins["origin_x_a"],
        origins["origin_y_a"],
        pixel,
        box,
        names,
    )


# ------------------------------------------------------------------------------ projector


def _gridding_corrected(volume: np.ndarray, pad: int, slab: int = 16) -> np.ndarray:
    """RELION's gridding pre-correction: trilinear interpolation in Fourier space multiplies
    real space by ``sinc^2(r / (pad n))``; divide it out beforehand (float32, slab by slab)."""
    n = volume.shape[0]
    axis = (((np.arange(n) - n // 2) / (pad * n)) ** 2).astype(np.float32)
    plane = axis[:, None] + axis[None, :]
    out = np.empty(volume.shape, dtype=np.float32)
    for z in range(0, n, slab):
        r = np.sqrt(axis[z : z + slab, None, None] + plane[None])
        out[z : z + slab] = volume[z : z + slab] / np.sinc(r) ** 2
    return out


def _padded_low_transform(
    volume: np.ndarray, pad: int, half: int, workers: int, slab: int = 16
) -> np.ndarray:
    """The 3D DFT of ``volume`` zero-padded to ``pad * n``, phases referred to voxel ``n // 2``,
    at frequencies ``-half <= qz, qy <= half`` and ``0 <= qx <= half`` only: ``(2 half + 1,
    2 half + 1, half + 1)`` complex64, zero frequency at index ``half`` along z and y.

    Separable: padded 1D FFTs along x then y (slab by slab along z), keeping the low
    frequencies after each, then along z, so that the full padded transform never exists (the
    same numbers as ``rfftn`` of the padded volume).
    """
    n = volume.shape[0]
    size = pad * n
    centre = n // 2
    q = np.arange(-half, half + 1)

    def ramp(k: np.ndarray) -> np.ndarray:  # moves the phase origin from voxel 0 to n // 2
        return np.exp(2j * np.pi * (k * centre % size) / size).astype(np.complex64)

    ramp_x, ramp_q = ramp(np.arange(half + 1)), ramp(q)
    rows = q % size
    planes = np.empty((n, len(q), half + 1), dtype=np.complex64)
    for z in range(0, n, slab):
        part = sfft.rfft(volume[z : z + slab], n=size, axis=2, workers=workers)[:, :, : half + 1]
        part = part * ramp_x
        part = sfft.fft(part, n=size, axis=1, workers=workers)[:, rows, :]
        part *= ramp_q[None, :, None]
        planes[z : z + slab] = part
    spec = sfft.fft(planes, n=size, axis=0, workers=workers)[rows]
    del planes
    spec *= ramp_q[:, None, None]
    if 2 * half >= size:  # +size/2 aliases -size/2: RELION's grid holds only -size/2
        top = q >= size // 2
        spec[top] = 0
        spec[:, top] = 0
    return spec.astype(np.complex64, copy=False)


def _lowpass_2d(images: np.ndarray, band: float) -> np.ndarray:
    """Keep the 2D frequencies ``|k| <= band`` (cycles per image) of ``(b, n, n)`` images."""
    n = images.shape[-1]
    spectrum = sfft.rfft2(images)
    ky = relion_freq(n)[:, None]
    kx = np.arange(n // 2 + 1)[None, :]
    spectrum[..., ky**2 + kx**2 > band * band] = 0
    return sfft.irfft2(spectrum, s=(n, n)).astype(np.float32)


class MaskProjector:
    """Band-limited RELION projections of a mask (see the module docstring).

    Args:
        mask: cubic ``[z, y, x]`` volume (any real map; a 0..1 mask for labels).
        pixel_size_a: the mask's voxel size (Angstrom); with ``particle_pixel_size_a`` it
            rescales the projection to the particles' pixel (frequency scaling and a
            ``(mask pixel / particle pixel)^3`` factor on the transform, i.e. the line integral
            in particle pixels, as if the mask had been resampled to the particles' pixel).
        box: the particle box (default: the mask's); a different box shows more or less of the
            mask's surroundings, at the particle pixel size.
        band: the highest 2D frequency kept (cycles per particle box), ``"auto"`` (calibrated,
            see the module docstring) or ``None`` for everything up to Nyquist (= RELION).
        threshold, edge_px, tolerance: the label rule that ``band="auto"`` calibrates for.
        pad, gridding: RELION's padding factor and gridding pre-correction.
        workers: threads for the set-up FFTs and for :meth:`project` / :meth:`stream`.

    Attributes: ``band`` (the band used), ``box``, ``scale`` (frequency scale, 1 without
    rescaling), ``setup_s`` (seconds the set-up took), ``calibration`` (band -> fraction of
    mismatched labelled pixels, when ``band="auto"``).
    """

    def __init__(
        self,
        mask: np.ndarray,
        *,
        pixel_size_a: float | None = None,
        box: int | None = None,
        particle_pixel_size_a: float | None = None,
        band: int | str | None = "auto",
        threshold: float = 10.0,
        edge_px: int = 11,
        tolerance: float = 2e-3,
        pad: int = 2,
        gridding: bool = True,
        workers: int = 2,
    ):
        started = time.perf_counter()
        volume = np.asarray(mask)
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise ProjectionError(f"the mask must be a cubic 3D volume, got shape {volume.shape}")
        if not np.isfinite(volume).all():
            raise ProjectionError("the mask holds NaN or infinite values")
        n = volume.shape[0]
        self.map_box = n
        self.box = int(box) if box is not None else n
        if self.box < 2:
            raise ProjectionError(f"box {self.box} is too small")
        self.pad, self.workers = int(pad), max(1, int(workers))
        p_map, p_part = pixel_size_a, particle_pixel_size_a
        if p_map is not None and p_part is not None:
            self.scale = (n * p_map) / (self.box * p_part)
            self.amplitude = float((p_map / p_part) ** 3)
            self.pixel_ratio = p_map / p_part  # projection units per map-voxel line integral
        else:
            self.scale = n / self.box
            self.amplitude, self.pixel_ratio = 1.0, 1.0
        # RELION's r_max: the slice stays inside the map's Nyquist sphere and the image's
        self.max_band = int(min(self.box // 2, math.floor((n // 2) / self.scale + 1e-9)))
        vol = _gridding_corrected(volume, self.pad) if gridding else volume.astype(np.float32)
        self.calibration: dict[int, float] = {}
        if band is None:
            chosen = self.max_band
        elif isinstance(band, str):
            if band != "auto":
                raise ValueError(f"band must be an int, 'auto' or None, got {band!r}")
            chosen = self._calibrate(vol, threshold, edge_px, tolerance)
        else:
            if int(band) < 1:
                raise ValueError(f"band must be >= 1, got {band}")
            chosen = min(int(band), self.max_band)
        self.band = chosen
        self._build(vol)
        self.setup_s = time.perf_counter() - started

    # -- set-up -----------------------------------------------------------------------------
    def _calibrate(self, vol: np.ndarray, threshold: float, edge_px: int, tolerance: float) -> int:
        """Smallest band whose low-passed axis views keep the labels (see module docstring)."""
        ratio = self.pixel_ratio
        views = np.stack([vol.sum(axis=a) for a in range(3)]).astype(np.float32)
        # in map pixels: threshold in map-voxel line integrals, edge square in map pixels
        t_map = threshold / ratio
        edge_map = int(round((edge_px - 1) / 2 / ratio)) * 2 + 1
        truth = labels_from_projection(views, t_map, edge_map)
        labelled = max(int(np.count_nonzero(truth)), 1)
        candidates = [b for b in BAND_CANDIDATES if b < self.max_band] + [self.max_band]
        for band in candidates:
            low = _lowpass_2d(views, band * self.scale)
            mismatch = np.count_nonzero(labels_from_projection(low, t_map, edge_map) != truth)
            self.calibration[band] = mismatch / labelled
            if mismatch / labelled <= tolerance:
                return band
        return self.max_band

    def _build(self, vol: np.ndarray) -> None:
        n, pad = self.map_box, self.pad
        size = pad * n
        reach = pad * self.band * self.scale  # largest |q| a slice sample needs
        half = min(int(math.ceil(reach)) + 1, size // 2)
        spec = _padded_low_transform(vol, pad, half, self.workers)
        radius = (n // 2) * pad  # RELION keeps the padded transform inside this sphere
        k = np.arange(-half, half + 1)
        kx = np.arange(half + 1)
        outside = (
            k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2 > radius * radius
        )
        spec[outside] = 0
        m = 2 * half + 1
        # one zero plane beyond every upper edge: trilinear neighbours never fall outside
        grid = np.zeros((m + 1, m + 1, half + 2), dtype=np.complex64)
        grid[:m, :m, : half + 1] = spec
        self._half, self._grid, self._flat = half, grid, grid.reshape(-1)
        self._grid_bytes = grid.nbytes
        # the 2D half-plane frequencies kept: inside the circle of radius band
        N = self.box
        ky = relion_freq(N)
        kxs = np.arange(N // 2 + 1)
        rows, cols = np.nonzero(ky[:, None] ** 2 + kxs[None, :] ** 2 <= self.band**2)
        self._rows, self._cols = rows, cols
        self._kxy = np.stack([kxs[cols], ky[rows]]).astype(np.float64)  # (2, K)
        self._ky_full = ky.astype(np.float64)
        self._kx_cols = np.arange(int(cols.max()) + 1 if len(cols) else 1, dtype=np.float64)

    @property
    def samples_per_projection(self) -> int:
        return len(self._rows)

    # -- projection ---------------------------------------------------------------------------
    def _interpolate(self, matrices: np.ndarray) -> np.ndarray:
        """Trilinear samples of the 3D transform on the slices of ``matrices``: ``(b, K)``."""
        f = self.pad * self.scale
        # q[b, :, k] = f * (kx * row0 + ky * row1) of the rotation matrix
        q = np.matmul(f * matrices[:, :2, :].transpose(0, 2, 1), self._kxy)  # (b, 3, K)
        x, y, z = q[:, 0], q[:, 1], q[:, 2]
        negative = x < 0  # Friedel: F(-q) = conj F(q); the half transform holds qx >= 0
        sign = np.where(negative, -1.0, 1.0)
        x, y, z = x * sign, y * sign + self._half, z * sign + self._half
        x0, y0, z0 = np.floor(x), np.floor(y), np.floor(z)
        fx, fy, fz = (
            (x - x0).astype(np.float32),
            (y - y0).astype(np.float32),
            (z - z0).astype(np.float32),
        )
        _, ny, nx = self._grid.shape
        base = (z0.astype(np.int32) * np.int32(ny) + y0.astype(np.int32)) * np.int32(
            nx
        ) + x0.astype(np.int32)
        gx = 1 - fx
        out = np.zeros(base.shape, dtype=np.complex64)
        take = self._flat.take
        for dz, wz in ((0, 1 - fz), (1, fz)):
            for dy, wy in ((0, 1 - fy), (1, fy)):
                w = wz * wy
                index = base + np.int32((dz * ny + dy) * nx)
                out += take(index) * (w * gx)
                index += 1
                out += take(index) * (w * fx)
        np.conjugate(out, out=out, where=negative)
        return out

    def _project_chunk(
        self, rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray, ox: np.ndarray, oy: np.ndarray
    ) -> np.ndarray:
        N = self.box
        values = self._interpolate(euler_matrices(rot, tilt, psi))
        # phases: the particle centre at N // 2 - origin (RELION shifts by -origin)
        # (separable: one exponential per kept column and per row, then gathered)
        cx = (N // 2 - ox)[:, None]
        cy = (N // 2 - oy)[:, None]
        col = np.exp((-2j * np.pi / N) * self._kx_cols[None, :] * cx).astype(np.complex64)
        row = np.exp((-2j * np.pi / N) * self._ky_full[None, :] * cy).astype(np.complex64)
        values *= col[:, self._cols]
        values *= row[:, self._rows]
        if self.amplitude != 1.0:
            values *= np.float32(self.amplitude)
        spectra = np.zeros((len(rot), N, N // 2 + 1), dtype=np.complex64)
        spectra[:, self._rows, self._cols] = values
        return sfft.irfft2(spectra, s=(N, N), workers=1).astype(np.float32, copy=False)

    def project(
        self,
        rot: Sequence[float] | np.ndarray,
        tilt: Sequence[float] | np.ndarray,
        psi: Sequence[float] | np.ndarray,
        origin_x_px: np.ndarray | float = 0.0,
        origin_y_px: np.ndarray | float = 0.0,
        chunk: int = 16,
    ) -> np.ndarray:
        """Projections ``(b, box, box)`` float32; origins in particle *pixels* (RELION sign)."""
        rot, tilt, psi = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi))
        ox = np.broadcast_to(np.asarray(origin_x_px, dtype=np.float64), rot.shape)
        oy = np.broadcast_to(np.asarray(origin_y_px, dtype=np.float64), rot.shape)
        starts = list(range(0, len(rot), chunk))
        if self.workers == 1 or len(starts) < 2:
            parts = [
                self._project_chunk(
                    rot[s : s + chunk],
                    tilt[s : s + chunk],
                    psi[s : s + chunk],
                    ox[s : s + chunk],
                    oy[s : s + chunk],
                )
                for s in starts
            ]
        else:
            with ThreadPoolExecutor(self.workers) as pool:
                parts = list(
                    pool.map(
                        lambda s: self._project_chunk(
                            rot[s : s + chunk],
                            tilt[s : s + chunk],
                            psi[s : s + chunk],
                            ox[s : s + chunk],
                            oy[s : s + chunk],
                        ),
                        starts,
                    )
                )
        if not parts:
            return np.zeros((0, self.box, self.box), dtype=np.float32)
        return np.concatenate(parts)

    def stream(
        self, poses: Poses, *, batch: int = 64, progress: Callable[[int], Any] | Any | None = None
    ) -> Iterator[np.ndarray]:
        """Batches ``(b, box, box)`` float32 in particle order, computed ahead by ``workers``
        threads (at most ``workers + 1`` batches in memory). ``progress``: a callable taking
        the number of projections just finished, or a tqdm-like bar (its ``update``)."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        update = getattr(progress, "update", progress)
        n = len(poses)
        chunk = max(1, min(16, batch))

        def work(start: int) -> np.ndarray:
            stop = min(start + batch, n)
            out = np.empty((stop - start, self.box, self.box), dtype=np.float32)
            for s in range(start, stop, chunk):
                e = min(s + chunk, stop)
                out[s - start : e - start] = self._project_chunk(
                    poses.rot[s:e],
                    poses.tilt[s:e],
                    poses.psi[s:e],
                    poses.origin_x_px[s:e],
                    poses.origin_y_px[s:e],
                )
            return out

        pool = ThreadPoolExecutor(self.workers)
        pending: deque[Future] = deque()
        try:
            for start in range(0, n, batch):
                pending.append(pool.submit(work, start))
                if len(pending) > self.workers:
                    result = pending.popleft().result()
                    if update is not None:
                        update(len(result))
                    yield result
            while pending:
                result = pending.popleft().result()
                if update is not None:
                    update(len(result))
                yield result
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)


def project_masks(
    mask: np.ndarray,
    particles: pd.DataFrame,
    *,
    pixel_size_a: float,
    batch: int = 64,
    workers: int = 2,
    progress: Callable[[int], Any] | Any | None = None,
    band: int | str | None = "auto",
    rescale: bool = False,
    threshold: float = 10.0,
    edge_px: int = 11,
    projector: MaskProjector | None = None,
) -> Iterator[np.ndarray]:
    """Project ``mask`` at every particle's pose and origin: an iterator of float32 batches
    ``(b, box, box)`` in particle order (streamed, see :meth:`MaskProjector.stream`).

    Args:
        mask: the cubic 0..1 mask volume ``[z, y, x]``.
        particles: canonical particle table (``read_star(...).particles``) or RELION columns.
        pixel_size_a: the mask's voxel size in Angstrom.
        band: see :class:`MaskProjector` (``"auto"``: calibrated for ``threshold`` and
            ``edge_px``; ``None``: full band, equal to ``relion_project``).
        rescale: allow a mask whose pixel size or box differs from the particles': the
            projection is made at the particles' pixel size and box (as if the mask had been
            Fourier-resampled to them); otherwise such a difference is an error.
        projector: a :class:`MaskProjector` built before (reused; its set-up is skipped).

    Validation happens on the call (not on the first ``next``). Raises:
        ProjectionError: see :func:`particle_poses`; the mask's box differs from the particles'
            box (``image_size_px``), or the mask's pixel size from the particles'
            (``pixel_size_a``), unless ``rescale``.
    """
    volume = np.asarray(mask)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ProjectionError(f"the mask must be a cubic 3D volume, got shape {volume.shape}")
    if not (pixel_size_a and np.isfinite(pixel_size_a) and pixel_size_a > 0):
        raise ProjectionError(
            f"the mask's pixel size must be a positive number of Angstrom, got {pixel_size_a!r}"
        )
    poses = particle_poses(particles, pixel_size_a=pixel_size_a)
    n = volume.shape[0]
    box = poses.box if poses.box is not None else n
    particle_pixel = poses.pixel_size_a if poses.pixel_size_a is not None else pixel_size_a
    if abs(particle_pixel - pixel_size_a) > _RTOL * particle_pixel and not rescale:
        raise ProjectionError(
            f"pixel size mismatch: the mask has {pixel_size_a:g} A/px but the particles have "
            f"{particle_pixel:g} A/px; resample the mask to the particles' pixel size or pass "
            "rescale=True"
        )
    if box != n and not rescale:
        raise ProjectionError(
            f"box mismatch: the mask is {n} voxels a side but the particles' box "
            f"(image_size_px) is {box} px; pad/crop or resample the mask, or pass rescale=True"
        )
    if projector is None:
        projector = MaskProjector(
            volume,
            pixel_size_a=pixel_size_a,
            box=box,
            particle_pixel_size_a=particle_pixel,
            band=band,
            threshold=threshold,
            edge_px=edge_px,
            workers=workers,
        )
    elif projector.box != box or projector.map_box != n:
        raise ProjectionError(
            f"the projector was built for box {projector.box} from a "
            f"{projector.map_box}^3 mask, not box {box} from {n}^3"
        )
    return projector.stream(poses, batch=batch, progress=progress)


# ------------------------------------------------------------------------------ RELION


def _relion(program: str, relion_bin: str | os.PathLike | None) -> str:
    if relion_bin is not None:
        path = Path(relion_bin) / program
        if not path.is_file():
            raise FileNotFoundError(f"{program} not found in {relion_bin}")
        return str(path)
    found = shutil.which(program)
    if found is None:
        raise FileNotFoundError(f"{program} is not on PATH (apt-get install relion)")
    return found


def _run(command: list[str], cwd: Path, timeout_s: float | None) -> None:
    # the one RELION runner: its error text, the command and a timeout that kills the program
    run_relion(command, cwd=cwd, timeout_s=timeout_s)


def write_pose_star(
    path: str | os.PathLike, poses: Poses | pd.DataFrame, *, pixel_size_a: float, box: int
) -> Path:
    """A minimal RELION 3.1 STAR file (one optics group; image names, angles, origins in
    Angstrom) that ``relion_project --ang`` reads, with the poses exactly as given (``%.6f``)."""
    if isinstance(poses, pd.DataFrame):
        poses = particle_poses(poses, pixel_size_a=pixel_size_a)
    path = Path(path)
    names = (
        poses.names
        if poses.names is not None
        else np.array([f"{i + 1}@poses.mrcs" for i in range(len(poses))])
    )
    optics = {
        "rlnOpticsGroup": 1,
        "rlnOpticsGroupName": "opticsGroup1",
        "rlnVoltage": 300.0,
        "rlnSphericalAberration": 2.7,
        "rlnAmplitudeContrast": 0.1,
        "rlnImagePixelSize": float(pixel_size_a),
        "rlnImageSize": int(box),
        "rlnImageDimensionality": 2,
    }
    # the pose values as text: six places here, full precision in the optics table
    values = {
        "rlnAngleRot": poses.rot,
        "rlnAngleTilt": poses.tilt,
        "rlnAnglePsi": poses.psi,
        "rlnOriginXAngst": poses.origin_x_px * pixel_size_a,
        "rlnOriginYAngst": poses.origin_y_px * pixel_size_a,
    }
    particles = pd.DataFrame(
        {
            "rlnImageName": names,
            **{label: [f"{v:.6f}" for v in column] for label, column in values.items()},
            "rlnOpticsGroup": 1,
        }
    )
    text = format_loop_blocks({"optics": optics, "particles": particles})
    # the bytes this function always wrote: no blank line after the last particle
    atomic_write_text(path, text.removesuffix("\n"))
    return path


def project_with_relion(
    mask_path: str | os.PathLike,
    star_path: str | os.PathLike,
    out_mrcs: str | os.PathLike,
    *,
    angpix: float | None = None,
    relion_bin: str | os.PathLike | None = None,
    timeout_s: float | None = None,
    check_origins: bool = True,
) -> Path:
    """Run ONE ``relion_project --i mask --ang star --o root`` for every particle of the STAR
    file; returns ``out_mrcs`` (RELION writes ``<root>.mrcs`` and ``<root>.star`` beside it,
    the STAR's image names relative to that folder).

    RELION converts the STAR's Angstrom origins to pixels with the pixel size of its first
    optics group (``--angpix`` overrides), whatever the map header says. From a file with a
    ``data_optics`` block it reads only ``rlnOriginX/YAngst``: pixel origins (``rlnOriginX/Y``)
    there are silently taken as 0 (measured with RELION 3.1.3 on
    ``aspire_rln_proj_65_shifted.star``), so such a file is refused unless
    ``check_origins=False``; rewrite it with :func:`write_pose_star` (Angstrom origins).

    Raises:
        FileNotFoundError: no ``relion_project``, or a missing input.
        ProjectionError: pixel origins in a STAR file with optics (see above).
        RelionError: RELION failed, or wrote a different number of images than particles.
    """
    mask_path, star_path, out_mrcs = Path(mask_path), Path(star_path), Path(out_mrcs)
    for p in (mask_path, star_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found")
    if check_origins:
        text = star_path.read_text(encoding="utf-8", errors="replace")
        labels = set(re.findall(r"^\s*_(rln\w+)", text, flags=re.MULTILINE))
        if (
            re.search(r"^\s*data_optics\b", text, flags=re.MULTILINE)
            and labels & {"rlnOriginX", "rlnOriginY"}
            and not labels & {"rlnOriginXAngst", "rlnOriginYAngst"}
        ):
            raise ProjectionError(
                f"{star_path}: origins in pixels (rlnOriginX/rlnOriginY) in a file with "
                "data_optics: relion_project reads only rlnOriginXAngst/YAngst from such a "
                "file and would project every particle unshifted; rewrite it with "
                "write_pose_star(path, read_star(star).particles, ...)"
            )
    if out_mrcs.suffix != ".mrcs":
        raise ValueError(f"{out_mrcs}: the output stack must end in .mrcs (RELION appends it)")
    out_mrcs.parent.mkdir(parents=True, exist_ok=True)
    command = [
        _relion("relion_project", relion_bin),
        "--i",
        str(mask_path.resolve()),
        "--ang",
        str(star_path.resolve()),
        "--o",
        out_mrcs.stem,
    ]
    if angpix is not None:
        command += ["--angpix", repr(float(angpix))]
    _run(command, out_mrcs.parent, timeout_s)
    if not out_mrcs.is_file():
        raise RelionError(f"{' '.join(command)}: wrote no {out_mrcs}")
    expected = _count_star_rows(out_mrcs.with_suffix(".star"))
    with mrcfile.mmap(out_mrcs, mode="r", permissive=True) as mrc:
        # mrcfile types header/data as Optional; an opened file has both
        written = int(mrc.header.nz)  # pyright: ignore[reportOptionalMemberAccess]
    if expected is not None and written != expected:
        raise RelionError(f"{out_mrcs}: {written} images for {expected} particles")
    return out_mrcs


def _count_star_rows(path: Path) -> int | None:
    """Rows of the particles loop of a STAR file RELION wrote (None if it is absent)."""
    if not path.is_file():
        return None
    count, inside = 0, False
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("data_"):
            inside = text == "data_particles"
            continue
        if inside and text and not text.startswith(("_", "#", "loop_")):
            count += 1
    return count


def relion_mask_projections(
    mask: np.ndarray,
    particles: pd.DataFrame | Poses,
    workdir: str | os.PathLike,
    *,
    pixel_size_a: float,
    relion_bin: str | os.PathLike | None = None,
    timeout_s: float | None = None,
) -> Path:
    """The reference backend end to end: write ``mask`` (``mask.mrc``) and the poses
    (``poses.star``, at the mask's pixel size and box) into ``workdir``, run one
    :func:`project_with_relion`, return the path of ``projections.mrcs`` (open it with
    ``mrcfile.mmap`` to stream it)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    volume = np.asarray(mask, dtype=np.float32)
    poses = (
        particles
        if isinstance(particles, Poses)
        else particle_poses(particles, pixel_size_a=pixel_size_a)
    )
    write_mrc(workdir / "mask.mrc", volume, pixel_size_a)
    write_pose_star(workdir / "poses.star", poses, pixel_size_a=pixel_size_a, box=volume.shape[0])
    return project_with_relion(
        workdir / "mask.mrc",
        workdir / "poses.star",
        workdir / "projections.mrcs",
        relion_bin=relion_bin,
        timeout_s=timeout_s,
    )


def project_with_relion_per_particle(
    mask_path: str | os.PathLike,
    particles: pd.DataFrame | Poses,
    *,
    pixel_size_a: float,
    indices: Sequence[int] | None = None,
    relion_bin: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    timeout_s: float | None = None,
) -> np.ndarray:
    """The original particleSeg approach: one ``relion_project --rot --tilt --psi --xoff
    --yoff`` process per particle (origins in pixels). Returns ``(len(indices), box, box)``
    float32 for the chosen particle positions (default: all)."""
    mask_path = Path(mask_path).resolve()
    if not mask_path.is_file():
        raise FileNotFoundError(f"{mask_path}: not found")
    poses = (
        particles
        if isinstance(particles, Poses)
        else particle_poses(particles, pixel_size_a=pixel_size_a)
    )
    chosen = range(len(poses)) if indices is None else list(indices)
    program = _relion("relion_project", relion_bin)
    images = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i in chosen:
            out = Path(tmp) / f"particle_{i + 1:06d}.mrc"
            command = [
                program,
                "--i",
                str(mask_path),
                "--o",
                out.name,
                "--rot",
                f"{poses.rot[i]:.6f}",
                "--tilt",
                f"{poses.tilt[i]:.6f}",
                "--psi",
                f"{poses.psi[i]:.6f}",
                "--xoff",
                f"{poses.origin_x_px[i]:.6f}",
                "--yoff",
                f"{poses.origin_y_px[i]:.6f}",
                "--angpix",
                repr(float(pixel_size_a)),
            ]
            _run(command, Path(tmp), timeout_s)
            with mrcfile.open(out, permissive=True) as mrc:
                # mrcfile types header/data as Optional; an opened file has both
                images.append(np.array(mrc.data, dtype=np.float32).reshape(mrc.data.shape[-2:]))  # pyright: ignore[reportOptionalMemberAccess]
            out.unlink()
    if not images:
        return np.zeros((0, 0, 0), dtype=np.float32)
    return np.stack(images)
