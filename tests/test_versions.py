"""The training decision, a tiny train-and-register run, the IoU report, and the launchpad config
classes checked against the library's (particleseg_model.model.versions)."""

from __future__ import annotations

import inspect
import json
from dataclasses import fields
from pathlib import Path

import pytest
from helpers import BOX, TINY, disc_particles, write_partition

from particleseg_model.corpus.store import CorpusWriter, assign_split
from particleseg_model.model.registry import (
    ModelVersion,
    latest_model,
    list_models,
    register_model,
    staging_dir,
)
from particleseg_model.model.train import TrainConfig
from particleseg_model.model.versions import (
    evaluate_report,
    markdown_table,
    plan_training,
    train_and_register,
)

# TrainConfig fields that only the library sets (the launchpad keeps their defaults), and the
# launchpad's fields that are the training decision rather than the training
LIBRARY_ONLY = {"reduce_lr_patience", "flips", "rot90", "finetune_lr_factor"}
PLAN_ONLY = {"mode", "partitions", "holdout"}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    write_partition(root, "40001", 120, seed=1)
    write_partition(root, "40002", 120, seed=2)
    return root


def fake_version(models: Path, partitions: dict[str, int], arch: str = "custom", size: int = 32):
    """A registered version that only its manifest makes (enough for the decision)."""
    staged = staging_dir(models)
    (staged / "model.keras").write_bytes(b"not a network")
    manifest = {"arch": arch, "input_size": size, "partitions": partitions}
    return register_model(models, staged, manifest)


def test_auto_trains_from_scratch_without_a_latest_version(corpus: Path, tmp_path: Path) -> None:
    plan = plan_training(corpus, tmp_path / "models", holdout=["40002", "49999"], size=32)
    assert (plan.ids, plan.holdout, plan.new_ids) == (("40001",), ("40002",), ("40001",))
    assert not plan.incremental and plan.parent is None and plan.note is None


def test_auto_is_incremental_from_a_compatible_latest_with_new_partitions(
    corpus: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    parent = fake_version(models, {"40001": 90})
    plan = plan_training(corpus, models, size=32)
    assert plan.incremental and plan.new_ids == ("40002",)
    assert isinstance(plan.parent, ModelVersion) and plan.parent.version == parent.version
    # another size or architecture: from scratch, and "incremental" is refused
    for arch, size in (("custom", 64), ("vgg16", 32)):
        plan = plan_training(corpus, models, arch=arch, size=size)
        assert not plan.incremental and plan.parent is None
        with pytest.raises(ValueError, match="incremental training needs a latest model"):
            plan_training(corpus, models, mode="incremental", arch=arch, size=size)
    assert not plan_training(corpus, models, mode="full", size=32).incremental


def test_auto_retrains_from_scratch_when_no_partition_was_added(
    corpus: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    fake_version(models, {"40001": 90, "40002": 90})
    plan = plan_training(corpus, models, size=32)
    assert not plan.incremental and plan.new_ids == ()
    assert plan.note is not None and plan.note.startswith("no partition added since v0001")
    with pytest.raises(ValueError, match=r"incremental training needs .*new: \[\]"):
        plan_training(corpus, models, mode="incremental", size=32)


def test_the_decision_refuses_bad_input(corpus: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    with pytest.raises(ValueError, match=r"partitions \['49999'\] have no corpus under"):
        plan_training(corpus, models, partitions=["40001", "49999"])
    with pytest.raises(ValueError, match="no corpus partitions to train on"):
        plan_training(tmp_path / "empty", models)
    with pytest.raises(ValueError, match="no corpus partitions to train on"):
        plan_training(corpus, models, holdout=["40001", "40002"])
    with pytest.raises(ValueError, match="mode must be auto, incremental or full, got 'fast'"):
        plan_training(corpus, models, mode="fast")
    with pytest.raises(ValueError, match=r"incremental training needs .*latest: none"):
        plan_training(corpus, models, mode="incremental")
    names = [
        n for n in (f"{i}@s.mrcs" for i in range(1, 200)) if assign_split("40020", n) != "test"
    ]
    images, labels = disc_particles(40, seed=6)
    with CorpusWriter(corpus, "40020", BOX, attrs={"pixel_size_a": 2.0}) as writer:
        writer.append(images, labels, {"image_name": names[:40]})
    with pytest.raises(ValueError, match=r"partitions \['40020'\] have no test particles"):
        plan_training(corpus, models, partitions=["40001"], holdout=["40020"])


def test_markdown_table_takes_every_rows_columns() -> None:
    assert markdown_table([]) == "(no partitions)"
    table = markdown_table([{"a": 1}, {"a": 2, "b": True}])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 |  |", "| 2 | True |"]


def test_train_and_register_then_incrementally_then_a_report(corpus: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    config = TrainConfig(**{**TINY, "epochs": 2, "max_train_particles": 64})
    lines: list[str] = []
    first = train_and_register(
        corpus, models, config, holdout=["40002"], run_id="run-1", log=lines.append
    )
    assert first.version.version == "v0001" and latest_model(models).version == "v0001"
    assert list(first.manifest) == [
        "arch",
        "input_size",
        "channels",
        "parent",
        "mode",
        "partitions",
        "new_partitions",
        "holdout",
        "config",
        "epochs_run",
        "best_epoch",
        "seconds",
        "train_images_per_s",
        "distribute",
        "replicas",
        "history",
        "metrics",
        "calibration",
        "dagster_run_id",
        "format",
        "version",
        "created",
        "code_version",
    ]
    manifest = first.manifest
    assert (manifest["arch"], manifest["input_size"], manifest["mode"]) == ("custom", 32, "full")
    assert manifest["parent"] is None and manifest["holdout"] == ["40002"]
    assert manifest["partitions"].keys() == {"40001"} and manifest["dagster_run_id"] == "run-1"
    assert manifest["config"]["mode"] == "auto" and manifest["config"]["epochs"] == 2
    assert [(r["empiar_id"], r["seen_in_training"]) for r in first.rows] == [
        ("40001", True),
        ("40002", False),
    ]
    assert manifest["metrics"]["per_partition"] == first.rows
    assert manifest["metrics"]["mean_iou_seen"] == first.rows[0]["mean_iou"]
    on_disk = json.loads((first.version.path / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert first.curve_png == first.version.path / "training_curve.png"
    assert first.overlay_png is not None and first.overlay_png.stat().st_size > 100
    assert any(line.startswith("EMPIAR-40002: mean IoU") and "(unseen)" in line for line in lines)
    assert lines[-1].startswith("registered v0001 (full) in ")
    summary = first.summary()
    assert (summary["held_out"], summary["new_partitions"], summary["parent"]) == (
        "40002",
        "all",  # a full training learns every partition anew
        "none",
    )

    # the held-out partition joins: learnt incrementally from v0001, the parent's IoU beside
    second = train_and_register(corpus, models, config, log=lines.append)
    assert (second.version.version, second.manifest["parent"], second.result.mode) == (
        "v0002",
        "v0001",
        "incremental",
    )
    rows = {r["empiar_id"]: r for r in second.rows}
    assert "mean_iou_parent" in rows["40001"] and "mean_iou_parent" not in rows["40002"]
    assert second.manifest["partitions"].keys() == {"40001", "40002"}
    assert second.summary()["mean_iou_unseen"] == 0.0

    # a failure mid-way leaves the registry as it was and no staging folder
    with pytest.raises(ValueError, match="optimizer must be rmsprop or adam"):
        train_and_register(corpus, models, TrainConfig(**{**TINY, "optimizer": "sgd"}), mode="full")
    assert [v.version for v in list_models(models)] == ["v0001", "v0002"]
    assert not list(models.glob(".staging-*"))

    report = evaluate_report(second.version, corpus, "40002", tmp_path / "report")
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved == report.report and saved["model_version"] == "v0002"
    assert saved["seen_in_training"] is True and saved["split"] == "test"
    assert json.loads((tmp_path / "report" / "manifest.json").read_text()) == {
        "report": str(tmp_path / "report" / "report.json"),
        "overlay": str(tmp_path / "report" / "overlay.png"),
        "model_version": "v0002",
    }
    assert report.summary()["mean_iou"] == saved["mean_iou"]


def _changed(value):
    """A value other than ``value``, of its type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    return f"{value or ''}-changed"


def test_the_launchpad_model_config_matches_the_library_train_config() -> None:
    from particleseg_assets.assets.model import ModelConfig, _train_config

    launchpad = ModelConfig.model_fields
    library = {f.name: f.default for f in fields(TrainConfig)}
    # a new TrainConfig field goes on the launchpad, or in LIBRARY_ONLY on purpose
    assert set(library) - set(launchpad) == LIBRARY_ONLY
    assert set(launchpad) - set(library) == PLAN_ONLY
    for name in set(library) & set(launchpad):
        if name == "weights":  # the launchpad cannot say None: empty means none
            assert (launchpad[name].default, library[name]) == ("", None)
        else:
            assert launchpad[name].default == library[name], name
    # every shared field reaches the library
    values = {name: _changed(launchpad[name].default) for name in set(library) & set(launchpad)}
    config = _train_config(ModelConfig(**values))
    assert {name: getattr(config, name) for name in values} == values
    # the decision's fields are the library's keyword parameters, with the same defaults
    for function in (plan_training, train_and_register):
        parameters = inspect.signature(function).parameters
        for name in PLAN_ONLY:
            default = parameters[name].default
            assert (list(default) if isinstance(default, tuple) else default) == (
                launchpad[name].default
            ), (function.__name__, name)


def test_the_launchpad_clean_config_matches_the_library_cleaning() -> None:
    from particleseg_assets.assets.cleaning import CleanConfig
    from particleseg_model.cleaning.clean import DEFAULT_DROP, clean_star, clean_to_folder

    launchpad = CleanConfig.model_fields
    # the input, the folder's name, and the 2D classification the asset runs after cleaning
    forwarded = {f for f in launchpad if f not in ("star", "name") and not f.startswith("classify")}
    to_folder = inspect.signature(clean_to_folder).parameters
    star = inspect.signature(clean_star).parameters
    assert forwarded <= set(to_folder)
    for name in forwarded:  # an empty string on the launchpad means None
        default = launchpad[name].default
        assert (None if default == "" else default) == to_folder[name].default, name
    for name in forwarded - {"model_version"}:  # clean_to_folder resolves the version
        default = star[name].default
        if name == "drop":  # clean_star: None means the default fraction
            default = DEFAULT_DROP if default is None else default
        assert to_folder[name].default == default, name
