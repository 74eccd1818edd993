"""The corpus and the model registry on a storage root that is not the local disk.

fsspec's ``memory://`` file system stands in for an object store: it lives in this process
only, so everything here runs in-process (library calls and Dagster ``materialize``).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

import particleseg_model.corpus.store as corpus_module
import particleseg_model.model.registry as registry
from particleseg_model.corpus.store import (
    CorpusWriter,
    append_to_corpus,
    list_corpus,
    open_corpus,
    remove_corpus,
    write_corpus,
)
from particleseg_model.model.registry import (
    get_model,
    latest_model,
    list_models,
    load_model,
    register_model,
    resolve_model,
    staging_dir,
)
from particleseg_model.storage import is_remote, join

BOX = 16
N_ASSET = 120  # particles of the simulated entry the asset test runs on
ATTRS = {"pixel_size_a": 1.5, "threshold": 10.0, "edge_px": 11}


@pytest.fixture
def memory_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh ``memory://`` root (deleted afterwards); local work and caches in tmp_path."""
    monkeypatch.setenv("PARTICLESEG_WORK", str(tmp_path / "work"))
    root = f"memory://particleseg-{uuid.uuid4().hex[:10]}"
    fs = fsspec.filesystem("memory")
    yield root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def particles(n: int, seed: int = 0, prefix: str = "p"):
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 1, (n, BOX, BOX)).astype(np.float32)
    labels = rng.integers(0, 3, (n, BOX, BOX)).astype(np.uint8)
    table = {
        "image_name": [f"{i + 1:06d}@{prefix}.mrcs" for i in range(n)],
        "rot_deg": rng.uniform(0, 360, n),
    }
    return images, labels, table


def entries(root: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(root)
    fs.invalidate_cache(path)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def _normalised(images: np.ndarray) -> np.ndarray:
    mean = images.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    std = images.std(axis=(1, 2), keepdims=True, dtype=np.float64)
    return ((images - mean) / std).astype(np.float16)


def test_storage_helpers() -> None:
    assert is_remote("s3://b/x") and is_remote("memory://x")
    assert not is_remote("/data") and not is_remote("file:///data")
    assert join("s3://bucket/root/", "corpus") == "s3://bucket/root/corpus"
    assert join("/data", "models") == "/data/models"


def test_remote_corpus_commits_by_pointer_and_survives_a_killed_writer(
    memory_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = join(memory_root, "corpus")
    images, labels, table = particles(20)
    first = write_corpus(root, "10028", images, labels, table, attrs=ATTRS, chunk_particles=8)
    assert first.n_particles == 20 and first.n_chunks == 3
    np.testing.assert_array_equal(first.labels[:], labels)
    # the same values as a local corpus of the same particles
    on_disk = write_corpus(
        tmp_path / "same", "10028", images, labels, table, attrs=ATTRS, chunk_particles=8
    )
    np.testing.assert_array_equal(first.images[:], on_disk.images[:])
    np.testing.assert_allclose(first.images[:], _normalised(images), atol=1e-3)
    assert first.table["image_name"].tolist() == table["image_name"]
    version = first.location.rsplit("/", 1)[-1]
    assert entries(root) == ["10028.zarr.current", version]
    pointer = json.loads(fsspec.filesystem("memory").cat_file(f"{root}/10028.zarr.current"))
    assert pointer["version"] == version and pointer["n_particles"] == 20

    def old_version_is_what_readers_see() -> None:
        assert list_corpus(root) == ["10028"]
        seen = open_corpus(root, "10028")
        assert seen.location == first.location and seen.n_particles == 20
        np.testing.assert_array_equal(seen.labels[:], labels)
        assert seen.table["image_name"].tolist() == table["image_name"]

    # a rewrite that fails inside the writer: chunks were written, nothing is visible, and
    # the new version is deleted
    new_images, new_labels, new_table = particles(30, seed=1, prefix="n")
    with (
        pytest.raises(RuntimeError, match="labelling failed"),
        CorpusWriter(root, "10028", BOX, attrs=ATTRS, chunk_particles=8) as writer,
    ):
        writer.append(new_images, new_labels, new_table)
        assert entries(root) == ["10028.zarr.current", version, writer._tmp]
        old_version_is_what_readers_see()  # mid-write
        raise RuntimeError("labelling failed")
    assert entries(root) == ["10028.zarr.current", version]
    old_version_is_what_readers_see()

    # a writer killed just before its commit (no clean-up code runs): the complete new
    # version stays behind, unreferenced, and readers never see it
    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch:
        patch.setattr(corpus_module._Place, "write_pointer", die)
        patch.setattr(CorpusWriter, "_cleanup", lambda self: None)
        killed = CorpusWriter(root, "10028", BOX, attrs=ATTRS, chunk_particles=8)
        killed.open()
        killed.append(new_images, new_labels, new_table)
        with pytest.raises(KeyboardInterrupt):
            killed.commit()
    leftover = killed._tmp
    assert entries(root) == ["10028.zarr.current", version, leftover]
    old_version_is_what_readers_see()

    # the next writer: a young leftover may be a live writer's and is kept; the old version
    # goes once the pointer has moved
    second = write_corpus(root, "10028", new_images, new_labels, new_table, attrs=ATTRS)
    assert second.n_particles == 30 and second.location != first.location
    np.testing.assert_array_equal(second.labels[:], new_labels)
    assert entries(root) == sorted(
        ["10028.zarr.current", leftover, second.location.rsplit("/", 1)[-1]]
    )
    # ... and a writer that counts it stale deletes it; an append copies, then commits
    more = particles(5, seed=2, prefix="m")
    grown = append_to_corpus(root, "10028", *more, stale_after_s=0)
    assert grown.n_particles == 35 and [h["mode"] for h in grown.attrs["history"]] == ["w", "a"]
    np.testing.assert_array_equal(grown.labels[:], np.concatenate([new_labels, more[1]]))
    assert entries(root) == ["10028.zarr.current", grown.location.rsplit("/", 1)[-1]]
    assert grown.stored_bytes() > 35 * BOX * BOX  # float16 noise barely compresses

    # a plain group synced from a local corpus is read as committed, then replaced
    local = write_corpus(tmp_path / "local-corpus", "10030", images, labels, table, attrs=ATTRS)
    fsspec.filesystem("memory").put(local.location, f"{root}/10030.zarr", recursive=True)
    assert list_corpus(root) == ["10028", "10030"]
    synced = open_corpus(root, "10030")
    assert synced.location == f"{root}/10030.zarr" and synced.n_particles == 20
    np.testing.assert_array_equal(synced.labels[:], labels)
    replaced = write_corpus(root, "10030", *more, attrs=ATTRS)
    assert replaced.n_particles == 5
    assert not [e for e in entries(root) if e == "10030.zarr"]

    assert remove_corpus(root, "10028")
    assert list_corpus(root) == ["10030"]
    assert not [e for e in entries(root) if e.startswith("10028")]
    with pytest.raises(FileNotFoundError, match="10028: no corpus partition"):
        open_corpus(root, "10028")


def _tiny_model(size: int = 16, seed: int = 0):
    """A one-layer segmentation network (per-pixel softmax over 3 classes): all the registry
    needs, and quick to build."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((size, size, 1)),
            keras.layers.Conv2D(3, 3, padding="same", activation="softmax"),
        ]
    )


def _stage(root: str, seed: int) -> Path:
    staged = staging_dir(root)
    _tiny_model(seed=seed).save(staged / "model.keras")
    (staged / "history.csv").write_text("epoch,loss\n0,1.0\n")
    return staged


def test_remote_registry_versions_latest_and_a_killed_upload(
    memory_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = join(memory_root, "models")
    fs = fsspec.filesystem("memory")
    assert latest_model(root) is None and list_models(root) == []
    staged = _stage(root, seed=1)
    assert staged.is_dir() and staged.is_relative_to(tmp_path / "work")  # Keras needs files
    first = register_model(
        root, staged, {"input_size": 16, "partitions": {"40001": 10}, "parent": None}
    )
    assert first.version == "v0001" and first.location == f"{root}/v0001"
    assert sorted(entries(f"{root}/v0001")) == ["history.csv", "manifest.json", "model.keras"]

    # the second upload: readers see v0001 as the latest until the LATEST object is written
    seen_during_upload = []
    put_file = fs.put_file

    def spying_put(local, remote, *args, **kwargs):
        seen_during_upload.append(
            (latest_model(root).version, [v.version for v in list_models(root)])
        )
        return put_file(local, remote, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(fs, "put_file", spying_put)
        second = register_model(
            root,
            _stage(root, seed=2),
            {"input_size": 16, "partitions": {"40001": 10, "40002": 5}, "parent": "v0001"},
        )
    assert second.version == "v0002"
    assert seen_during_upload == [("v0001", ["v0001"])] * 2  # model.keras, history.csv
    assert fs.cat_file(f"{root}/LATEST") == b"v0002\n"
    assert [v.version for v in list_models(root)] == ["v0001", "v0002"]

    latest = resolve_model(None, root)
    assert latest.version == "v0002" and latest.manifest["parent"] == "v0001"
    assert latest.partitions == {"40001": 10, "40002": 5}
    parent = resolve_model(f"{root}/{latest.manifest['parent']}/model.keras")
    assert parent.version == "v0001" and get_model(root, "1").location == parent.location

    # loading downloads each version once into the local cache; weights round-trip
    network = load_model(latest, expect_size=16)
    expected = _tiny_model(seed=2)
    for got, want in zip(network.get_weights(), expected.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    by_url = load_model(f"{root}/v0001")
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(by_url.get_weights(), network.get_weights(), strict=True)
    )
    assert parent.model_path.is_file() and parent.model_path.is_relative_to(tmp_path / "work")
    assert parent.model_location == f"{root}/v0001/model.keras"

    # an upload killed half-way: nothing changes for readers; its files are never reused
    def dying_put(local, remote, *args, **kwargs):
        if remote.endswith("history.csv"):
            raise ConnectionError("killed mid-upload")
        return put_file(local, remote, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(ConnectionError):
        patch.setattr(fs, "put_file", dying_put)
        register_model(root, _stage(root, seed=3), {"input_size": 16})
    assert latest_model(root).version == "v0002"
    assert [v.version for v in list_models(root)] == ["v0001", "v0002"]
    assert fs.exists(f"{root}/v0003/.started") and not fs.exists(f"{root}/v0003/manifest.json")
    # the next registration counts it stale (24 h normally) and deletes it
    monkeypatch.setattr(registry, "STALE_UPLOAD_S", -1.0)
    fourth = register_model(root, _stage(root, seed=4), {"input_size": 16})
    assert fourth.version == "v0004" and not fs.exists(f"{root}/v0003")
    assert [v.version for v in list_models(root)] == ["v0001", "v0002", "v0004"]
    assert resolve_model(None, root).version == "v0004"


@pytest.mark.slow
def test_corpus_and_model_assets_on_a_memory_root(
    memory_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """particle_stacks -> ... -> particle_masks -> segmentation_model -> iou_reports with the
    storage root in memory: the corpus and the registry land there, the local work (downloads,
    manifests, reports) in PARTICLESEG_WORK, and training reads the corpus back."""
    from dagster import DagsterInstance, materialize

    from particleseg_assets.assets.corpus import (
        mask_volume,
        particle_masks,
        particle_stacks,
        refined_particles,
    )
    from particleseg_assets.assets.model import iou_reports, segmentation_model
    from particleseg_assets.resources import EmpiarResource, RelionResource, StorageResource
    from particleseg_model.access.empiar import partition_key
    from particleseg_model.access.server import serve
    from particleseg_model.simulation.demo_archive import write_demo_archive

    archive = tmp_path / "archive"
    (entry,) = write_demo_archive(
        archive,
        maps=["generated:globular"],
        n_particles=N_ASSET,
        box=64,
        micrograph_entries=0,
        particles_per_stack=64,
        seed=5,
        snr=2.0,
        progress=False,
    )
    key = partition_key(entry)
    storage = StorageResource(root=memory_root)
    work = tmp_path / "work"
    assert storage.remote() and storage.path("downloads") == work / "downloads"
    assert storage.corpus_root() == f"{memory_root}/corpus"
    assets = [
        particle_stacks,
        refined_particles,
        mask_volume,
        particle_masks,
        segmentation_model,
        iou_reports,
    ]
    small = {
        "size": 32,
        "base_filters": 8,
        "epochs": 2,
        "patience": 2,
        "batch_size": 16,
        "optimizer": "adam",
        "learning_rate": 3e-3,
    }
    with serve(archive) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("empiar_id", [key])
        resources = {"empiar": EmpiarResource(), "storage": storage, "relion": RelionResource()}
        corpus_run = materialize(
            assets[:4], partition_key=key, instance=instance, resources=resources
        )
        model_run = materialize(
            assets,
            selection=[segmentation_model],
            instance=instance,
            resources=resources,
            run_config={"ops": {"segmentation_model": {"config": small}}},
        )
        report_run = materialize(
            assets,
            selection=[iou_reports],
            partition_key=key,
            instance=instance,
            resources=resources,
        )
    assert corpus_run.success and model_run.success and report_run.success

    # the corpus: in memory, read back equal to what the asset reported
    corpus = open_corpus(storage.corpus_root(), key)
    assert corpus.location.startswith(f"{memory_root}/corpus/{key}.zarr.v-")
    masks = {
        k: v.value
        for k, v in corpus_run.asset_materializations_for_node("particle_masks")[0].metadata.items()
    }
    assert (
        masks["particles"] == corpus.n_particles == N_ASSET and masks["corpus"] == corpus.location
    )
    assert masks["bytes_per_particle"] == round(corpus.stored_bytes() / N_ASSET)
    assert not (work / "corpus").exists() and not (work / "models").exists()
    manifest = json.loads((work / "particle_masks" / key / "manifest.json").read_text())
    assert manifest["corpus_root"] == storage.corpus_root()

    # the model: registered in memory, trained on that corpus, reported on its test split
    version = latest_model(storage.models_root())
    assert version.version == "v0001" and version.location == f"{memory_root}/models/v0001"
    assert version.partitions == {key: len(corpus.split_indices("train"))}
    model_md = {
        k: v.value
        for k, v in model_run.asset_materializations_for_node("segmentation_model")[
            0
        ].metadata.items()
    }
    assert model_md["model"] == f"{memory_root}/models/v0001/model.keras"
    report = json.loads((work / "iou_reports" / key / "report.json").read_text())
    row = version.manifest["metrics"]["per_partition"][0]
    assert report["model_version"] == "v0001" and report["mean_iou"] == row["mean_iou"]
    assert report["test_particles"] == len(corpus.split_indices("test")) > 0
