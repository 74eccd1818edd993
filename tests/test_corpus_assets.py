"""The per-dataset corpus assets, end to end on a small simulated archive served on loopback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from particleseg_assets.assets.corpus import (
    mask_volume,
    particle_masks,
    particle_stacks,
    refined_particles,
)
from particleseg_assets.resources import EmpiarResource, RelionResource, StorageResource
from particleseg_model.access.server import serve
from particleseg_model.corpus.store import open_corpus
from particleseg_model.simulation.demo_archive import write_demo_archive

ASSETS = [particle_stacks, refined_particles, mask_volume, particle_masks]
N_PARTICLES = 40


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "archive"
    write_demo_archive(
        out,
        maps=["generated:globular", "generated:ring"],
        n_particles=N_PARTICLES,
        box=64,
        micrograph_size=384,
        particles_per_stack=16,
        seed=5,
        snr=2.0,
        progress=False,
    )
    return out


@pytest.fixture
def served(small_archive: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with serve(small_archive) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield server


def _run(
    tmp_path: Path,
    key: str,
    selection=None,
    config: dict | None = None,
    raise_on_error: bool = True,
):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("empiar_id", [key])
    return materialize(
        ASSETS,
        partition_key=key,
        instance=instance,
        selection=selection,
        resources={
            "empiar": EmpiarResource(),
            "storage": StorageResource(root=str(tmp_path)),
            "relion": RelionResource(),
        },
        run_config={"ops": config or {}},
        raise_on_error=raise_on_error,
    )


def _failure(result) -> str:
    """The user's error of the failed step (Dagster wraps it)."""
    error = result.get_step_failure_events()[0].event_specific_data.error
    return error.to_string()


def _metadata(result, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        if event.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    raise KeyError(asset)


def test_particle_entry_becomes_a_labelled_corpus(served, tmp_path: Path) -> None:
    result = _run(tmp_path, "30001")
    assert result.success
    stacks = _metadata(result, "particle_stacks")
    assert stacks["particles"] == N_PARTICLES and stacks["box_px"] == 64
    assert stacks["source"] == "particles" and stacks["poses_deposited"] is True
    refined = _metadata(result, "refined_particles")
    # the simulator deposits the true poses: zero error against its ground truth
    assert refined["source"] == "deposited"
    assert refined["pose_median_angle_error_deg"] == pytest.approx(0, abs=1e-3)
    mask = _metadata(result, "mask_volume")
    assert 0.005 < mask["volume_fraction"] < 0.5
    # the simulated entries state a nominal 3.2 A map in their EMDB records
    assert refined["resolution_a"] == pytest.approx(3.2)
    labels_md = _metadata(result, "particle_masks")
    assert labels_md["particles"] == N_PARTICLES
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert {name: check.passed for name, check in checks.items()} == {
        "poses_for_every_particle": True,
        "resolution_reported": True,
        "masks_not_empty": True,
        "corpus_complete": True,
        "label_shares_like_the_others": True,
    }
    rows = checks["corpus_complete"].metadata
    assert rows["particles_in_corpus"].value == rows["parquet_rows"].value == N_PARTICLES
    assert checks["poses_for_every_particle"].metadata["without_pose"].value == 0
    assert labels_md["particles_with_masks"].startswith("![")

    corpus = open_corpus(tmp_path / "corpus", "30001")
    assert corpus.n_particles == N_PARTICLES and corpus.box == 64
    labels = np.asarray(corpus.labels[:])
    images = np.asarray(corpus.images[:], dtype=np.float32)
    assert set(np.unique(labels)) == {0, 1, 2}
    table = corpus.table
    assert set(table["split"]) <= {"train", "val", "test"}
    assert table["image_name"].is_unique and len(table) == N_PARTICLES
    # labels sit on the particles: the brightest pixels of a good particle (white after
    # extraction-style normalisation) fall inside its mask, and not once the mask is moved
    from scipy import ndimage

    good = np.flatnonzero(table["is_good"].astype(bool).to_numpy())

    def inside(i: int, label: np.ndarray) -> float:
        smooth = ndimage.gaussian_filter(images[i], 2)
        bright = smooth > np.percentile(smooth, 95)
        return float((label[bright] > 0).mean())

    aligned = [inside(i, labels[i]) for i in good]
    moved = [inside(i, np.roll(labels[i], 20, axis=1)) for i in good]
    assert np.median(aligned) > 0.95 and np.mean(moved) < np.mean(aligned) - 0.1
    attrs = corpus.attrs
    assert attrs["threshold"] == 10.0 and attrs["edge_px"] == 11
    assert attrs["pixel_size_a"] == pytest.approx(stacks["pixel_size_a"])
    # edge is a band outside the signal: every edge pixel touches signal within 5 px
    near = ndimage.maximum_filter(labels == 1, size=(1, 11, 11))
    assert np.all(near[labels == 2])


def test_bad_rows_are_named_and_the_last_corpus_survives(
    served, small_archive: Path, tmp_path: Path
) -> None:
    assert _run(tmp_path, "30001").success
    before = open_corpus(tmp_path / "corpus", "30001")
    before_labels = np.asarray(before.labels[:])
    # a stack goes missing under the refined STAR file
    stack = tmp_path / "downloads" / "30001" / "data" / "Particles" / "particles_002.mrcs"
    stack.unlink()
    failed = _run(tmp_path, "30001", selection=[particle_masks], raise_on_error=False)
    assert not failed.success
    message = _failure(failed)
    assert "16 particles cannot be read: stack Particles/particles_002.mrcs, rows 17-32" in message
    after = open_corpus(tmp_path / "corpus", "30001")
    assert np.array_equal(np.asarray(after.labels[:]), before_labels)
    assert not [p for p in (tmp_path / "corpus").iterdir() if "tmp" in p.name]

    skipped = _run(
        tmp_path,
        "30001",
        selection=[particle_masks],
        config={"particle_masks": {"config": {"skip_bad_rows": True}}},
    )
    md = _metadata(skipped, "particle_masks")
    assert md["skipped_bad_rows"] == 16 and md["particles"] == N_PARTICLES - 16
    assert open_corpus(tmp_path / "corpus", "30001").n_particles == N_PARTICLES - 16


@pytest.mark.relion
def test_micrograph_entry_is_extracted_with_relion(served, relion_bin, tmp_path: Path) -> None:
    result = _run(tmp_path, "30002", selection=[particle_stacks])
    md = _metadata(result, "particle_stacks")
    assert md["source"] == "micrographs" and md["poses_deposited"] is False
    assert md["box_px"] == 64 and md["extraction"]["invert_contrast"] is True
    manifest = json.loads((tmp_path / "particle_stacks" / "30002" / "manifest.json").read_text())
    truth = pd.read_csv(manifest["ground_truth"])
    # every extracted particle found its simulated pick (joined on micrograph + coordinates)
    assert len(truth) == md["particles"] > 0
    assert set(truth["junk_kind"]) - {"none"} <= {
        "empty",
        "ice",
        "carbon_edge",
        "aggregate",
        "off_centre",
        "fragment",
    }
    # without poses, "deposited" is refused in one line naming the STAR file
    refused = _run(
        tmp_path,
        "30002",
        selection=[refined_particles],
        raise_on_error=False,
        config={"refined_particles": {"config": {"source": "deposited"}}},
    )
    message = _failure(refused)
    assert "has no poses" in message and "particles.star" in message
    shutil.rmtree(tmp_path / "downloads")


def test_append_adds_only_new_particles(served, tmp_path: Path) -> None:
    config = {"refined_particles": {"config": {"source": "deposited"}}}
    assert _run(tmp_path, "30001", config=config).success
    first = open_corpus(tmp_path / "corpus", "30001").table[["image_name", "split"]]
    again = _run(
        tmp_path,
        "30001",
        selection=[particle_masks],
        config={"particle_masks": {"config": {"append": True}}},
    )
    md = _metadata(again, "particle_masks")
    assert md["already_in_corpus"] == N_PARTICLES and md["particles"] == 0
    after = open_corpus(tmp_path / "corpus", "30001").table[["image_name", "split"]]
    pd.testing.assert_frame_equal(after, first)  # old particles keep their rows and splits


def test_checks_fail_on_empty_masks_and_missing_poses(served, tmp_path: Path) -> None:
    assert _run(tmp_path, "30001").success
    # a threshold above any projected value leaves every particle without signal
    result = _run(
        tmp_path,
        "30001",
        selection=[particle_masks],
        config={"particle_masks": {"config": {"threshold": 1e9}}},
    )
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["masks_not_empty"].passed is False
    assert checks["masks_not_empty"].metadata["particles_without_signal"].value == N_PARTICLES
    assert checks["corpus_complete"].passed is True

    from particleseg_assets.assets.corpus import _poses_check
    from particleseg_model.corpus.build import poses_check

    table = pd.DataFrame(
        {
            "rot_deg": [0.0, np.nan, 3.0],
            "tilt_deg": [1.0, 2.0, np.inf],
            "psi_deg": 0.0,
            "origin_x_a": 0.0,
            "origin_y_a": 0.0,
        }
    )
    check = _poses_check(poses_check(table), Path("run_data.star"))
    assert check.passed is False and check.metadata["first_rows"].value == "2-3"
    no_origins = _poses_check(
        poses_check(table.drop(columns=["origin_x_a"])), Path("run_data.star")
    )
    assert no_origins.metadata["missing_columns"].value == "origin_x_a"


def test_remove_dataset_job_leaves_the_other_partitions(
    dagster_home: Path, tmp_path: Path, monkeypatch
) -> None:
    from particleseg_assets.jobs import remove_dataset_job

    archive = tmp_path / "archive"
    write_demo_archive(
        archive,
        maps=["generated:globular", "generated:ring"],
        n_particles=24,
        box=48,
        micrograph_entries=0,
        seed=3,
        progress=False,
    )
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("empiar_id", ["30001", "30002"])
    storage = StorageResource(root=str(tmp_path / "data"))
    resources = {"empiar": EmpiarResource(), "storage": storage, "relion": RelionResource()}
    with serve(archive) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        for key in ("30001", "30002"):
            assert materialize(
                ASSETS, partition_key=key, instance=instance, resources=resources
            ).success
    kept_labels = np.asarray(open_corpus(storage.path("corpus"), "30002").labels[:])

    result = remove_dataset_job.execute_in_process(
        instance=instance,
        resources={"storage": storage},
        run_config={"ops": {"remove_dataset": {"config": {"empiar_id": "EMPIAR-30001"}}}},
    )
    assert result.success
    assert instance.get_dynamic_partitions("empiar_id") == ["30002"]
    for folder in (
        "downloads",
        "particle_stacks",
        "refined_particles",
        "mask_volume",
        "particle_masks",
    ):
        assert not storage.path(folder, "30001").exists()
        assert storage.path(folder, "30002", "manifest.json").exists() or folder == "downloads"
    assert not (storage.path("corpus") / "30001.zarr").exists()
    assert instance.get_materialized_partitions(particle_masks.key) >= {"30002"}
    kept = open_corpus(storage.path("corpus"), "30002")
    assert np.array_equal(np.asarray(kept.labels[:]), kept_labels)

    missing = remove_dataset_job.execute_in_process(
        instance=instance,
        resources={"storage": storage},
        raise_on_error=False,
        run_config={"ops": {"remove_dataset": {"config": {"empiar_id": "30001"}}}},
    )
    assert not missing.success
    assert "EMPIAR-30001 is not an empiar_id partition" in _failure(missing)


def test_relion_resource_reads_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PARTICLESEG_RELION_MPI_RANKS", "5")
    monkeypatch.setenv("PARTICLESEG_RELION_THREADS", "2")
    monkeypatch.setenv("PARTICLESEG_RELION_BIN", str(tmp_path))
    relion = RelionResource()
    assert (relion.ranks(), relion.threads_per_rank()) == (5, 2)
    assert RelionResource(mpi_ranks=4).ranks() == 4
    with relion.on_path():
        assert os.environ["PATH"].split(os.pathsep)[0] == str(tmp_path)
    assert os.environ["PATH"].split(os.pathsep)[0] != str(tmp_path)
    monkeypatch.setenv("PARTICLESEG_RELION_MPI_RANKS", "three")
    with pytest.raises(ValueError, match="PARTICLESEG_RELION_MPI_RANKS='three'"):
        relion.ranks()
    with (
        pytest.raises(FileNotFoundError, match="not a directory"),
        RelionResource(bin_dir=str(tmp_path / "nowhere")).on_path(),
    ):
        pass
