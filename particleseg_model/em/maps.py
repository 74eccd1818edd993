"""Density maps for simulation: load with validation, resample, generate, and mask.

Conventions
- A map array is float32 indexed ``[z, y, x]`` (MRC section, row, column after re-ordering by
  ``mapc/mapr/maps``); its centre is voxel ``n // 2`` on every axis (RELION's origin).
- Pixel (voxel) sizes are in Angstrom; maps are cubic with isotropic voxels.
- Masks follow RELION ``relion_mask_create``: binary at ``value >= threshold``, extended by
  ``extend_px`` voxels (squared distance strictly below ``extend_px**2``) and given a raised-cosine
  soft edge ``0.5 + 0.5 cos(pi d / soft_edge_px)`` for voxels at distance ``d < soft_edge_px``
  from the extended mask.
- Generated maps are pseudo-atomic: a few thousand Gaussian atoms arranged as alpha-helical rods
  packed into protein-like domains (globular, elongated or ring-shaped assemblies), at about
  protein density (one non-hydrogen atom per 18 cubic Angstrom).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from particleseg_model.em.geometry import half_transform_freqs

__all__ = [
    "GENERATED_SHAPES",
    "DensityMap",
    "MapError",
    "atoms_map",
    "auto_threshold",
    "lowpass",
    "make_mask",
    "map_threshold",
    "centre_of_mass_shift",
    "create_mask",
    "fourier_resample",
    "fourier_shift",
    "generate_map",
    "load_map",
    "pad_or_crop",
    "particle_diameter_px",
    "prepare_map",
    "pseudo_atomic_model",
    "validate_map",
    "volume_threshold",
    "write_mrc",
]

GENERATED_SHAPES: tuple[str, ...] = ("globular", "elongated", "ring")

# Protein: ~0.81 Da per cubic Angstrom and ~14.5 Da per non-hydrogen atom (hydrogens included).
ANGSTROM3_PER_ATOM = 18.0
# Alpha helix: 1.5 A rise and 100 degrees per residue; backbone radius ~2.3 A; helix axes ~10 A
# apart in a packed domain. Side chains fill the rest of the rod out to ~5 A.
_HELIX_RISE_A = 1.5
_HELIX_TWIST_RAD = math.radians(100.0)
_HELIX_SPACING_A = 10.0


class MapError(ValueError):
    """A map that cannot be used; the message names the file (or the generated map)."""


@dataclass(frozen=True)
class DensityMap:
    """A cubic density map: ``data[z, y, x]`` float32, ``pixel_size_a`` Angstrom per voxel."""

    data: np.ndarray
    pixel_size_a: float
    source: str = ""
    volume_a3: float | None = None  # molecular volume (A^3) when known (generated maps)

    @property
    def box(self) -> int:
        return int(self.data.shape[0])


def validate_map(data: np.ndarray, pixel_size_a: float | None, source: str) -> None:
    """Raise :class:`MapError` naming ``source`` unless ``data`` is a usable cubic map."""
    if data is None or data.ndim != 3:
        shape = None if data is None else data.shape
        raise MapError(f"{source}: not a 3D map (data shape {shape})")
    if len(set(data.shape)) != 1:
        raise MapError(
            f"{source}: map is not cubic (shape z,y,x = {tuple(data.shape)}); "
            "pad or crop it to a cube first"
        )
    if data.shape[0] < 8:
        raise MapError(f"{source}: map box {data.shape[0]} is too small (need at least 8)")
    if pixel_size_a is None or not np.isfinite(pixel_size_a) or pixel_size_a <= 0:
        raise MapError(
            f"{source}: map has no voxel size (header gives {pixel_size_a!r} A); "
            "set it with e.g. relion_image_handler --angpix"
        )
    finite = np.isfinite(data)
    if not finite.all():
        raise MapError(f"{source}: map holds {int((~finite).sum())} NaN or infinite values")
    if data.size == 0 or float(np.ptp(data)) == 0.0:
        value = float(data.flat[0]) if data.size else "absent"
        raise MapError(f"{source}: map is empty (every voxel is {value})")


def _zyx_order(data: np.ndarray, header) -> np.ndarray:
    """Re-order axes so that the array is [z, y, x] whatever mapc/mapr/maps say."""
    axes = (int(header.maps), int(header.mapr), int(header.mapc))  # array axes 0, 1, 2
    if axes == (3, 2, 1) or sorted(axes) != [1, 2, 3]:
        return data
    # array axis holding spatial axis v (1=x, 2=y, 3=z); output axis 0 is z, 1 is y, 2 is x
    source_axis = {v: i for i, v in enumerate(axes)}
    return np.transpose(data, (source_axis[3], source_axis[2], source_axis[1]))


def load_map(path: str | os.PathLike) -> DensityMap:
    """Read an MRC/CCP4 map (``.mrc``, ``.map``) and validate it (see :func:`validate_map`).

    Raises:
        MapError: missing or unreadable file, not 3D, not cubic, no voxel size, anisotropic
            voxels, NaN/inf values, or an empty (constant) map. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MapError(f"{path}: map file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # permissive mode warns about odd headers
            with mrcfile.open(path, mode="r", permissive=True) as mrc:
                if mrc.data is None:
                    raise MapError(f"{path}: not an MRC/CCP4 map (unreadable header)")
                data = _zyx_order(np.asarray(mrc.data), mrc.header)
                data = np.array(data, dtype=np.float32)
                voxel = mrc.voxel_size
                sizes = (float(voxel.x), float(voxel.y), float(voxel.z))
    except MapError:
        raise
    except Exception as exc:  # mrcfile raises ValueError/OSError/EOFError on broken files
        raise MapError(f"{path}: cannot read as MRC ({exc})") from exc
    if data.ndim == 3 and data.shape[0] == 1:
        raise MapError(f"{path}: a single 2D image, not a 3D map")
    pixel = sizes[0]
    validate_map(data, pixel, str(path))
    if max(sizes) - min(sizes) > 1e-3 * max(sizes):
        raise MapError(f"{path}: voxels are not isotropic (x, y, z sizes {sizes} A)")
    return DensityMap(data=data, pixel_size_a=pixel, source=str(path))


def write_mrc(
    path: str | os.PathLike, data: np.ndarray, pixel_size_a: float, *, stack: bool = False
) -> Path:
    """Write float32 ``data`` as MRC with ``pixel_size_a``; ``stack`` marks a 2D image stack.

    The header holds no time stamp (mrcfile's default label has one), so equal data give
    equal bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
        if stack:
            mrc.set_image_stack()
        mrc.voxel_size = (pixel_size_a, pixel_size_a, 0.0 if stack else pixel_size_a)
        header = mrc.header
        assert header is not None  # mrcfile types it Optional; a new file has one
        if not stack:  # RELION and EMDB maps put the origin in the centre
            n = data.shape[0]
            header.nxstart = header.nystart = header.nzstart = -(n // 2)
        # mrcfile's default label carries the creation time: a fixed one keeps bytes equal
        header.label[:] = b""
        header.label[0] = b"particleSeg simulated data"
        header.nlabl = 1
    return path


# ------------------------------------------------------------------------------ resampling


def fourier_resample(data: np.ndarray, size: int) -> np.ndarray:
    """Resample a cubic map to ``size`` voxels a side by cropping or zero-padding its Fourier
    transform; densities keep their values (the pixel size becomes ``old * n / size``).

    Single precision half transforms: a 400^3 map needs about 0.3 GB.
    """
    n = data.shape[0]
    if size == n:
        return data.astype(np.float32, copy=True)
    spectrum = sfft.fftshift(sfft.rfftn(data.astype(np.float32), workers=-1), axes=(0, 1))
    m = min(n, size)
    out = np.zeros((size, size, size // 2 + 1), dtype=np.complex64)
    src = slice(n // 2 - m // 2, n // 2 - m // 2 + m)
    dst = slice(size // 2 - m // 2, size // 2 - m // 2 + m)
    out[dst, dst, : m // 2 + 1] = spectrum[src, src, : m // 2 + 1]
    del spectrum
    result = sfft.irfftn(sfft.ifftshift(out, axes=(0, 1)), s=(size,) * 3, workers=-1)
    return (result * (size / n) ** 3).astype(np.float32)


def pad_or_crop(data: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad or crop a cubic map around its centre voxel (``n // 2``) to ``size``."""
    n = data.shape[0]
    out = np.zeros((size,) * 3, dtype=np.float32)
    m = min(n, size)
    src = slice(n // 2 - m // 2, n // 2 - m // 2 + m)
    dst = slice(size // 2 - m // 2, size // 2 - m // 2 + m)
    out[dst, dst, dst] = data[src, src, src]
    return out


def fourier_shift(data: np.ndarray, shift_zyx: Sequence[float] | np.ndarray) -> np.ndarray:
    """Translate a map by ``shift_zyx`` voxels (sub-voxel, periodic)."""
    spectrum = sfft.rfftn(data.astype(np.float32), workers=-1)
    n = data.shape
    # separable phase ramps, one axis at a time: no full-size phase array
    for freq, shift in zip(half_transform_freqs(n), shift_zyx, strict=True):
        spectrum *= np.exp(-2j * np.pi * freq * shift).astype(np.complex64)
    return sfft.irfftn(spectrum, s=n, workers=-1).astype(np.float32)


def centre_of_mass_shift(data: np.ndarray, threshold: float) -> np.ndarray:
    """The (z, y, x) shift in voxels that moves the centre of mass of the density above
    ``threshold`` onto the centre voxel ``n // 2``."""
    weights = np.where(data >= threshold, data, 0.0).astype(np.float64)
    total = weights.sum()
    if total <= 0:
        return np.zeros(3)
    com = np.array(ndimage.center_of_mass(weights))
    return data.shape[0] // 2 - com


# ------------------------------------------------------------------------------ masks


def volume_threshold(data: np.ndarray, voxels: int) -> float:
    """The density level above which exactly ``voxels`` voxels lie (a contour by volume)."""
    voxels = min(max(int(voxels), 1), data.size - 1)
    flat = data.ravel()
    return float(np.partition(flat, flat.size - voxels)[flat.size - voxels])


def auto_threshold(data: np.ndarray) -> float:
    """A mask threshold for a map without a known contour level: the lowest level (from half the
    maximum down to 2% of it, and above 5 sigma of the noise in the outer shell) at which the
    density above it is still one connected body (the largest component holds at least 98% of
    those voxels), so that noise dust stays outside the mask."""
    top = float(data.max())
    if top <= 0:
        raise MapError("map has no positive density to threshold")
    if data.shape[0] > 160:  # connectivity of a big map: judge it on a low-passed 128^3 copy
        data = fourier_resample(data, 128)
    n = data.shape[0]
    z, y, x = np.ogrid[:n, :n, :n]
    shell = ((z - n // 2) ** 2 + (y - n // 2) ** 2 + (x - n // 2) ** 2) > (0.45 * n) ** 2
    floor = float(data[shell].mean() + 5 * data[shell].std()) if shell.any() else 0.0
    chosen = 0.5 * top
    for level in np.geomspace(0.5, 0.02, 40) * top:
        if level < floor:
            break
        labels, count = ndimage.label(data >= level)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        if sizes.max() < 0.98 * sizes.sum():
            break
        chosen = float(level)
    return chosen


def map_threshold(density: DensityMap, data: np.ndarray | None = None) -> float:
    """The contour level of ``data`` (default: the map's own data): the one enclosing the
    molecular volume when the map knows it, else :func:`auto_threshold`."""
    values = density.data if data is None else data
    if density.volume_a3:
        return volume_threshold(values, round(density.volume_a3 / density.pixel_size_a**3))
    return auto_threshold(values)


def lowpass(
    data: np.ndarray, pixel_size_a: float, resolution_a: float, edge_shells: float = 2.0
) -> np.ndarray:
    """Low-pass filter to ``resolution_a`` with a raised-cosine edge ``edge_shells`` Fourier
    shells wide (RELION's ``lowPassFilterMap``)."""
    n = data.shape[0]
    spectrum = sfft.rfftn(data.astype(np.float64), workers=-1)
    kz, ky, kx = (freq * n for freq in half_transform_freqs((n, n, n)))  # Fourier indices
    shell = np.sqrt(kz**2 + ky**2 + kx**2)
    cutoff = n * pixel_size_a / resolution_a
    low, high = cutoff - edge_shells / 2, cutoff + edge_shells / 2
    weight = np.clip((high - shell) / max(high - low, 1e-9), 0.0, 1.0)
    weight = np.where((shell > low) & (shell < high), 0.5 - 0.5 * np.cos(np.pi * weight), weight)
    return sfft.irfftn(spectrum * weight, s=data.shape, workers=-1).astype(np.float32)


def create_mask(
    data: np.ndarray, threshold: float, *, extend_px: float = 3.0, soft_edge_px: float = 6.0
) -> np.ndarray:
    """A soft mask as ``relion_mask_create --ini_threshold T --extend_inimask E
    --width_soft_edge W`` makes it (values in [0, 1], float32)."""
    binary = data >= threshold
    if not binary.any():
        raise MapError(f"no voxel reaches the mask threshold {threshold:g}")
    if extend_px > 0:
        # RELION sets a voxel when some binary voxel lies at squared distance < extend**2
        distance = ndimage.distance_transform_edt(~binary)
        binary = distance < extend_px
    elif extend_px < 0:
        distance = ndimage.distance_transform_edt(binary)
        binary = distance >= -extend_px
    mask = binary.astype(np.float32)
    if soft_edge_px > 0:
        distance = ndimage.distance_transform_edt(~binary)
        edge = (~binary) & (distance < soft_edge_px)
        mask[edge] = 0.5 + 0.5 * np.cos(np.pi * distance[edge] / soft_edge_px)
    return mask


def make_mask(
    density: DensityMap,
    *,
    lowpass_a: float | None = 15.0,
    extend_px: float = 3.0,
    soft_edge_px: float = 6.0,
) -> tuple[np.ndarray, float]:
    """The MaskCreate-style mask of a map and the threshold used (on the low-passed map, as
    ``relion_mask_create --lowpass``): low-pass, threshold (:func:`map_threshold`), extend,
    soft edge."""
    data = density.data
    if lowpass_a and lowpass_a > 2 * density.pixel_size_a:
        data = lowpass(data, density.pixel_size_a, lowpass_a)
    threshold = map_threshold(density, data)
    return create_mask(data, threshold, extend_px=extend_px, soft_edge_px=soft_edge_px), threshold


def particle_diameter_px(mask: np.ndarray, level: float = 0.5) -> float:
    """Largest extent (voxels) of the region where ``mask >= level``, measured as twice the
    largest distance from its centre of mass: the particle diameter for box and shift sizing."""
    points = np.argwhere(mask >= level)
    if len(points) == 0:
        return 0.0
    centre = points.mean(axis=0)
    return float(2 * np.sqrt(((points - centre) ** 2).sum(axis=1)).max())


def prepare_map(
    density: DensityMap, box: int, *, particle_fraction: float = 0.55, centre: bool = True
) -> DensityMap:
    """The map ready to project into ``box``-pixel particles.

    The map is centred on the centre of mass of its density above the contour level (so a
    particle at origin 0 sits in the box centre), Fourier-resampled to the pixel size at which
    the particle's diameter spans ``particle_fraction`` of the box (cropping the transform when
    the pixel grows, padding it when it shrinks; the true pixel size is recorded), then
    zero-padded or cropped to ``box`` voxels.
    """
    if not 0.1 <= particle_fraction <= 0.9:
        raise ValueError(f"particle_fraction {particle_fraction} outside [0.1, 0.9]")
    data = density.data
    threshold = map_threshold(density)
    if centre:
        shift = centre_of_mass_shift(data, threshold)
        if np.abs(shift).max() > 0.05:
            data = fourier_shift(data, shift)
    n = data.shape[0]
    diameter_px = max(particle_diameter_px((data >= threshold).astype(np.float32)), 2.0)
    target = 2 * max(4, round(n * particle_fraction * box / diameter_px / 2))
    resampled = fourier_resample(data, target) if target != n else data
    pixel = density.pixel_size_a * n / target
    final = pad_or_crop(resampled, box) if target != box else resampled
    return DensityMap(
        data=final, pixel_size_a=float(pixel), source=density.source, volume_a3=density.volume_a3
    )


# ------------------------------------------------------------------------------ generated maps


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _domain_layout(shape: str, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Domain centres (A, relative units) and semi-axes (relative) of an assembly."""
    domains: list[tuple[np.ndarray, np.ndarray]] = []
    if shape == "globular":  # three unequal domains packed around a centre
        sizes = [1.0, 0.8, 0.65]
        directions = [
            np.array([0.0, 0.0, 0.0]),
            np.array([1.0, 0.3, 0.0]),
            np.array([-0.4, 0.9, 0.5]),
        ]
        for size, direction in zip(sizes, directions, strict=True):
            axes = size * rng.uniform(0.85, 1.15, 3)
            domains.append((direction * 1.05, axes))
    elif shape == "elongated":  # a gently bent rod of five domains
        for i in range(5):
            t = i - 2
            centre = np.array([t * 1.0, 0.12 * t * t, 0.08 * t])
            domains.append((centre, np.array([0.7, 0.6, 0.55]) * rng.uniform(0.85, 1.15, 3)))
    elif shape == "ring":  # six subunits in a ring, each slightly different (no exact symmetry)
        for i in range(6):
            angle = 2 * np.pi * i / 6 + rng.uniform(-0.08, 0.08)
            centre = 1.15 * np.array([np.cos(angle), np.sin(angle), rng.uniform(-0.1, 0.1)])
            domains.append((centre, np.array([0.62, 0.5, 0.75]) * rng.uniform(0.85, 1.15, 3)))
    else:
        raise ValueError(f"unknown generated map shape {shape!r}; choose from {GENERATED_SHAPES}")
    return domains


def pseudo_atomic_model(shape: str, n_atoms: int, rng: np.random.Generator) -> np.ndarray:
    """Atom coordinates (Angstrom, ``(n, 3)`` as x, y, z, centred on 0) of a protein-like
    assembly: each domain an ellipsoid packed with alpha-helical rods (backbone on a 2.3 A
    helix, side chains out to 5 A) at protein density."""
    if n_atoms < 100:
        raise ValueError(f"n_atoms {n_atoms} too small for a protein-like model (need >= 100)")
    layout = _domain_layout(shape, rng)
    volumes = np.array([np.prod(axes) for _, axes in layout])
    # the unit of the layout so that the domains hold n_atoms at protein density
    unit = (n_atoms * ANGSTROM3_PER_ATOM / (4 / 3 * np.pi * volumes.sum())) ** (1 / 3)
    atoms: list[np.ndarray] = []
    placed: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for (centre, axes), volume in zip(layout, volumes, strict=True):
        want = int(round(n_atoms * volume / volumes.sum()))
        semi = axes * unit
        rotation = _rotation(rng)
        helix_axis = rotation @ np.array([0.0, 0.0, 1.0])
        # helix axes on a hexagonal lattice across the domain, cut by the ellipsoid
        reach = semi.max()
        ticks = np.arange(-reach, reach + 1e-6, _HELIX_SPACING_A)
        rows = np.arange(-reach, reach + 1e-6, _HELIX_SPACING_A * math.sqrt(3) / 2)
        seeds = [
            (u + 0.5 * _HELIX_SPACING_A * (j % 2), v) for j, v in enumerate(rows) for u in ticks
        ]
        u_axis = rotation @ np.array([1.0, 0.0, 0.0])
        v_axis = rotation @ np.array([0.0, 1.0, 0.0])
        domain_atoms: list[np.ndarray] = []
        for u, v in seeds:
            base = u * u_axis + v * v_axis
            steps = np.arange(-reach, reach, _HELIX_RISE_A)
            axis_points = base[None, :] + steps[:, None] * helix_axis[None, :]
            inside = (((axis_points @ rotation) / semi) ** 2).sum(axis=1) <= 1.0
            if inside.sum() < 4:
                continue
            points = axis_points[inside]
            phase = rng.uniform(0, 2 * np.pi) + _HELIX_TWIST_RAD * np.arange(len(points))
            # backbone N, CA, C, O on the 2.3 A helix; side-chain atoms further out
            for radius, dphase, jitter in (
                (1.9, -0.6, 0.2),
                (2.3, 0.0, 0.2),
                (2.0, 0.6, 0.2),
                (2.6, 0.9, 0.3),
                (3.4, 0.1, 0.5),
                (4.3, 0.2, 0.6),
                (5.0, -0.1, 0.7),
            ):
                angle = phase + dphase
                radial = np.cos(angle)[:, None] * u_axis + np.sin(angle)[:, None] * v_axis
                domain_atoms.append(points + radial * radius + rng.normal(0, jitter, points.shape))
        if not domain_atoms:
            continue
        cloud = np.concatenate(domain_atoms)
        cloud = cloud[rng.permutation(len(cloud))[:want]] + centre * unit
        # domains touch but do not interpenetrate: drop atoms inside earlier domains
        for other_centre, other_rotation, other_semi in placed:
            local = ((cloud - other_centre) @ other_rotation) / other_semi
            cloud = cloud[(local**2).sum(axis=1) > 1.0]
        placed.append((centre * unit, rotation, semi))
        atoms.append(cloud)
    model = np.concatenate(atoms)
    return model - model.mean(axis=0)


def _splat(atoms_px: np.ndarray, box: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Trilinear deposit of atoms (voxel coordinates x, y, z; mass ``weights``, default 1)
    into a [z, y, x] grid."""
    base = np.floor(atoms_px).astype(np.int64)
    frac = atoms_px - base
    mass = np.ones(len(atoms_px)) if weights is None else np.asarray(weights, np.float64)
    grid = np.zeros(box**3, dtype=np.float64)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = mass * (
                    (frac[:, 2] if dz else 1 - frac[:, 2])
                    * (frac[:, 1] if dy else 1 - frac[:, 1])
                    * (frac[:, 0] if dx else 1 - frac[:, 0])
                )
                x, y, z = base[:, 0] + dx, base[:, 1] + dy, base[:, 2] + dz
                ok = (x >= 0) & (x < box) & (y >= 0) & (y < box) & (z >= 0) & (z < box)
                index = (z[ok] * box + y[ok]) * box + x[ok]
                grid += np.bincount(index, weights=w[ok], minlength=box**3)
    return grid.reshape((box,) * 3)


def generate_map(
    shape: str,
    box: int,
    *,
    n_atoms: int = 4000,
    seed: int = 0,
    pixel_size_a: float | None = None,
    fill: float = 0.55,
    b_factor: float = 80.0,
) -> DensityMap:
    """A pseudo-atomic map of ``n_atoms`` Gaussian atoms (see :func:`pseudo_atomic_model`).

    Args:
        shape: one of :data:`GENERATED_SHAPES`.
        box: map box in voxels.
        pixel_size_a: voxel size; default: the one at which the model's largest extent spans
            ``fill`` of the box.
        b_factor: atomic B-factor (A^2); the atom Gaussian has sigma ``sqrt(B / 8) / pi`` A,
            widened to at least one voxel so that the map is not aliased.
    The map records the model's protein volume (``volume_a3``) for its contour level.
    """
    rng = np.random.default_rng(
        [seed, GENERATED_SHAPES.index(shape) if shape in GENERATED_SHAPES else 99]
    )
    atoms = pseudo_atomic_model(shape, n_atoms, rng)
    extent = 2 * np.sqrt((atoms**2).sum(axis=1)).max() + 8.0  # diameter plus atom radius, A
    pixel = pixel_size_a if pixel_size_a is not None else extent / (fill * box)
    return atoms_map(
        atoms, box, pixel, b_factor=b_factor, source=f"generated:{shape}:{n_atoms}atoms:seed{seed}"
    )


def atoms_map(
    atoms_a: np.ndarray,
    box: int,
    pixel_size_a: float,
    *,
    weights: np.ndarray | None = None,
    b_factor: float = 80.0,
    source: str = "",
) -> DensityMap:
    """The map of Gaussian atoms at ``atoms_a`` ((n, 3) x, y, z in Angstrom, 0 at the box
    centre), each of mass ``weights`` (default 1) and sigma ``sqrt(B / 8) / pi`` A (at least
    0.9 voxel, so that the map is not aliased), on a ``box``-voxel grid of ``pixel_size_a``.
    ``volume_a3`` records the atoms' protein volume (:data:`ANGSTROM3_PER_ATOM` each)."""
    sigma_a = max(math.sqrt(b_factor / 8.0) / math.pi, 0.9 * pixel_size_a)
    grid = _splat(np.asarray(atoms_a) / pixel_size_a + box // 2, box, weights)
    # Gaussian atoms: blur the deposited point masses in Fourier space (exact, one FFT)
    spectrum = sfft.rfftn(grid, workers=-1)
    kz, ky, kx = half_transform_freqs((box, box, box))
    sigma_px = sigma_a / pixel_size_a
    spectrum *= np.exp(-2 * np.pi**2 * sigma_px**2 * (kz**2 + ky**2 + kx**2))
    data = sfft.irfftn(spectrum, s=(box,) * 3, workers=-1).astype(np.float32)
    validate_map(data, pixel_size_a, source)
    return DensityMap(
        data=data,
        pixel_size_a=float(pixel_size_a),
        source=source,
        volume_a3=len(atoms_a) * ANGSTROM3_PER_ATOM,
    )
