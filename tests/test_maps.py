"""Maps: loading with validation, resampling, MaskCreate-style masks, generated maps."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from particleseg_model.em.maps import (
    GENERATED_SHAPES,
    DensityMap,
    MapError,
    create_mask,
    fourier_resample,
    generate_map,
    load_map,
    make_mask,
    particle_diameter_px,
    prepare_map,
    pseudo_atomic_model,
    write_mrc,
)


def _write(path: Path, data: np.ndarray, voxel: float | None = 2.0) -> Path:
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        warnings.simplefilter("ignore")  # mrcfile warns about NaN data, written on purpose
        mrc.set_data(data.astype(np.float32))
        if voxel is not None:
            mrc.voxel_size = voxel
    return path


def _blob(n: int = 32, sigma: float = 3.0) -> np.ndarray:
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    return np.exp(-(x**2 + (y / 1.5) ** 2 + z**2) / (2 * sigma**2)).astype(np.float32)


# ------------------------------------------------------------------------------ loading


def test_load_real_maps(shared_data: Path) -> None:
    emd_1832 = load_map(shared_data / "maps" / "emd_1832.map")
    assert emd_1832.data.shape == (64, 64, 64)
    assert emd_1832.pixel_size_a == pytest.approx(5.7)
    emd_5625 = load_map(shared_data / "maps" / "emd_5625.map")
    assert emd_5625.data.shape == (56, 56, 56)
    assert emd_5625.pixel_size_a == pytest.approx(4.23)


@pytest.mark.parametrize(
    ("name", "data", "voxel", "message"),
    [
        ("flat.mrc", np.ones((16, 20, 20)), 2.0, "not cubic"),
        ("novoxel.mrc", _blob(16), None, "no voxel size"),
        ("nan.mrc", np.where(_blob(16) > 0.5, np.nan, _blob(16)), 2.0, "NaN"),
        ("zeros.mrc", np.zeros((16, 16, 16)), 2.0, "empty"),
        ("image.mrc", np.ones((1, 16, 16)), 2.0, "2D image"),
    ],
)
def test_bad_maps_name_the_file(
    tmp_path: Path, name: str, data: np.ndarray, voxel: float | None, message: str
) -> None:
    path = _write(tmp_path / name, data, voxel)
    with pytest.raises(MapError, match=message) as info:
        load_map(path)
    assert str(path) in str(info.value)


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(MapError, match="not found"):
        load_map(tmp_path / "absent.mrc")
    garbage = tmp_path / "garbage.map"
    garbage.write_bytes(b"not a map at all" * 10)
    with pytest.raises(MapError) as info:
        load_map(garbage)
    assert str(garbage) in str(info.value)


def test_axis_order_is_normalised(tmp_path: Path) -> None:
    """A map stored with mapc/mapr/maps = 3/2/1 (x slowest) reads as [z, y, x]."""
    data = np.random.default_rng(0).random((8, 10, 12)).astype(np.float32)  # [z, y, x]
    stored = np.ascontiguousarray(data.transpose(2, 1, 0))  # [x, y, z]: sections along x
    path = tmp_path / "swapped.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(stored)
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 3, 2, 1
        mrc.voxel_size = 1.0
    with pytest.raises(MapError, match="not cubic"):  # still validated after re-ordering
        load_map(path)
    from particleseg_model.em.maps import _zyx_order

    with mrcfile.open(path) as mrc:
        assert np.array_equal(_zyx_order(np.asarray(mrc.data), mrc.header), data)


def test_write_mrc_round_trip(tmp_path: Path) -> None:
    blob = _blob(16)
    path = write_mrc(tmp_path / "m.mrc", blob, 1.5)
    back = load_map(path)
    assert np.array_equal(back.data, blob)
    assert back.pixel_size_a == pytest.approx(1.5)


# ------------------------------------------------------------------------------ resampling


def test_fourier_resample_keeps_values_and_shape() -> None:
    blob = _blob(32, sigma=4.0)
    up = fourier_resample(blob, 48)
    assert up.shape == (48, 48, 48)
    assert up.max() == pytest.approx(1.0, abs=0.02)  # density values preserved
    # the blob is 1.5x wider in voxels: total mass scales with the voxel count
    assert up.sum() / blob.sum() == pytest.approx(1.5**3, rel=0.01)
    down = fourier_resample(up, 32)
    assert np.abs(down - blob).max() < 1e-3


def test_prepare_map_centres_and_scales() -> None:
    blob = np.roll(_blob(40, sigma=3.0), (3, -2, 4), axis=(0, 1, 2))  # off-centre
    density = DensityMap(blob, 2.0, "blob")
    prepared = prepare_map(density, 64, particle_fraction=0.5)
    assert prepared.box == 64
    weights = np.clip(prepared.data, 0, None)
    com = np.array(
        [
            (weights.sum(axis=tuple(a for a in range(3) if a != ax)) * np.arange(64)).sum()
            / weights.sum()
            for ax in range(3)
        ]
    )
    assert np.abs(com - 32).max() < 0.3
    # pixel size follows the resampling: old * n / m
    diameter = particle_diameter_px((prepared.data >= 0.5 * prepared.data.max()).astype(np.float32))
    assert prepared.pixel_size_a != 2.0
    assert diameter * prepared.pixel_size_a == pytest.approx(
        particle_diameter_px((blob >= 0.5).astype(np.float32)) * 2.0, rel=0.15
    )


def test_prepare_real_map(shared_data: Path) -> None:
    density = prepare_map(load_map(shared_data / "maps" / "emd_5625.map"), 128)
    assert density.data.shape == (128, 128, 128)
    # 56 voxels of 4.23 A resampled to an even size: pixel = 4.23 * 56 / m
    m = 4.23 * 56 / density.pixel_size_a
    assert m == pytest.approx(round(m), abs=1e-6) and round(m) % 2 == 0
    mask, _ = make_mask(density)
    assert 0.35 * 128 < particle_diameter_px(mask) < 0.8 * 128


# ------------------------------------------------------------------------------ masks


def test_mask_extend_and_soft_edge() -> None:
    data = np.zeros((32, 32, 32), dtype=np.float32)
    data[16, 16, 16] = 1.0
    mask = create_mask(data, 0.5, extend_px=3, soft_edge_px=4)
    # extended: voxels at distance < 3 are 1 (RELION: squared distance < extend^2)
    assert mask[16, 16, 16 + 2] == 1.0
    assert mask[16, 16, 18 + 1] < 1.0  # distance 3: outside the extension
    # soft edge: 0.5 + 0.5 cos(pi d / w), d measured from the extended mask (d=1 at x=19)
    assert mask[16, 16, 19] == pytest.approx(0.5 + 0.5 * np.cos(np.pi * 1 / 4), abs=1e-6)
    assert mask[16, 16, 16 + 2 + 4 + 1] == 0.0
    assert mask.min() == 0.0 and mask.max() == 1.0


def test_mask_matches_relion_mask_create(relion_bin: Path, tmp_path: Path) -> None:
    density = generate_map("globular", 48, seed=1)
    path = write_mrc(tmp_path / "map.mrc", density.data, density.pixel_size_a)
    threshold = float(np.percentile(density.data, 97))
    subprocess.run(
        [
            str(relion_bin / "relion_mask_create"),
            "--i",
            str(path),
            "--o",
            str(tmp_path / "mask.mrc"),
            "--ini_threshold",
            f"{threshold:.6f}",
            "--extend_inimask",
            "3",
            "--width_soft_edge",
            "5",
        ],
        check=True,
        capture_output=True,
    )
    with mrcfile.open(tmp_path / "mask.mrc") as mrc:
        reference = np.asarray(mrc.data, dtype=np.float64)
    ours = create_mask(density.data, threshold, extend_px=3, soft_edge_px=5)
    assert np.abs(ours - reference).max() < 1e-3
    assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.999


# ------------------------------------------------------------------------------ generated maps


@pytest.mark.parametrize("shape", GENERATED_SHAPES)
def test_generated_maps_are_protein_like(shape: str) -> None:
    density = generate_map(shape, 64, n_atoms=3000, seed=0)
    assert density.data.shape == (64, 64, 64)
    assert np.isfinite(density.data).all()
    atoms = pseudo_atomic_model(shape, 3000, np.random.default_rng(0))
    assert 2000 <= len(atoms) <= 3000  # a few thousand atoms (overlaps between domains dropped)
    # protein density: about 18 A^3 per atom inside the contour
    assert density.volume_a3 is not None
    assert 2000 * 18.0 <= density.volume_a3 <= 3000 * 18.0
    extent = 2 * np.sqrt((atoms**2).sum(axis=1)).max()
    assert 40.0 < extent < 200.0  # the size of a 30-40 kDa protein or a small assembly
    mask, _ = make_mask(density)
    diameter = particle_diameter_px(mask)
    assert 0.4 * 64 < diameter < 0.85 * 64  # fills about half the box
    # one connected body
    from scipy import ndimage

    _, bodies = ndimage.label(mask > 0.5)
    assert bodies == 1


def test_generated_maps_are_deterministic_and_distinct() -> None:
    a = generate_map("ring", 48, seed=3)
    b = generate_map("ring", 48, seed=3)
    c = generate_map("ring", 48, seed=4)
    assert np.array_equal(a.data, b.data)
    assert not np.array_equal(a.data, c.data)
    with pytest.raises(ValueError, match="unknown generated map shape"):
        generate_map("cube", 48)
