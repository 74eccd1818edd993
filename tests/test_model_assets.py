"""segmentation_model, iou_reports and the report sensor on a persistent Dagster instance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster import (
    AssetMaterialization,
    DagsterInstance,
    SensorResult,
    SkipReason,
    build_sensor_context,
    materialize,
)

from particleseg_assets.assets.corpus import particle_masks
from particleseg_assets.assets.model import iou_reports, segmentation_model
from particleseg_assets.definitions import defs
from particleseg_assets.resources import StorageResource
from particleseg_assets.sensors import model_reports_sensor
from particleseg_model.model.registry import latest_model, list_models

pytestmark = pytest.mark.slow

SMALL = {
    "size": 32,
    "base_filters": 12,
    "epochs": 15,
    "patience": 4,
    "optimizer": "adam",
    "learning_rate": 3e-3,
    "batch_size": 16,
}


@pytest.fixture
def storage(tmp_path: Path) -> StorageResource:
    from helpers import write_partition

    root = tmp_path / "data"
    write_partition(root / "corpus", "40001", 320, seed=1)
    write_partition(root / "corpus", "40003", 120, seed=3)
    return StorageResource(root=str(root))


def _train(instance, storage, raise_on_error: bool = True, **config):
    return materialize(
        [segmentation_model, particle_masks],
        selection=[segmentation_model],
        instance=instance,
        resources={"storage": storage},
        run_config={"ops": {"segmentation_model": {"config": {**SMALL, **config}}}},
        raise_on_error=raise_on_error,
    )


def _metadata(result, name: str) -> dict:
    event = result.asset_materializations_for_node(name)[0]
    return {k: v.value for k, v in event.metadata.items()}


def test_model_versions_incremental_reports_and_failures(dagster_home, storage, tmp_path):
    from helpers import write_partition

    instance = DagsterInstance.get()
    first = _train(instance, storage, holdout=["40003"])
    md = _metadata(first, "segmentation_model")
    assert md["version"] == "v0001" and md["mode"] == "full" and md["held_out"] == "40003"
    assert md["mean_iou_seen"] > 50 and md["mean_iou_unseen"] > 40  # percent, as the paper
    assert "| 40003 | False |" in md["iou_table"]
    assert md["training_curve"].startswith("![training curve](data:image/png;base64,")
    models = storage.path("models")
    assert latest_model(models).partitions.keys() == {"40001"}

    # a new partition: auto mode learns it incrementally from v0001 and reports the old one
    write_partition(storage.path("corpus"), "40002", 240, seed=2)
    second = _train(instance, storage, holdout=["40003"])
    md = _metadata(second, "segmentation_model")
    assert (md["version"], md["mode"], md["parent"], md["new_partitions"]) == (
        "v0002",
        "incremental",
        "v0001",
        "40002",
    )
    manifest = latest_model(models).manifest
    rows = {r["empiar_id"]: r for r in manifest["metrics"]["per_partition"]}
    assert "mean_iou_parent" in rows["40001"] and "mean_iou_parent" not in rows["40002"]
    assert manifest["partitions"].keys() == {"40001", "40002"}

    # failures never replace the latest model: unknown partition, bad optimizer mid-training
    failed = _train(instance, storage, raise_on_error=False, partitions=["49999"])
    assert not failed.success
    broken = _train(instance, storage, raise_on_error=False, mode="full", optimizer="sgd")
    assert not broken.success
    assert [v.version for v in list_models(models)] == ["v0001", "v0002"]
    assert latest_model(models).version == "v0002"
    assert not list(models.glob(".staging-*"))

    # the IoU report of one partition, from the latest model
    instance.add_dynamic_partitions("empiar_id", ["40001", "40003"])
    report = materialize(
        [iou_reports, segmentation_model, particle_masks],
        selection=[iou_reports],
        partition_key="40003",
        instance=instance,
        resources={"storage": storage},
    )
    md = _metadata(report, "iou_reports")
    assert md["model_version"] == "v0002" and md["seen_in_training"] is False
    saved = json.loads(storage.path("iou_reports", "40003", "report.json").read_text())
    assert (
        saved["mean_iou"] == md["mean_iou"] and saved["test_particles"] == md["test_particles"] > 0
    )
    assert storage.path("iou_reports", "40003", "overlay.png").stat().st_size > 1000


def test_report_sensor_requests_one_report_per_partition_and_version(dagster_home):
    instance = DagsterInstance.get()
    with build_sensor_context(instance=instance, definitions=defs) as context:
        assert isinstance(model_reports_sensor(context), SkipReason)
    instance.add_dynamic_partitions("empiar_id", ["40001", "40002"])
    for key in ("40001", "40002"):
        instance.report_runless_asset_event(AssetMaterialization("particle_masks", partition=key))
    instance.report_runless_asset_event(
        AssetMaterialization("segmentation_model", metadata={"version": "v0007"})
    )
    with build_sensor_context(instance=instance, definitions=defs) as context:
        result = model_reports_sensor(context)
    cursor = result.cursor
    assert isinstance(result, SensorResult)
    assert sorted((r.partition_key, r.run_key) for r in result.run_requests) == [
        ("40001", "iou-v0007-40001"),
        ("40002", "iou-v0007-40002"),
    ]
    with build_sensor_context(instance=instance, definitions=defs, cursor=cursor) as context:
        assert isinstance(model_reports_sensor(context), SkipReason)


def test_training_refuses_an_empty_corpus_and_a_partition_without_test_particles(
    dagster_home, tmp_path
):
    from helpers import BOX, disc_particles

    from particleseg_model.corpus.store import CorpusWriter, assign_split

    instance = DagsterInstance.get()
    empty = StorageResource(root=str(tmp_path / "empty"))
    failed = _train(instance, empty, raise_on_error=False)
    assert not failed.success
    assert "no corpus partitions to train on" in _failure(failed)

    storage = StorageResource(root=str(tmp_path / "data"))
    names = [
        n for n in (f"{i}@s.mrcs" for i in range(1, 200)) if assign_split("40020", n) != "test"
    ][:40]
    images, labels = disc_particles(len(names), seed=6)
    with CorpusWriter(storage.path("corpus"), "40020", BOX, attrs={"pixel_size_a": 2.0}) as w:
        w.append(images, labels, {"image_name": names})
    failed = _train(instance, storage, raise_on_error=False)
    assert "partitions ['40020'] have no test particles" in _failure(failed)
    assert latest_model(storage.path("models")) is None


def _failure(result) -> str:
    events = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return events[0].event_specific_data.error.to_string()
