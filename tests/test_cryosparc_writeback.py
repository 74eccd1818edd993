"""cryoSPARC .cs write-back: the kept rows with every field and dtype as read, the passthrough
file, and particleseg clean on a .cs input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import BOX, TINY, disc_particles, write_partition

from particleseg_model.em.cryosparc import (
    PASSTHROUGH_PREFIXES,
    passthrough_path,
    read_cs,
    write_cs,
    write_cs_subset,
)
from particleseg_model.model.registry import register_model, staging_dir

BIN = Path(sys.executable).parent
N = 40
DTYPE = [
    ("uid", "<u8"),
    ("blob/path", "S40"),
    ("blob/idx", "<u4"),
    ("blob/shape", "<u4", (2,)),
    ("blob/psize_A", "<f4"),
    ("blob/sign", "<f4"),
    ("ctf/type", "S1"),
    ("ctf/exp_group_id", "<u4"),
    ("ctf/accel_kv", "<f4"),
    ("ctf/cs_mm", "<f4"),
    ("ctf/amp_contrast", "<f4"),
    ("ctf/df1_A", "<f4"),
    ("ctf/df2_A", "<f4"),
    ("ctf/df_angle_rad", "<f4"),
    ("alignments2D/pose", "<f4"),
    ("alignments2D/class", "<u4"),
    ("location/micrograph_path", "S40"),
    ("location/center_x_frac", "<f4"),
    ("location/center_y_frac", "<f4"),
    ("location/micrograph_shape", "<u4", (2,)),
    ("pick_stats/ncc_score", "<f4"),
]


def write_job(project: Path, n: int = N, drop: tuple[str, ...] = ()) -> Path:
    """A cryoSPARC-like project: ``J3/extract/stack.mrc`` of disc particles and
    ``J12/J12_particles.cs`` naming them (blob/path relative to the project)."""
    import mrcfile

    images, _ = disc_particles(n, box=BOX, seed=5)
    (project / "J3" / "extract").mkdir(parents=True)
    with mrcfile.new(project / "J3" / "extract" / "stack.mrc") as mrc:
        mrc.set_data(images)
        mrc.voxel_size = 2.0
    dtype = [d for d in DTYPE if d[0] not in drop]
    rows = np.zeros(n, dtype=dtype)
    names = rows.dtype.names or ()
    rng = np.random.default_rng(0)
    rows["uid"] = rng.integers(1, 2**63, n, dtype=np.uint64)
    rows["blob/path"] = b"J3/extract/stack.mrc"
    rows["blob/idx"] = np.arange(n)
    rows["blob/shape"] = (BOX, BOX)
    rows["blob/psize_A"] = 2.0
    rows["blob/sign"] = -1
    for name, value in (
        ("ctf/accel_kv", 300),
        ("ctf/cs_mm", 2.7),
        ("ctf/amp_contrast", 0.1),
        ("ctf/df1_A", 12000.5),
        ("ctf/df2_A", 11000.25),
        ("ctf/df_angle_rad", 0.7),
    ):
        if name in names:
            rows[name] = value
    rows["alignments2D/pose"] = rng.uniform(0, 6, n)
    rows["alignments2D/class"] = rng.integers(0, 5, n)
    rows["location/micrograph_path"] = b"J2/motioncorrected/mic_001.mrc"
    rows["location/center_x_frac"] = rng.uniform(0, 1, n)
    rows["location/center_y_frac"] = rng.uniform(0, 1, n)
    rows["location/micrograph_shape"] = (4000, 3000)
    rows["pick_stats/ncc_score"] = rng.uniform(0, 1, n)
    path = project / "J12" / "J12_particles.cs"
    path.parent.mkdir()
    write_cs(path, rows)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding one tiny model (32 px) trained on disc particles; trained once a
    session (test_external_job and test_cryosparc_writeback share it)."""
    from particleseg_model.model.train import TrainConfig, train_segmentation

    base = tmp_path_factory.getbasetemp() / "tiny_clean_model"
    root = base / "models"
    if (root / "v0001" / "model.keras").is_file():
        return root
    write_partition(base / "corpus", "40001", 320, seed=1)
    trained = train_segmentation(
        base / "corpus", ["40001"], TrainConfig(**TINY), base / "trained", log=lambda line: None
    )
    staged = staging_dir(root)
    (staged / "model.keras").write_bytes(trained.model_path.read_bytes())
    register_model(root, staged, {"input_size": BOX, "arch": "custom", "partitions": {}})
    return root


def test_passthrough_names_follow_cryosparc() -> None:
    assert passthrough_path("P1/J12/J12_particles.cs").name == "J12_passthrough_particles.cs"
    assert passthrough_path("out/cleaned.cs").name == "cleaned_passthrough.cs"


def test_subset_round_trip_keeps_every_field_and_dtype(tmp_path: Path) -> None:
    source = write_job(tmp_path / "P1")
    particles = read_cs(source)
    keep = np.arange(N) % 3 != 0
    out, passthrough = write_cs_subset(particles, keep, tmp_path / "kept.cs")
    assert out == tmp_path / "kept.cs" and passthrough == tmp_path / "kept_passthrough.cs"
    assert not list(tmp_path.glob("*.npy"))  # np.save's suffix is not added
    rows = np.load(out)
    assert rows.dtype == particles.raw.dtype
    assert len(rows) == int(keep.sum())
    np.testing.assert_array_equal(rows, particles.raw[keep])  # every field, same order
    passed = np.load(passthrough)
    names = passed.dtype.names or ()
    assert names[0] == "uid"
    assert set(names) == {
        n for n in particles.fields if n == "uid" or n.startswith(PASSTHROUGH_PREFIXES)
    }
    assert "alignments2D/class" not in names and "pick_stats/ncc_score" in names
    for name in names:
        assert passed.dtype[name] == particles.raw.dtype[name]
        np.testing.assert_array_equal(passed[name], particles.raw[keep][name])
    # read back as particles: the same table rows
    again = read_cs(out)
    assert again.particles["image_name"].tolist() == (
        particles.particles["image_name"][keep].tolist()
    )


def test_an_input_passthrough_file_is_subset_by_uid(tmp_path: Path) -> None:
    source = write_job(tmp_path / "P1")
    particles = read_cs(source)
    extra = np.zeros(N, dtype=[("uid", "<u8"), ("location/exp_group_id", "<u4")])
    extra["uid"] = particles.raw["uid"][::-1]  # another order than the main file
    extra["location/exp_group_id"] = np.arange(N)[::-1]
    write_cs(passthrough_path(source), extra)
    keep = np.zeros(N, bool)
    keep[[1, 5, 7]] = True
    _, passthrough = write_cs_subset(particles, keep, tmp_path / "kept.cs")
    passed = np.load(passthrough)
    assert passed.dtype == extra.dtype
    assert passed["uid"].tolist() == particles.raw["uid"][keep].tolist()
    assert passed["location/exp_group_id"].tolist() == [1, 5, 7]


def test_clean_takes_a_cs_and_writes_a_cs(models: Path, tmp_path: Path) -> None:
    source = write_job(tmp_path / "P1")
    before = source.read_bytes()
    out = tmp_path / "P1" / "J13_particles.cs"
    proc = subprocess.run(
        [BIN / "particleseg", "clean", source, "--out", out, "--models-root", models,
         "--drop", "0.3", "--no-progress"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert source.read_bytes() == before  # never modified
    raw = np.load(source)
    rows = np.load(out)
    assert rows.dtype == raw.dtype and len(rows) == N - int(0.3 * N)
    # the kept rows are rows of the input, in their order
    index = {int(u): i for i, u in enumerate(raw["uid"])}
    positions = [index[int(u)] for u in rows["uid"]]
    assert positions == sorted(positions)
    np.testing.assert_array_equal(rows, raw[positions])
    assert (tmp_path / "P1" / "J13_passthrough_particles.cs").is_file()
    assert (tmp_path / "P1" / "J13_particles_scores.parquet").is_file()
    assert "J13_particles.cs" in proc.stdout and "every field as read" in proc.stdout
    assert not list((tmp_path / "P1").glob(".J13*"))  # the temporary STAR is gone


def test_a_cs_without_the_needed_fields_is_one_line_naming_them(
    models: Path, tmp_path: Path
) -> None:
    source = write_job(tmp_path / "P1", drop=("ctf/df1_A",))
    proc = subprocess.run(
        [BIN / "particleseg", "clean", source, "--out", tmp_path / "out.cs",
         "--models-root", models],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "missing fields ctf/df1_A" in proc.stderr and str(source) in proc.stderr
    assert not (tmp_path / "out.cs").exists()
