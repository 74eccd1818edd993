"""Simulation: projector and CTF against relion_project, conventions against the ASPIRE/RELION
files, noise normalisation, junk kinds, micrographs, determinism."""

from __future__ import annotations

import itertools
import math
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from particleseg_model.em.geometry import euler_matrices, random_euler
from particleseg_model.em.maps import DensityMap, generate_map, pad_or_crop, write_mrc
from particleseg_model.simulation.demo_archive import write_star
from particleseg_model.simulation.simulate import (
    JUNK_KINDS,
    FourierProjector,
    SimulationConfig,
    ctf_2d,
    normalise_images,
    simulate_micrographs,
    simulate_particles,
)

BOX = 64


@pytest.fixture(scope="module")
def density() -> DensityMap:
    return generate_map("globular", BOX, n_atoms=3000, seed=0)


@pytest.fixture(scope="module")
def projector(density: DensityMap) -> FourierProjector:
    return FourierProjector(density.data)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _relion_project(
    relion_bin: Path, work: Path, volume: np.ndarray, pixel: float, poses: pd.DataFrame, *extra: str
) -> np.ndarray:
    """relion_project --ang on a RELION 3.1 STAR of ``poses`` (angles, origins in A, CTF)."""
    write_mrc(work / "map.mrc", volume, pixel)
    particles = poses.copy()
    particles["rlnImageName"] = [f"{i + 1}@dummy.mrcs" for i in range(len(poses))]
    particles["rlnOpticsGroup"] = 1
    write_star(
        work / "poses.star",
        {"optics": SimulationConfig().optics(pixel, volume.shape[0]), "particles": particles},
    )
    subprocess.run(
        [
            str(relion_bin / "relion_project"),
            "--i",
            "map.mrc",
            "--o",
            "proj",
            "--ang",
            "poses.star",
            *extra,
        ],
        cwd=work,
        check=True,
        capture_output=True,
    )
    with mrcfile.open(work / "proj.mrcs") as mrc:
        return np.asarray(mrc.data, dtype=np.float64)


def _poses(n: int, seed: int, pixel: float) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rot, tilt, psi = random_euler(rng, n)
    rot[0] = tilt[0] = psi[0] = 0.0  # the identity view
    shifts = rng.uniform(-6, 6, (n, 2))
    shifts[:2] = 0.0
    shifts[2] = (5.0, 0.0)  # pure x and pure y shifts show the sign convention
    shifts[3] = (0.0, -7.5)
    du = rng.uniform(8000, 25000, n)
    return pd.DataFrame(
        {
            "rlnAngleRot": rot,
            "rlnAngleTilt": tilt,
            "rlnAnglePsi": psi,
            "rlnOriginXAngst": shifts[:, 0] * pixel,
            "rlnOriginYAngst": shifts[:, 1] * pixel,
            "rlnDefocusU": du,
            "rlnDefocusV": du - rng.uniform(0, 900, n),
            "rlnDefocusAngle": rng.uniform(0, 180, n),
        }
    )


# ------------------------------------------------------------------------------ geometry


def test_euler_matrices_are_relion_zyz() -> None:
    rot, tilt, psi = random_euler(np.random.default_rng(1), 50)
    matrices = euler_matrices(rot, tilt, psi)
    assert np.allclose(matrices @ matrices.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(matrices), 1.0)

    def rz(a: float) -> np.ndarray:  # RELION rotates the frame (passive): R_z(a)^T
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(a: float) -> np.ndarray:
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    for r, t, p in [(30.0, 0.0, 0.0), (0.0, 40.0, 0.0), (10.0, 20.0, 30.0), (300.0, 120, 75)]:
        assert np.allclose(euler_matrices(r, t, p)[0], rz(p) @ ry(t) @ rz(r), atol=1e-12)


def test_random_euler_is_uniform_on_so3() -> None:
    rot, tilt, psi = random_euler(np.random.default_rng(2), 20000)
    # uniform on the sphere: cos(tilt) uniform in [-1, 1]
    assert abs(np.cos(np.radians(tilt)).mean()) < 0.02
    assert np.cos(np.radians(tilt)).std() == pytest.approx(1 / math.sqrt(3), abs=0.01)
    assert rot.min() >= 0 and rot.max() < 360 and psi.min() >= 0 and psi.max() < 360


# ------------------------------------------------------------------------------ vs RELION


def test_projector_matches_relion_project(
    relion_bin: Path, tmp_path: Path, density: DensityMap, projector: FourierProjector
) -> None:
    pixel = density.pixel_size_a
    poses = _poses(6, 0, pixel)
    reference = _relion_project(relion_bin, tmp_path, density.data, pixel, poses)
    ours = projector.project(
        poses.rlnAngleRot,
        poses.rlnAngleTilt,
        poses.rlnAnglePsi,
        poses.rlnOriginXAngst / pixel,
        poses.rlnOriginYAngst / pixel,
    )
    for a, b in zip(ours, reference, strict=True):
        assert _corr(a, b) > 0.999
        assert np.abs(a - b).max() < 1e-3 * np.abs(b).max()  # same scale, not just shape
    # the shift sign: origin +5 px in x moves the particle by -5 px (relion_project shifts
    # the projection by -origin)
    centre_of = [
        (np.clip(img, 0, None) * np.arange(BOX)).sum() / np.clip(img, 0, None).sum()
        for img in ours[[0, 2]].sum(axis=1)
    ]
    assert centre_of[1] - centre_of[0] == pytest.approx(-5.0, abs=0.5)


def test_ctf_matches_relion_project(
    relion_bin: Path, tmp_path: Path, density: DensityMap, projector: FourierProjector
) -> None:
    pixel = density.pixel_size_a
    poses = _poses(6, 1, pixel)
    reference = _relion_project(relion_bin, tmp_path, density.data, pixel, poses, "--ctf")
    ctf = ctf_2d(BOX, pixel, poses.rlnDefocusU, poses.rlnDefocusV, poses.rlnDefocusAngle)
    ours = projector.project(
        poses.rlnAngleRot,
        poses.rlnAngleTilt,
        poses.rlnAnglePsi,
        poses.rlnOriginXAngst / pixel,
        poses.rlnOriginYAngst / pixel,
        ctf,
    )
    for a, b in zip(ours, reference, strict=True):
        assert _corr(a, b) > 0.999
    # and the CTF matters: the same projections without it correlate much less
    plain = projector.project(
        poses.rlnAngleRot,
        poses.rlnAngleTilt,
        poses.rlnAnglePsi,
        poses.rlnOriginXAngst / pixel,
        poses.rlnOriginYAngst / pixel,
    )
    assert np.mean([_corr(a, b) for a, b in zip(plain, reference, strict=True)]) < 0.9


def test_relion_odd_box_output_is_centred_one_pixel_up(
    relion_bin: Path, tmp_path: Path, density: DensityMap
) -> None:
    """relion_project centres odd-sized images at (n + 1) / 2 (its inverse CenterFFT), not at
    RELION's origin n // 2; maps and even boxes agree exactly (see the test above)."""
    volume = pad_or_crop(density.data, 65)
    poses = _poses(4, 2, density.pixel_size_a)
    reference = _relion_project(relion_bin, tmp_path, volume, density.pixel_size_a, poses)
    ours = FourierProjector(volume).project(
        poses.rlnAngleRot,
        poses.rlnAngleTilt,
        poses.rlnAnglePsi,
        poses.rlnOriginXAngst / density.pixel_size_a - 1,
        poses.rlnOriginYAngst / density.pixel_size_a - 1,
    )
    assert min(_corr(a, b) for a, b in zip(ours, reference, strict=True)) > 0.999


def _common_line_score(
    images: np.ndarray,
    angles: np.ndarray,
    origins_px: np.ndarray,
    centre: float,
    transpose: bool = False,
    shift_sign: float = 1.0,
) -> float:
    """Mean correlation of the Fourier transforms of every image pair along the common line
    that the Euler angles predict (after undoing the origins): 1 when the conventions hold."""
    n = images.shape[-1]
    matrices = euler_matrices(angles[:, 0], angles[:, 1], angles[:, 2])
    if transpose:
        matrices = matrices.transpose(0, 2, 1)
    y, x = np.mgrid[:n, :n].astype(np.float64)
    t = np.linspace(-n / 4, n / 4, 41)

    def line(i: int, direction: np.ndarray) -> np.ndarray:
        # particle centre at centre - origin (RELION); shift_sign=-1 tries the opposite
        cx, cy = centre - shift_sign * origins_px[i]
        phase = np.exp(
            -2j
            * np.pi
            * (t[:, None, None] * (direction[0] * (x - cx) + direction[1] * (y - cy)))
            / n
        )
        return (images[i][None] * phase).sum(axis=(1, 2))

    scores = []
    for i, j in itertools.combinations(range(len(images)), 2):
        axis = np.cross(matrices[i].T[:, 2], matrices[j].T[:, 2])  # both planes hold it
        if np.linalg.norm(axis) < 1e-3:
            continue
        axis /= np.linalg.norm(axis)
        a, b = line(i, (matrices[i] @ axis)[:2]), line(j, (matrices[j] @ axis)[:2])
        scores.append(np.real(np.vdot(a, b)) / np.sqrt(np.vdot(a, a).real * np.vdot(b, b).real))
    return float(np.mean(scores))


def test_conventions_against_aspire_relion_files(shared_data: Path) -> None:
    """The aspire_rln_proj_65* stacks are relion_project outputs of a map we do not have, with
    their poses in STAR files (one set with origins in pixels). Two projections of one map
    share a common line in Fourier space, fixed by the poses alone: our Euler matrices and
    origin sign must make every pair agree on it; the wrong conventions must not."""
    images, angles, origins = [], [], []
    for name in ("aspire_rln_proj_65", "aspire_rln_proj_65_shifted"):
        table = starfile.read(shared_data / "particles" / f"{name}.star", always_dict=True)[
            "particles"
        ]
        with mrcfile.open(shared_data / "particles" / f"{name}.mrcs") as mrc:
            images.append(np.asarray(mrc.data, dtype=np.float64))
        angles.append(table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
        if "rlnOriginXAngst" in table:  # pixel size 1 A in both files
            origins.append(table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
        else:
            origins.append(table[["rlnOriginX", "rlnOriginY"]].to_numpy())
    stack, poses, shifts = np.concatenate(images), np.concatenate(angles), np.concatenate(origins)
    assert stack.shape == (9, 65, 65) and np.abs(shifts).max() >= 10
    centre = 33  # relion_project's odd-box image centre, (n + 1) / 2 (see the test above)
    assert _common_line_score(stack, poses, shifts, centre) > 0.98
    assert _common_line_score(stack, poses, shifts, centre, transpose=True) < 0.6
    assert _common_line_score(stack, poses, shifts, centre, shift_sign=-1) < 0.6


# ------------------------------------------------------------------------------ noise


def test_normalise_images_like_relion() -> None:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    images = (rng.normal(5, 3, (20, BOX, BOX)) + 0.2 * x + 0.1 * y).astype(np.float32)
    out, offset, std = normalise_images(images)
    background = np.hypot(x, y) > 0.375 * BOX
    assert np.abs(out[:, background].mean(axis=1)).max() < 1e-4
    assert np.abs(out[:, background].std(axis=1) - 1).max() < 1e-4
    assert np.allclose(std, 3, rtol=0.05)  # the ramp is removed, only the noise remains
    assert np.allclose(out, (images - offset) / std[:, None, None], atol=1e-4)


def test_particles_are_normalised_at_the_requested_snr(density: DensityMap) -> None:
    config = SimulationConfig(n_particles=120, junk_fraction=0.0, snr=0.08)
    sim = simulate_particles(density, config, seed=4)
    assert sim.images.dtype == np.float32 and sim.images.shape == (120, BOX, BOX)
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    background = np.hypot(x, y) > 0.375 * BOX
    assert abs(sim.images[:, background].mean()) < 0.01
    assert sim.images[:, background].std() == pytest.approx(1.0, abs=0.01)
    # SNR per pixel: signal variance over the box / background noise variance
    assert sim.clean is not None
    noise = sim.images - sim.clean
    snr = sim.clean.var(axis=(1, 2)).mean() / noise[:, background].var()
    assert snr == pytest.approx(0.08, rel=0.3)


# ------------------------------------------------------------------------------ particles


@pytest.fixture(scope="module")
def plain_junk(density: DensityMap):
    """Every junk kind, without CTF so that shapes and centroids are easy to measure."""
    config = SimulationConfig(n_particles=140, junk_fraction=0.6, apply_ctf=False, snr=0.1)
    return simulate_particles(density, config, seed=5)


def test_truth_matches_the_images(
    plain_junk, density: DensityMap, projector: FourierProjector
) -> None:
    truth, clean = plain_junk.truth, plain_junk.clean
    pixel = density.pixel_size_a
    good = truth.index[truth.is_good].to_numpy()
    expected = projector.project(
        truth.rot_deg[good],
        truth.tilt_deg[good],
        truth.psi_deg[good],
        truth.origin_x_a[good] / pixel,
        truth.origin_y_a[good] / pixel,
    )
    for a, b in zip(clean[good], expected, strict=True):
        assert _corr(a, b) > 0.999
    # good particles: the STAR poses are the true ones
    star = plain_junk.star
    assert np.allclose(star.rlnAngleRot[good], truth.rot_deg[good])
    assert np.allclose(star.rlnOriginXAngst[good], truth.origin_x_a[good])
    # off-centre particles: true pose and origin reproduce the image (projected on a canvas
    # twice the box, so that the particle is not wrapped around, then cropped)
    big = FourierProjector(pad_or_crop(density.data, 2 * BOX))
    off = truth.index[truth.junk_kind == "off_centre"].to_numpy()
    wide = big.project(
        truth.rot_deg[off],
        truth.tilt_deg[off],
        truth.psi_deg[off],
        truth.origin_x_a[off] / pixel,
        truth.origin_y_a[off] / pixel,
    )
    cropped = wide[:, BOX // 2 : BOX // 2 + BOX, BOX // 2 : BOX // 2 + BOX]
    for a, b in zip(clean[off], cropped, strict=True):
        assert _corr(a, b) > 0.99


def test_junk_kinds_have_their_properties(plain_junk) -> None:
    truth, clean, images = plain_junk.truth, plain_junk.clean, plain_junk.images
    counts = truth.junk_kind.value_counts()
    assert counts["none"] == 56 and all(counts[k] == 14 for k in JUNK_KINDS)
    assert (truth.is_good == (truth.junk_kind == "none")).all()
    kind = truth.junk_kind.to_numpy()
    good_mass = clean[kind == "none"].sum(axis=(1, 2)).mean()
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2

    # empty: no signal at all, pure background
    assert np.abs(clean[kind == "empty"]).max() == 0.0
    # ice: a large blob, brighter than any particle (after normalisation, which the blob
    # itself dampens by raising the background std, as in RELION extraction)
    bright_particle = np.percentile(clean[kind == "none"], 99)
    for image in clean[kind == "ice"]:
        blob = image > 0.5 * image.max()
        assert blob.mean() > 0.1  # large: over a tenth of the box
        assert image[blob].mean() > 1.5 * bright_particle  # and uniformly bright
    # carbon edge: a strong step across the box, along the recorded normal
    for image, detail in zip(
        images[kind == "carbon_edge"], truth.detail[kind == "carbon_edge"], strict=True
    ):
        fields = dict(item.split("=") for item in detail.split(";"))
        phi = math.radians(float(fields["normal_deg"]))
        s = x * math.cos(phi) + y * math.sin(phi) - float(fields["offset_px"])
        step = image[s > 3].mean() - image[s < -3].mean()
        assert step > 0.8  # in background-noise units, after the ramp removal
    # aggregates: two or more particles, more signal than one particle
    aggregates = truth.n_components[kind == "aggregate"]
    assert (aggregates >= 2).all()
    assert clean[kind == "aggregate"].sum(axis=(1, 2)).mean() > 1.6 * good_mass
    # off-centre: shifted beyond a third of the box; the visible part's centroid too
    shift = np.hypot(truth.origin_x_a, truth.origin_y_a) / plain_junk.pixel_size_a
    assert (shift[kind == "off_centre"] > BOX / 3).all()
    assert (shift[kind == "none"] < BOX / 6).all()
    for image in clean[kind == "off_centre"]:
        weights = np.clip(image, 0, None)
        centroid = np.hypot((weights * x).sum(), (weights * y).sum()) / weights.sum()
        assert centroid > BOX / 4
    # fragments: a small piece of the map
    fragment_mass = clean[kind == "fragment"].sum(axis=(1, 2))
    assert (fragment_mass < 0.5 * good_mass).all() and (fragment_mass > 0).all()


def test_junk_kinds_are_separate_options(density: DensityMap) -> None:
    config = SimulationConfig(n_particles=40, junk_fraction=0.5, junk_kinds=("ice", "empty"))
    truth = simulate_particles(density, config, seed=6).truth
    assert set(truth.junk_kind) == {"none", "ice", "empty"}
    assert (~truth.is_good).sum() == 20


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1, float("nan")])
def test_junk_fraction_outside_range(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SimulationConfig(junk_fraction=fraction)


def test_unknown_junk_kind() -> None:
    with pytest.raises(ValueError, match="unknown junk kinds"):
        SimulationConfig(junk_kinds=("ice", "dust"))


def test_simulation_is_deterministic(density: DensityMap) -> None:
    config = SimulationConfig(n_particles=30, junk_fraction=0.4)
    a = simulate_particles(density, config, seed=7)
    b = simulate_particles(density, config, seed=7)
    c = simulate_particles(density, config, seed=8)
    assert np.array_equal(a.images, b.images)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    assert not np.array_equal(a.images, c.images)


# ------------------------------------------------------------------------------ micrographs


def test_micrographs_and_picks(density: DensityMap, projector: FourierProjector) -> None:
    config = SimulationConfig(n_particles=40, junk_fraction=0.3)
    sim = simulate_micrographs(density, config, seed=9, size=384, keep_clean=True)
    picks = sim.picks
    assert len(picks) == 40 and set(picks.micrograph_name) <= set(sim.names)
    assert sim.micrographs.shape[1:] == (384, 384)
    half = BOX // 2
    assert picks.coordinate_x_px.between(half, 384 - half).all()
    assert picks.coordinate_y_px.between(half, 384 - half).all()
    assert set(picks.junk_kind) == {"none", *JUNK_KINDS}
    # a good pick's box, cut at its coordinate, is the projection at its true pose and origin
    # (the CTF applied to the whole micrograph instead of the box: close, not identical)
    assert sim.clean_picks is not None
    good = picks.index[picks.is_good].to_numpy()
    ctf = ctf_2d(
        BOX,
        sim.pixel_size_a,
        picks.defocus_u_a[good],
        picks.defocus_v_a[good],
        picks.defocus_angle_deg[good],
    )
    expected = projector.project(
        picks.rot_deg[good],
        picks.tilt_deg[good],
        picks.psi_deg[good],
        picks.origin_x_a[good] / sim.pixel_size_a,
        picks.origin_y_a[good] / sim.pixel_size_a,
        ctf,
    )
    # the ice-thickness gradient adds a plane to every box: remove it first
    flat, _, _ = normalise_images(sim.clean_picks[good], bg_radius_px=0.45 * BOX)
    scores = [_corr(a, b) for a, b in zip(flat, expected, strict=True)]
    assert np.median(scores) > 0.95
    # empty picks hold no particle: their noiseless box is far flatter than a good one's
    empty = picks.index[picks.junk_kind == "empty"].to_numpy()
    detrended = [
        w - np.polyval(np.polyfit(np.arange(BOX), w.mean(axis=0), 1), np.arange(BOX))
        for w in sim.clean_picks[empty]
    ]
    assert max(d.std() for d in detrended) < 0.5 * min(sim.clean_picks[good].std(axis=(1, 2)))
