"""Mask projection: the in-process projector against relion_project (values, scale, labels),
streaming, rescaling, the per-particle reference, and the errors on bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from particleseg_model.corpus.labels import labels_from_projection
from particleseg_model.corpus.projection import (
    MaskProjector,
    ProjectionError,
    particle_poses,
    project_masks,
    project_with_relion,
    project_with_relion_per_particle,
    relion_mask_projections,
    write_pose_star,
)
from particleseg_model.em.geometry import random_euler
from particleseg_model.em.maps import (
    fourier_resample,
    generate_map,
    load_map,
    make_mask,
    pad_or_crop,
    write_mrc,
)
from particleseg_model.relion.runner import RelionError

BOX = 64
relion = pytest.mark.relion
needs_relion = pytest.mark.skipif(
    shutil.which("relion_project") is None,
    reason="relion_project is not on PATH (apt-get install relion)",
)


@pytest.fixture(scope="module")
def mask() -> tuple[np.ndarray, float]:
    """A relion_mask_create-style soft mask (0..1) of a generated map, box 64."""
    density = generate_map("globular", BOX, n_atoms=3000, seed=0)
    volume, _ = make_mask(density)
    return volume, density.pixel_size_a


def _table(
    n: int, pixel: float, seed: int = 0, box: int = BOX, shift_px: float = 4.0
) -> pd.DataFrame:
    """A canonical particle table (as read_star gives it) with random poses and origins."""
    rng = np.random.default_rng(seed)
    rot, tilt, psi = random_euler(rng, n)
    rot[0] = tilt[0] = psi[0] = 0.0  # the identity view
    origins = rng.uniform(-shift_px, shift_px, (n, 2))
    origins[0] = 0.0
    return pd.DataFrame(
        {
            "image_name": [f"{i + 1}@Extract/particles.mrcs" for i in range(n)],
            "rot_deg": rot,
            "tilt_deg": tilt,
            "psi_deg": psi,
            "origin_x_a": origins[:, 0] * pixel,
            "origin_y_a": origins[:, 1] * pixel,
            "pixel_size_a": pixel,
            "image_size_px": box,
        }
    )


def _ours(volume: np.ndarray, table: pd.DataFrame, pixel: float, **kwargs) -> np.ndarray:
    return np.concatenate(list(project_masks(volume, table, pixel_size_a=pixel, **kwargs)))


def _relion(volume: np.ndarray, table: pd.DataFrame, pixel: float, work: Path) -> np.ndarray:
    path = relion_mask_projections(volume, table, work, pixel_size_a=pixel)
    with mrcfile.open(path) as mrc:
        return np.asarray(mrc.data, dtype=np.float32)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ------------------------------------------------------------------------------ vs RELION


@relion
@needs_relion
def test_full_band_equals_relion_project(mask, tmp_path: Path) -> None:
    volume, pixel = mask
    table = _table(24, pixel, seed=1)
    reference = _relion(volume, table, pixel, tmp_path)
    ours = _ours(volume, table, pixel, band=None, batch=10)
    assert ours.shape == reference.shape == (24, BOX, BOX) and ours.dtype == np.float32
    for a, b in zip(ours, reference, strict=True):
        assert _corr(a, b) > 0.9999
    # the same scale, not only the same shape: RELION's line integral in voxels
    assert np.abs(ours - reference).max() < 1e-3 * np.abs(reference).max()
    # ... which is the sum of the 0..1 mask along the ray (identity view: along z); RELION's
    # gridding pre-correction makes it a little larger away from the centre
    along_z = volume.sum(axis=0)
    assert reference[0].max() == pytest.approx(along_z.max(), rel=0.03)
    assert _corr(reference[0], along_z) > 0.999
    assert (reference[0] > 10).sum() == pytest.approx((along_z > 10).sum(), rel=0.03)


@relion
@needs_relion
def test_auto_band_labels_match_relion_project(mask, tmp_path: Path) -> None:
    volume, pixel = mask
    table = _table(40, pixel, seed=2)
    reference = _relion(volume, table, pixel, tmp_path)
    projector = MaskProjector(volume, pixel_size_a=pixel)
    assert projector.band < BOX // 2  # a reduced band was enough
    ours = _ours(volume, table, pixel, projector=projector)
    assert min(_corr(a, b) for a, b in zip(ours, reference, strict=True)) > 0.99
    same = labels_from_projection(ours) == labels_from_projection(reference)
    assert same.mean() >= 0.995
    assert same.reshape(len(table), -1).mean(axis=1).min() >= 0.99
    assert (labels_from_projection(reference) == 1).mean() > 0.05  # the labels are not empty


@relion
@needs_relion
def test_real_map_against_relion_project(shared_data: Path, tmp_path: Path) -> None:
    """The aspire_rln_proj_65* stacks come from ASPIRE's clean70SRibosome volume, which is not
    in ../shared/data: the projector is checked on the mask of EMD-1832 (64^3, 5.7 A/px)."""
    density = load_map(shared_data / "maps" / "emd_1832.map")
    volume, _ = make_mask(density)
    pixel = density.pixel_size_a
    table = _table(30, pixel, seed=3, box=density.box)
    reference = _relion(volume, table, pixel, tmp_path)
    full = _ours(volume, table, pixel, band=None)
    assert min(_corr(a, b) for a, b in zip(full, reference, strict=True)) > 0.9999
    assert np.abs(full - reference).max() < 1e-3 * np.abs(reference).max()
    auto = _ours(volume, table, pixel)
    assert min(_corr(a, b) for a, b in zip(auto, reference, strict=True)) > 0.99
    assert (labels_from_projection(auto) == labels_from_projection(reference)).mean() >= 0.995


@relion
@needs_relion
def test_aspire_star_file_through_relion_project(shared_data: Path, tmp_path: Path) -> None:
    """aspire_rln_proj_65_shifted.star (a real RELION 3.1 file: optics block, origins in pixels
    as rlnOriginX/Y, box 65, 1 A/px). Its volume is absent, so the EMD-1832 mask stands in.
    relion_project ignores pixel origins in a file with optics (it would project unshifted):
    project_with_relion refuses the file, and its poses rewritten by write_pose_star give
    RELION's projections = ours, one pixel off as relion_project writes odd boxes."""
    from particleseg_model.em.star import read_star

    star = shared_data / "particles" / "aspire_rln_proj_65_shifted.star"
    density = load_map(shared_data / "maps" / "emd_1832.map")
    volume = pad_or_crop(make_mask(density)[0], 65)
    write_mrc(tmp_path / "mask.mrc", volume, 1.0)
    with pytest.raises(ProjectionError, match="rlnOriginX"):
        project_with_relion(tmp_path / "mask.mrc", star, tmp_path / "raw.mrcs")

    particles = read_star(star).particles
    poses = particle_poses(particles)
    assert np.abs(poses.origin_x_px).max() >= 10 and poses.box == 65
    write_pose_star(tmp_path / "poses.star", particles, pixel_size_a=1.0, box=65)
    out = project_with_relion(
        tmp_path / "mask.mrc", tmp_path / "poses.star", tmp_path / "proj.mrcs"
    )
    with mrcfile.open(out) as mrc:
        reference = np.asarray(mrc.data, dtype=np.float32)
    projector = MaskProjector(volume, pixel_size_a=1.0, band=None)
    ours = projector.project(
        poses.rot, poses.tilt, poses.psi, poses.origin_x_px - 1, poses.origin_y_px - 1
    )
    assert min(_corr(a, b) for a, b in zip(ours, reference, strict=True)) > 0.9999
    # and through the streaming API from the table read_star gives (box 65 centred at 32)
    streamed = _ours(volume, particles, 1.0, band=None)
    np.testing.assert_allclose(streamed[:, :-1, :-1], ours[:, 1:, 1:], atol=1e-3)


@relion
@needs_relion
def test_one_process_per_particle_gives_the_same_projections(mask, tmp_path: Path) -> None:
    volume, pixel = mask
    table = _table(6, pixel, seed=4)
    write_mrc(tmp_path / "mask.mrc", volume, pixel)
    single = project_with_relion_per_particle(
        tmp_path / "mask.mrc", table, pixel_size_a=pixel, indices=[0, 3, 5]
    )
    batched = _relion(volume, table, pixel, tmp_path / "ang")
    assert single.shape == (3, BOX, BOX)
    np.testing.assert_allclose(single, batched[[0, 3, 5]], atol=1e-3 * np.abs(batched).max())


@relion
@needs_relion
def test_project_with_relion_outputs_and_errors(mask, tmp_path: Path) -> None:
    volume, pixel = mask
    table = _table(5, pixel, seed=5)
    write_mrc(tmp_path / "mask.mrc", volume, pixel)
    write_pose_star(tmp_path / "poses.star", table, pixel_size_a=pixel, box=BOX)
    out = project_with_relion(
        tmp_path / "mask.mrc", tmp_path / "poses.star", tmp_path / "out" / "proj.mrcs"
    )
    assert out == tmp_path / "out" / "proj.mrcs"
    assert (tmp_path / "out" / "proj.star").is_file()  # RELION 3.1 writes both
    with mrcfile.open(out) as mrc:
        assert mrc.data.shape == (5, BOX, BOX)
    with pytest.raises(ValueError, match=r"\.mrcs"):
        project_with_relion(tmp_path / "mask.mrc", tmp_path / "poses.star", tmp_path / "x.mrc")
    (tmp_path / "broken.mrc").write_text("not a map")
    with pytest.raises(RelionError, match="relion_project"):
        project_with_relion(tmp_path / "broken.mrc", tmp_path / "poses.star", tmp_path / "bad.mrcs")


# ------------------------------------------------------------------------------ in process


def test_streams_batches_in_particle_order(mask) -> None:
    volume, pixel = mask
    table = _table(30, pixel, seed=6)
    projector = MaskProjector(volume, pixel_size_a=pixel, band=20)
    done: list[int] = []
    batches = list(
        project_masks(
            volume, table, pixel_size_a=pixel, batch=7, projector=projector, progress=done.append
        )
    )
    assert [len(b) for b in batches] == [7, 7, 7, 7, 2] and done == [7, 7, 7, 7, 2]
    stacked = np.concatenate(batches)
    poses = particle_poses(table)
    one_by_one = np.concatenate(
        [
            projector.project(
                poses.rot[i],
                poses.tilt[i],
                poses.psi[i],
                poses.origin_x_px[i],
                poses.origin_y_px[i],
            )
            for i in range(len(table))
        ]
    )
    np.testing.assert_allclose(stacked, one_by_one, atol=1e-5)

    # lazy: taking the first batch computes at most workers + 1 batches ahead
    calls: list[int] = []
    original = projector._project_chunk

    def counting(*args):
        calls.append(len(args[0]))
        return original(*args)

    projector._project_chunk = counting  # type: ignore[method-assign]
    stream = projector.stream(poses, batch=5)
    first = next(stream)
    assert first.shape == (5, BOX, BOX)
    assert sum(calls) <= (projector.workers + 1) * 5 < len(table)
    stream.close()


def test_origin_moves_the_particle_by_minus_origin(mask) -> None:
    volume, pixel = mask
    table = _table(3, pixel, seed=7)
    table.loc[:, ["rot_deg", "tilt_deg", "psi_deg", "origin_x_a", "origin_y_a"]] = 0.0
    table.loc[1, "origin_x_a"] = 5.0 * pixel  # +5 px in x
    table.loc[2, "origin_y_a"] = -3.0 * pixel  # -3 px in y
    images = _ours(volume, table, pixel, band=None)
    y, x = np.mgrid[:BOX, :BOX]

    def centroid(img: np.ndarray) -> np.ndarray:
        w = np.clip(img, 0, None)
        return np.array([(w * x).sum(), (w * y).sum()]) / w.sum()

    assert centroid(images[1]) - centroid(images[0]) == pytest.approx([-5.0, 0.0], abs=0.05)
    assert centroid(images[2]) - centroid(images[0]) == pytest.approx([0.0, 3.0], abs=0.05)


def test_auto_band_follows_the_mask_sharpness(mask) -> None:
    volume, pixel = mask
    soft = MaskProjector(volume, pixel_size_a=pixel)
    hard = MaskProjector((volume > 0.5).astype(np.float32), pixel_size_a=pixel)
    assert soft.band < hard.band <= BOX // 2
    assert soft.calibration[soft.band] <= 2e-3 and len(soft.calibration) >= 2
    full = MaskProjector(volume, pixel_size_a=pixel, band=None)
    assert full.band == BOX // 2 and full.samples_per_projection > soft.samples_per_projection


def test_rescale_to_the_particles_pixel_size_and_box(mask) -> None:
    volume, pixel = mask
    table = _table(12, pixel, seed=8)
    reference = _ours(volume, table, pixel, band=16)  # what a 32^3 mask can still carry
    coarse = fourier_resample(volume, 32)  # the same mask at twice the pixel size
    with pytest.raises(ProjectionError, match=rf"{2 * pixel:g}.*{pixel:g}"):
        project_masks(coarse, table, pixel_size_a=2 * pixel)
    rescaled = _ours(coarse, table, 2 * pixel, rescale=True, band=None)
    assert rescaled.shape == reference.shape
    assert min(_corr(a, b) for a, b in zip(rescaled, reference, strict=True)) > 0.999
    assert np.abs(rescaled - reference).max() < 0.02 * reference.max()  # same scale

    bigger = pad_or_crop(volume, 80)  # the same mask in a larger box, same pixel size
    with pytest.raises(ProjectionError, match=r"box.*80.*64"):
        project_masks(bigger, table, pixel_size_a=pixel)
    boxed = _ours(bigger, table, pixel, rescale=True, band=None)
    full = _ours(volume, table, pixel, band=None)
    assert boxed.shape == full.shape
    assert min(_corr(a, b) for a, b in zip(boxed, full, strict=True)) > 0.999


# ------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_with_a_clear_message(mask) -> None:
    volume, pixel = mask
    table = _table(6, pixel, seed=9)
    with pytest.raises(ProjectionError, match=r"pixel size mismatch.*1\.5 A/px.*1\.2 A/px"):
        project_masks(volume, table.assign(pixel_size_a=1.2), pixel_size_a=1.5)
    with pytest.raises(ProjectionError, match=r"box mismatch.*64.*image_size_px.*96"):
        project_masks(volume, table.assign(image_size_px=96), pixel_size_a=pixel)
    with pytest.raises(ProjectionError, match=r"tilt_deg.*psi_deg"):
        project_masks(volume, table.drop(columns=["tilt_deg", "psi_deg"]), pixel_size_a=pixel)
    nan = table.copy()
    nan.loc[[2, 4], "psi_deg"] = np.nan
    with pytest.raises(ProjectionError, match=r"psi_deg.*3 \(3@Extract/particles\.mrcs\), 5"):
        project_masks(volume, nan, pixel_size_a=pixel)
    nan = table.copy()
    nan.loc[1, "origin_y_a"] = np.nan
    with pytest.raises(ProjectionError, match=r"origin_y_a.*row\(s\) 2 "):
        project_masks(volume, nan, pixel_size_a=pixel)
    mixed = table.copy()
    mixed.loc[0, "pixel_size_a"] = 2 * pixel
    with pytest.raises(ProjectionError, match="several pixel sizes"):
        project_masks(volume, mixed, pixel_size_a=pixel)
    with pytest.raises(ProjectionError, match="cubic"):
        project_masks(volume[:, :, :60], table, pixel_size_a=pixel)
    with pytest.raises(ValueError):
        MaskProjector(volume, band="fast")
    assert issubclass(ProjectionError, ValueError)


def test_relion_column_names_and_absent_origins(mask) -> None:
    volume, pixel = mask
    table = _table(4, pixel, seed=10)
    relion_table = pd.DataFrame(
        {
            "rlnAngleRot": table.rot_deg,
            "rlnAngleTilt": table.tilt_deg,
            "rlnAnglePsi": table.psi_deg,
            "rlnOriginX": table.origin_x_a / pixel,  # RELION 3.0: pixels
            "rlnOriginY": table.origin_y_a / pixel,
        }
    )
    a = particle_poses(table)
    b = particle_poses(relion_table, pixel_size_a=pixel)
    np.testing.assert_allclose(a.origin_x_px, b.origin_x_px)
    np.testing.assert_allclose(a.psi, b.psi)
    # no origin columns at all: centred, as relion_project reads them
    bare = particle_poses(table.drop(columns=["origin_x_a", "origin_y_a"]))
    assert (bare.origin_x_px == 0).all() and (bare.origin_y_px == 0).all()
