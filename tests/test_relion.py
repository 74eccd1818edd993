"""RELION wrappers: running and error reporting, extraction from simulated micrographs against
the simulator's ground truth, reconstruction, and pose errors against known rotations.

Tests marked ``relion`` run the RELION programs and skip where they are not installed; the
refinement test is also ``slow`` (tens of seconds).
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from particleseg_model.em.geometry import euler_matrices, random_euler
from particleseg_model.em.maps import DensityMap, generate_map, load_map, lowpass, write_mrc
from particleseg_model.em.mrc import open_stack, read_particles_table
from particleseg_model.em.star import read_star
from particleseg_model.relion import (
    RelionError,
    auto_refine,
    default_ini_lowpass_a,
    extract_particles,
    pose_errors,
    reconstruct,
    reference_geometry,
    relion_error_text,
    run_relion,
    summarise_pose_errors,
)
from particleseg_model.simulation.demo_archive import write_demo_archive, write_star
from particleseg_model.simulation.simulate import (
    FourierProjector,
    SimulationConfig,
    ctf_2d,
    normalise_images,
    simulate_particles,
)

HAS_RELION = shutil.which("relion_preprocess") is not None
needs_relion = pytest.mark.skipif(
    not HAS_RELION,
    reason="RELION is not installed (relion_preprocess not on PATH; "
    "apt-get install -y relion, or `make setup`)",
)

BOX = 64
N_PICKS = 60


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def micrograph_entry(tmp_path_factory) -> Path:
    """A tiny demo archive micrograph entry (60 picks, 30% junk, 512 px micrographs): its
    ``data`` directory with Micrographs/, Coordinates/*.star|box, micrographs_ctf.star,
    ground_truth.csv; its map is in the mirror's EMDB layout."""
    out = tmp_path_factory.mktemp("archive") / "mirror"
    (entry,) = write_demo_archive(
        out,
        maps=["generated:globular"],
        n_particles=N_PICKS,
        box=BOX,
        micrograph_size=512,
        junk_fraction=0.3,
        progress=False,
    )
    return out / "archive" / entry.split("-")[1] / "data"


@pytest.fixture(scope="module")
def extracted(micrograph_entry: Path, tmp_path_factory):
    lines: list[str] = []
    result = extract_particles(
        micrograph_entry / "micrographs_ctf.star",
        micrograph_entry / "Coordinates",
        tmp_path_factory.mktemp("extract") / "project",
        box_px=BOX,
        log=lines.append,
    )
    return result, lines


def _windows(data: Path, table: pd.DataFrame, box: int) -> np.ndarray:
    """The boxes cut from the micrographs at the table's coordinates (numpy), contrast
    inverted: what RELION extraction should give before normalisation."""
    half = box // 2
    out = []
    for row in table.itertuples():
        mic = open_stack(data / row.micrograph_name)[0]
        x, y = int(row.coordinate_x_px), int(row.coordinate_y_px)
        out.append(-np.asarray(mic[y - half : y + half, x - half : x + half], dtype=np.float32))
    return np.stack(out)


# ------------------------------------------------------------------------------ extraction


@pytest.mark.relion
@needs_relion
def test_extraction_matches_the_micrographs_and_the_ground_truth(
    micrograph_entry: Path, extracted, tmp_path: Path
) -> None:
    result, lines = extracted
    truth = pd.read_csv(micrograph_entry / "ground_truth.csv")
    assert result.n_particles == len(truth) == N_PICKS
    assert result.n_micrographs == truth.micrograph_name.nunique()
    assert (result.box_px, result.image_size_px, result.rescale_px) == (BOX, BOX, None)
    assert result.normalise and result.invert_contrast and result.bg_radius_px == 24
    assert any("Written out STAR file with 60 particles" in line for line in lines)
    star = read_star(result.particles_star)
    particles = star.particles
    assert particles.image_size_px.eq(BOX).all()
    assert np.allclose(particles.pixel_size_a, result.pixel_size_a)
    images = read_particles_table(particles, base_dir=result.project_dir)
    assert images.shape == (N_PICKS, BOX, BOX)

    # the boxes are the micrographs' windows at the coordinates (centre pixel box // 2),
    # contrast inverted and normalised exactly as the simulator's RELION-style normalisation
    windows = _windows(micrograph_entry, particles, BOX)
    expected, _, _ = normalise_images(windows, bg_radius_px=24)
    assert np.abs(images - expected).max() < 1e-3

    # background (outside the radius) has mean 0 and standard deviation 1 after the ramp
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    background = images[:, (x**2 + y**2) > 24**2]
    assert np.abs(background.mean(axis=1)).max() < 1e-3
    assert np.allclose(background.std(axis=1), 1.0, atol=1e-3)

    # every good particle correlates with the map projected at its true pose, origin and CTF
    merged = particles.merge(
        truth, on=["micrograph_name", "coordinate_x_px", "coordinate_y_px"], suffixes=("", "_true")
    )
    assert len(merged) == N_PICKS
    good = merged[merged.is_good]
    # the demo's map is in the mirror's EMDB layout (archive/<n>/data -> the mirror root)
    packed = micrograph_entry.parents[2] / "emdb_files/structures/EMD-95001/map/emd_95001.map.gz"
    with gzip.open(packed) as source:
        (tmp_path / "emd_95001.map").write_bytes(source.read())
    density = load_map(tmp_path / "emd_95001.map")
    pixel = density.pixel_size_a
    ctf = ctf_2d(
        BOX, pixel, good.defocus_u_a_true, good.defocus_v_a_true, good.defocus_angle_deg_true
    )
    model = FourierProjector(density.data).project(
        good.rot_deg_true,
        good.tilt_deg_true,
        good.psi_deg_true,
        good.origin_x_a_true / pixel,
        good.origin_y_a_true / pixel,
        ctf,
    )
    good_images = images[good.index.to_numpy()]

    def unit(stack: np.ndarray) -> np.ndarray:
        flat = stack.reshape(len(stack), -1).astype(np.float64)
        flat = flat - flat.mean(axis=1, keepdims=True)
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)

    scores = unit(good_images) @ unit(model).T  # particle i against the model of particle j
    own = np.diag(scores)
    assert len(own) >= 30 and (own > 0.05).all() and np.median(own) > 0.15
    # each particle is identified by its own true pose among all the good ones ...
    assert np.mean(scores.argmax(axis=1) == np.arange(len(own))) >= 0.95
    # ... and matches it better than with the axes swapped, y flipped, or 2 px off centre
    for other in (model.transpose(0, 2, 1), model[:, ::-1], np.roll(model, 2, axis=2)):
        assert np.median(own) > np.median((unit(good_images) * unit(other)).sum(axis=1)) + 0.03
    # their mean image is centred: the particles sit in the middle of the box
    weights = np.clip(np.mean(good_images, axis=0), 0, None)
    yy, xx = np.mgrid[:BOX, :BOX]
    cy, cx = (weights * yy).sum() / weights.sum(), (weights * xx).sum() / weights.sum()
    assert abs(cx - BOX // 2) < 2 and abs(cy - BOX // 2) < 2


@pytest.mark.relion
@needs_relion
def test_box_and_star_coordinates_give_the_same_particles(
    micrograph_entry: Path, extracted, tmp_path: Path
) -> None:
    star_result, _ = extracted
    box_result = extract_particles(
        micrograph_entry / "micrographs_ctf.star",
        micrograph_entry / "Coordinates",
        tmp_path / "from_box",
        box_px=BOX,
        coord_suffix=".box",
    )
    a = read_star(star_result.particles_star).particles
    b = read_star(box_result.particles_star).particles
    columns = ["micrograph_name", "coordinate_x_px", "coordinate_y_px", "image_name"]
    pd.testing.assert_frame_equal(a[columns], b[columns])
    images_a = read_particles_table(a, base_dir=star_result.project_dir)
    images_b = read_particles_table(b, base_dir=box_result.project_dir)
    assert np.array_equal(images_a, images_b)


@pytest.mark.relion
@needs_relion
def test_extraction_from_a_micrograph_list_with_rescaling(
    micrograph_entry: Path, tmp_path: Path
) -> None:
    mics = sorted((micrograph_entry / "Micrographs").glob("*.mrc"))
    coords = sorted((micrograph_entry / "Coordinates").glob("*.box"))
    result = extract_particles(
        mics,
        coords,
        tmp_path / "small",
        box_px=BOX,
        rescale_px=32,
        invert_contrast=False,
        normalise=False,
    )
    assert (result.image_size_px, result.rescale_px, result.bg_radius_px) == (32, 32, None)
    assert result.pixel_size_a == pytest.approx(2 * result.micrograph_pixel_size_a)
    particles = read_star(result.particles_star).particles
    assert len(particles) == N_PICKS
    assert np.allclose(particles.pixel_size_a, result.pixel_size_a, rtol=1e-4)
    images = read_particles_table(particles, base_dir=result.project_dir)
    assert images.shape == (N_PICKS, 32, 32)
    # not inverted: the (dark) particles' boxes have lower centres than edges on average
    y, x = np.mgrid[:32, :32] - 16
    centre = images[:, (x**2 + y**2) < 8**2].mean()
    edge = images[:, (x**2 + y**2) > 12**2].mean()
    assert centre < edge


@pytest.mark.relion
@needs_relion
def test_extraction_refuses_an_existing_directory_and_missing_coordinates(
    micrograph_entry: Path, extracted, tmp_path: Path
) -> None:
    result, _ = extracted
    with pytest.raises(FileExistsError):
        extract_particles(
            micrograph_entry / "micrographs_ctf.star",
            micrograph_entry / "Coordinates",
            result.project_dir,
            box_px=BOX,
        )
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "other.star").write_text("data_\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n1 2\n")
    with pytest.raises(ValueError, match="no micrograph has particle coordinates"):
        extract_particles(
            micrograph_entry / "micrographs_ctf.star", empty, tmp_path / "x", box_px=BOX
        )
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]  # no temporary left


# ------------------------------------------------------------------------------ running


@pytest.mark.relion
@needs_relion
def test_relion_error_carries_relions_message_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(RelionError) as caught:
        run_relion(
            [
                "relion_preprocess",
                "--i",
                "missing.star",
                "--coord_suffix",
                ".star",
                "--part_star",
                "out.star",
                "--extract",
                "--extract_size",
                "64",
            ],
            cwd=tmp_path,
        )
    error = caught.value
    assert "MetaDataTable::read: File missing.star does not exist" in str(error)
    assert "relion_preprocess --i missing.star" in str(error)
    assert error.returncode not in (0, None)
    assert "Backtrace" not in error.error_text and "relion_preprocess(" not in error.error_text


@pytest.fixture
def fake_relion(tmp_path: Path, monkeypatch) -> Path:
    """A stand-in RELION program on PATH: prints the output of $FAKE_MODE."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "relion_fake"
    script.write_text("""#!/bin/sh
echo " Reading particles ..."
printf '000/??? sec ~~(,_,">                          [oo]\\r   1/   1 sec ......~~(,_,">'
echo
echo " Written out 3 particles"
if [ "$FAKE_MODE" = fail ]; then
  echo "in: ./src/fake.cpp, line 12" >&2
  echo "ERROR: " >&2
  echo "Fake::run: the input is broken" >&2
  echo "=== Backtrace  ===" >&2
  echo "relion_fake(_ZN11RelionErrorC1E+0x7a) [0x55]" >&2
  echo "==================" >&2
  echo "ERROR: " >&2
  echo "Fake::run: the input is broken" >&2
  exit 1
fi
if [ "$FAKE_MODE" = slow ]; then sleep 30; fi
echo "warning on stderr" >&2
exit 0
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


def test_run_relion_streams_lines_without_progress_bars(
    fake_relion: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("FAKE_MODE", "ok")
    seen: list[str] = []
    run = run_relion(
        ["relion_fake", "--i", "x"], cwd=tmp_path, log=seen.append, transcript=tmp_path / "run.log"
    )
    assert run.returncode == 0 and run.seconds >= 0
    lines = [s.strip() for s in seen]
    # stdout keeps its order; a stderr line may arrive before or between them (two pipes)
    assert [s for s in lines if s != "warning on stderr"] == [
        "Reading particles ...",
        "Written out 3 particles",
    ]
    assert sorted(lines) == sorted(
        ["Reading particles ...", "Written out 3 particles", "warning on stderr"]
    )
    assert "[err] warning on stderr" in (tmp_path / "run.log").read_text()
    logger = logging.getLogger("test.relion")
    with caplog.at_level(logging.INFO, logger="test.relion"):
        run_relion(["relion_fake"], cwd=tmp_path, log=logger)
    assert "Written out 3 particles" in caplog.text


def test_run_relion_failure_and_timeout(fake_relion: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "fail")
    with pytest.raises(RelionError) as caught:
        run_relion(["relion_fake", "--i", "in put.star"], cwd=tmp_path)
    message = str(caught.value)
    assert "relion_fake failed (exit status 1): Fake::run: the input is broken" in message
    assert "relion_fake --i 'in put.star'" in message
    assert caught.value.error_text == "Fake::run: the input is broken"
    monkeypatch.setenv("FAKE_MODE", "slow")
    with pytest.raises(RelionError, match="time limit of 0.5 s"):
        run_relion(["relion_fake"], cwd=tmp_path, timeout_s=0.5)


def test_run_relion_names_a_missing_program_and_directory(tmp_path: Path) -> None:
    with pytest.raises(RelionError, match="relion_no_such_program not found on PATH"):
        run_relion(["relion_no_such_program"], cwd=tmp_path)
    if shutil.which("mpirun"):
        with pytest.raises(RelionError, match="relion_no_such_program_mpi not found"):
            run_relion(["relion_no_such_program"], cwd=tmp_path, mpi=3)
    with pytest.raises(RelionError, match="does not exist"):
        run_relion(["sh", "-c", "true"], cwd=tmp_path / "absent")


def test_error_text_falls_back_to_the_last_lines() -> None:
    assert relion_error_text(["a", "b", "", "c"]) == "a\nb\nc"
    mpi = [
        "ERROR: ",
        "MlOptimiser::initialise: no particles",
        "-" * 40,
        "MPI_ABORT was invoked on rank 1",
        "ERROR: ",
        "MlOptimiser::initialise: no particles",
    ]
    assert relion_error_text(mpi) == "MlOptimiser::initialise: no particles"
    # Open MPI's runtime may add its own ORTE_ERROR_LOG lines after RELION's message
    orte = "[vm:01149] [[26755,0],0] ORTE_ERROR_LOG: Data unpack would read past end of buffer"
    assert relion_error_text([*mpi, orte, orte]) == "MlOptimiser::initialise: no particles"


# ------------------------------------------------------------------------------ poses


def _poses(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rot, tilt, psi = random_euler(rng, n)
    return pd.DataFrame(
        {
            "image_name": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
            "rot_deg": rot,
            "tilt_deg": tilt,
            "psi_deg": psi,
            "origin_x_a": rng.normal(0, 3, n),
            "origin_y_a": rng.normal(0, 3, n),
        }
    )


def test_pose_errors_are_exact_on_known_rotations() -> None:
    truth = _poses(50)
    same = pose_errors(truth.sample(frac=1.0, random_state=1), truth)
    assert len(same) == 50
    assert np.allclose(same.angle_error_deg, 0.0, atol=1e-5)
    assert np.allclose(same.shift_error_a, 0.0)
    for column in ("rot_deg", "tilt_deg", "psi_deg"):
        moved = truth.copy()
        moved[column] += 10.0  # one Euler angle by 10 degrees: a 10-degree rotation
        errors = pose_errors(moved, truth)
        assert np.allclose(errors.angle_error_deg, 10.0, atol=1e-6), column
    # a 10-degree rotation about a random axis, applied in the map frame
    rng = np.random.default_rng(3)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    turn = np.eye(3) + np.sin(np.radians(10)) * k + (1 - np.cos(np.radians(10))) * k @ k
    matrices = euler_matrices(truth.rot_deg, truth.tilt_deg, truth.psi_deg) @ turn
    tilt = np.degrees(np.arccos(np.clip(matrices[:, 2, 2], -1, 1)))
    rot = np.degrees(np.arctan2(matrices[:, 2, 1], matrices[:, 2, 0]))
    psi = np.degrees(np.arctan2(matrices[:, 1, 2], -matrices[:, 0, 2]))
    turned = truth.assign(rot_deg=rot, tilt_deg=tilt, psi_deg=psi)
    assert np.allclose(euler_matrices(rot, tilt, psi), matrices, atol=1e-9)
    assert np.allclose(pose_errors(turned, truth).angle_error_deg, 10.0, atol=1e-5)
    # a shift by (3, 4) A is 5 A
    shifted = truth.assign(origin_x_a=truth.origin_x_a + 3, origin_y_a=truth.origin_y_a - 4)
    errors = pose_errors(shifted, truth)
    assert np.allclose(errors.shift_error_a, 5.0)
    assert np.allclose(errors.shift_x_a, 3.0) and np.allclose(errors.shift_y_a, -4.0)


def test_pose_errors_skip_junk_and_unmatched_rows_and_summarise() -> None:
    truth = _poses(10)
    truth.loc[[2, 5], ["rot_deg", "tilt_deg", "psi_deg", "origin_x_a", "origin_y_a"]] = np.nan
    refined = truth.fillna(0.0)
    refined.loc[0, "psi_deg"] += 30.0
    refined = pd.concat([refined, _poses(1, seed=9).assign(image_name="1@other.mrcs")])
    errors = pose_errors(refined, truth)
    assert len(errors) == 8 and "1@other.mrcs" not in set(errors.image_name)
    summary = summarise_pose_errors(errors)
    assert summary["n_particles"] == 8
    assert summary["median_angle_error_deg"] == pytest.approx(0.0, abs=1e-5)
    assert summary["fraction_within_deg"] == pytest.approx(7 / 8)
    assert summary["mean_angle_error_deg"] == pytest.approx(30.0 / 8)
    # matching on several columns (particles extracted from micrographs)
    picks = truth.assign(
        micrograph_name="m.mrc", coordinate_x_px=np.arange(10.0) * 70, coordinate_y_px=100.0
    ).drop(columns="image_name")
    on = ("micrograph_name", "coordinate_x_px", "coordinate_y_px")
    refined_picks = picks.fillna(0.0).iloc[::-1]
    assert len(pose_errors(refined_picks, picks, on=on)) == 8


def test_default_lowpass_follows_the_particle_size() -> None:
    assert default_ini_lowpass_a(80.0, 2.0) == pytest.approx(20.0)
    assert default_ini_lowpass_a(400.0, 2.0) == pytest.approx(60.0)
    assert default_ini_lowpass_a(40.0, 3.0) == pytest.approx(18.0)  # >= 6 px
    density = generate_map("globular", 48, seed=0)
    geometry = reference_geometry(density)
    assert 0 < geometry.body_diameter_a < geometry.mask_diameter_a < 48 * density.pixel_size_a
    assert geometry.ini_lowpass_a == pytest.approx(
        default_ini_lowpass_a(geometry.body_diameter_a, density.pixel_size_a)
    )


# ------------------------------------------------------------------------------ reconstruction


def _particle_project(
    root: Path, density: DensityMap, n: int, snr: float, seed: int = 0, with_poses: bool = True
):
    sim = simulate_particles(
        density,
        SimulationConfig(n_particles=n, junk_fraction=0.0, snr=snr),
        seed=seed,
        keep_clean=False,
    )
    write_mrc(root / "Particles" / "particles_001.mrcs", sim.images, sim.pixel_size_a, stack=True)
    star = (
        sim.star
        if with_poses
        else sim.star.drop(
            columns=[
                "rlnAngleRot",
                "rlnAngleTilt",
                "rlnAnglePsi",
                "rlnOriginXAngst",
                "rlnOriginYAngst",
            ]
        )
    )
    write_star(root / "particles.star", {"optics": sim.optics, "particles": star})
    return sim


@pytest.mark.relion
@needs_relion
def test_reconstruct_from_true_poses_recovers_the_map(tmp_path: Path) -> None:
    density = generate_map("globular", 32, seed=1)
    _particle_project(tmp_path, density, 300, snr=1.0)
    out = reconstruct(tmp_path / "particles.star", tmp_path / "recon" / "map.mrc")
    recon = load_map(out)
    assert recon.data.shape == (32, 32, 32)
    assert recon.pixel_size_a == pytest.approx(density.pixel_size_a, rel=1e-3)
    cutoff = 4 * density.pixel_size_a
    assert (
        _corr(
            lowpass(recon.data, recon.pixel_size_a, cutoff),
            lowpass(density.data, density.pixel_size_a, cutoff),
        )
        > 0.9
    )


@pytest.mark.relion
@needs_relion
def test_auto_refine_failure_under_mpi_names_relions_error(tmp_path: Path) -> None:
    if shutil.which("relion_refine_mpi") is None or shutil.which("mpirun") is None:
        pytest.skip("relion_refine_mpi or mpirun not on PATH")
    density = generate_map("globular", 32, seed=0)
    particles = pd.DataFrame(
        {
            "rlnImageName": ["1@Particles/missing.mrcs", "2@Particles/missing.mrcs"],
            "rlnOpticsGroup": [1, 1],
            "rlnDefocusU": [1e4, 1e4],
            "rlnDefocusV": [1e4, 1e4],
            "rlnDefocusAngle": [0.0, 0.0],
        }
    )
    write_star(
        tmp_path / "particles.star",
        {"optics": SimulationConfig().optics(density.pixel_size_a, 32), "particles": particles},
    )
    with pytest.raises(RelionError) as caught:
        auto_refine(tmp_path / "particles.star", density, tmp_path / "refine", timeout_s=120)
    message = str(caught.value)
    assert "relion_refine_mpi failed" in message
    assert "Cannot read file Particles/missing.mrcs" in message
    assert "mpirun --allow-run-as-root --oversubscribe -n 3 relion_refine_mpi" in message
    assert "--auto_refine --split_random_halves" in message
    with pytest.raises(ValueError, match="at least 3 MPI ranks"):
        auto_refine(tmp_path / "particles.star", density, tmp_path / "refine", mpi_ranks=2)


@pytest.mark.relion
@pytest.mark.slow
@needs_relion
def test_tiny_auto_refine_recovers_the_poses(tmp_path: Path) -> None:
    if shutil.which("relion_refine_mpi") is None or shutil.which("mpirun") is None:
        pytest.skip("relion_refine_mpi or mpirun not on PATH")
    density = generate_map("globular", 48, seed=0)
    sim = _particle_project(tmp_path / "project", density, 150, snr=1.0, with_poses=False)
    # local searches from 7.5 degrees on (RELION's default: 3.75) keep it under a minute
    refine = auto_refine(
        tmp_path / "project" / "particles.star",
        density,
        tmp_path / "refine",
        local_healpix_order=3,
        timeout_s=300,
    )
    assert refine.converged and refine.data_star.is_file() and refine.map_path.is_file()
    assert refine.iterations >= 3 and refine.ini_lowpass_a == pytest.approx(
        reference_geometry(density).ini_lowpass_a
    )
    assert 2 * density.pixel_size_a <= refine.resolution_a < 30
    # the refined map is the true one, in the same frame (no flip, no shift)
    refined_map = load_map(refine.map_path)
    assert (
        _corr(
            lowpass(refined_map.data, density.pixel_size_a, 25.0),
            lowpass(density.data, density.pixel_size_a, 25.0),
        )
        > 0.9
    )
    refined = read_star(refine.data_star).particles
    summary = summarise_pose_errors(pose_errors(refined, sim.truth))
    assert summary["n_particles"] == 150
    # the generated globular map is pseudo-two-fold symmetric: some particles refine to the
    # turned-over view, so the median, not the mean, shows that the poses were recovered
    assert summary["median_angle_error_deg"] < 15
    assert summary["median_shift_error_a"] < density.pixel_size_a
