"""The segmentation model (trained on every ``particle_masks`` partition, versioned in the
registry under ``$PARTICLESEG_DATA/models``) and its per-dataset IoU reports."""

import json
import shutil
import time
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)

from particleseg_assets.assets.corpus import particle_masks, write_manifest
from particleseg_assets.partitions import empiar_partitions
from particleseg_assets.resources import StorageResource


class ModelConfig(Config):
    mode: str = "auto"
    """"auto": incremental from the latest version when partitions were added (same
    architecture and size), else from scratch; "incremental" or "full" to force one."""
    partitions: list[str] = []
    """Train on these partitions; empty: every partition in the corpus but the held-out ones."""
    holdout: list[str] = []
    """Partitions never trained on: evaluated as unseen datasets (an unseen map)."""
    arch: str = "custom"
    size: int = 64
    base_filters: int = 16
    weights: str = ""
    """Local ImageNet weights of a keras.applications encoder (empty: from scratch)."""
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-3
    batch_size: int = 16
    epochs: int = 30
    patience: int = 3
    seed: int = 0
    replay: float = 0.5
    max_train_particles: int = 0
    junk: str = "background"
    """Particles the corpus knows to be junk (simulated ground truth): "background" (kept with
    an all-background label), "drop" or "keep" (as labelled)."""
    distribute: str = "default"
    """tf.distribute strategy: "default" (none), "mirrored" (one replica per GPU of the node;
    ``batch_size`` is the global batch), "one_device", or "multi_worker" (TF_CONFIG names the
    hosts, each running the same training)."""


def _train_config(config: ModelConfig):
    """The library's TrainConfig from the launchpad fields of the same names (the rest keep
    the library's defaults); an empty ``weights`` means none."""
    from dataclasses import fields

    from particleseg_model.model.train import TrainConfig

    shared = {
        f.name: getattr(config, f.name)
        for f in fields(TrainConfig)
        if f.name in type(config).model_fields
    }
    return TrainConfig(**{**shared, "weights": config.weights or None})


def _score_row(evaluation, seen: bool, before: float | None = None) -> dict[str, Any]:
    scores = evaluation.scores
    row = {
        "empiar_id": evaluation.empiar_id,
        "seen_in_training": seen,
        "test_particles": evaluation.particles,
        "mean_iou": round(100 * scores["mean_iou"], 2),
        "iou_background": round(100 * scores["iou_background"], 2),
        "iou_signal": round(100 * scores["iou_signal"], 2),
        "iou_edge": round(100 * scores["iou_edge"], 2),
        "pixel_accuracy": round(100 * scores["pixel_accuracy"], 2),
    }
    if evaluation.scores_good is not None:
        row["good_test_particles"] = evaluation.good_particles
        row["mean_iou_good"] = round(100 * evaluation.scores_good["mean_iou"], 2)
    if before is not None:
        row["mean_iou_parent"] = round(100 * before, 2)
    return row


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no partitions)"
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# The training step's pod under the k8s_job_executor: one GPU (a run config's
# per_step_k8s_config can raise the count for a MirroredStrategy run), and the toleration of the
# taint GPU node pools usually carry. Other executors ignore the tag.
TRAIN_K8S_CONFIG: dict[str, Any] = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
    "pod_spec_config": {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    },
}


@asset(
    group_name="model",
    deps=[particle_masks],
    kinds={"keras", "tensorflow"},
    pool="train",
    op_tags={"dagster-k8s/config": TRAIN_K8S_CONFIG},
)
def segmentation_model(
    context: AssetExecutionContext, config: ModelConfig, storage: StorageResource
) -> MaterializeResult:
    """The particleSeg U-Net, trained on the train split of every corpus partition (early
    stopping on the validation split), registered as a new version in the model registry.
    Partitions added since the latest version are learnt incrementally (from the latest, with
    replay of the old partitions); the report says how the IoU on the old ones moved. A failed
    training never replaces the latest registered model."""
    from particleseg_model.corpus.store import list_corpus
    from particleseg_model.figures import segmentation_overlay, write_png
    from particleseg_model.model.calibration import mask_calibration
    from particleseg_model.model.registry import (
        latest_model,
        load_model,
        register_model,
        staging_dir,
    )
    from particleseg_model.model.train import (
        evaluate_partition,
        train_segmentation,
        training_curve_png,
    )

    # local paths or URLs (object storage); the staging folder is local either way
    corpus_root, models_root = storage.corpus_root(), storage.models_root()
    available = list_corpus(corpus_root)
    holdout = [h for h in config.holdout if h in available]
    ids = [p for p in (config.partitions or available) if p not in set(config.holdout)]
    missing = [p for p in ids if p not in available]
    if missing:
        raise ValueError(
            f"partitions {missing} have no corpus under {corpus_root}: "
            "materialize particle_masks for them first"
        )
    if not ids:
        raise ValueError(
            f"no corpus partitions to train on under {corpus_root} "
            f"(available: {available}, held out: {config.holdout})"
        )
    from particleseg_model.corpus.store import open_corpus

    no_test = [
        k for k in ids + holdout if not len(open_corpus(corpus_root, k).split_indices("test"))
    ]
    if no_test:
        raise ValueError(
            f"partitions {no_test} have no test particles: no IoU can be "
            "reported for them (add particles or hold the partition out)"
        )
    train_config = _train_config(config)
    latest = latest_model(models_root)
    compatible = (
        latest is not None
        and latest.manifest.get("arch") == config.arch
        and latest.input_size == config.size
    )
    new_ids = [i for i in ids if latest is None or i not in latest.partitions]
    if config.mode not in ("auto", "incremental", "full"):
        raise ValueError(f"mode must be auto, incremental or full, got {config.mode!r}")
    incremental = config.mode == "incremental" or (
        config.mode == "auto" and compatible and bool(new_ids) and len(new_ids) < len(ids)
    )
    if incremental and (latest is None or not compatible or not new_ids):
        raise ValueError(
            "incremental training needs a latest model of the same architecture "
            "and size and at least one new partition "
            f"(latest: {latest.version if latest else 'none'}, new: {new_ids})"
        )
    if config.mode == "auto" and latest is not None and compatible and not new_ids:
        context.log.info(
            f"no partition added since {latest.version}: retraining from scratch "
            "on the current corpus (mode 'full' does the same)"
        )
    staged = staging_dir(models_root)
    try:
        result = train_segmentation(
            corpus_root,
            ids,
            train_config,
            staged,
            parent=latest.model_path if incremental else None,
            new_ids=new_ids if incremental else None,
            log=context.log.info,
        )
        curve = training_curve_png(
            result.history,
            staged / "training_curve.png",
            f"{result.mode} training on {', '.join(ids)}",
        )
        model = _load_keras(result.model_path)
        parent_model = load_model(latest) if incremental else None
        rows, overlays = [], None
        for key in ids + holdout:
            evaluation = evaluate_partition(model, corpus_root, key)
            before = None
            if parent_model is not None and key in latest.partitions:
                before = evaluate_partition(parent_model, corpus_root, key, examples=0).mean_iou
            rows.append(_score_row(evaluation, key in ids, before))
            if overlays is None and evaluation.examples is not None:
                overlays = write_png(
                    staged / "test_overlay.png", segmentation_overlay(*evaluation.examples)
                )
            context.log.info(
                f"EMPIAR-{key}: mean IoU {rows[-1]['mean_iou']} on "
                f"{evaluation.particles} test particles" + (" (unseen)" if key not in ids else "")
            )
        seen = [r["mean_iou"] for r in rows if r["seen_in_training"]]
        unseen = [r["mean_iou"] for r in rows if not r["seen_in_training"]]
        metrics = {
            "mean_iou_seen": round(sum(seen) / len(seen), 2) if seen else None,
            "mean_iou_unseen": round(sum(unseen) / len(unseen), 2) if unseen else None,
            "per_partition": rows,
        }
        calibration = mask_calibration(model, corpus_root, ids)
        partitions = dict(latest.partitions) if incremental and latest else {}
        partitions.update(result.train_particles)
        manifest = {
            "arch": config.arch,
            "input_size": config.size,
            "channels": 1,
            "parent": latest.version if incremental and latest else None,
            "mode": result.mode,
            "partitions": partitions,
            "new_partitions": result.new_partitions,
            "holdout": holdout,
            "config": config.model_dump(),
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "seconds": round(result.seconds, 1),
            "train_images_per_s": round(result.images_per_s, 1),
            "distribute": result.strategy,
            "replicas": result.replicas,
            "history": result.history,
            "metrics": metrics,
            "calibration": calibration,
            "dagster_run_id": context.run.run_id,
        }
        version = register_model(models_root, staged, manifest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    from particleseg_model.figures import markdown_image

    context.log.info(f"registered {version.version} ({result.mode}) in {version.address}")
    metadata: dict[str, Any] = {
        "version": version.version,
        "parent": manifest["parent"] or "none",
        "mode": result.mode,
        "partitions": ", ".join(ids),
        "new_partitions": ", ".join(result.new_partitions) or "all",
        "held_out": ", ".join(holdout) or "none",
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "train_seconds": round(result.seconds, 1),
        "train_images_per_s": round(result.images_per_s, 1),
        "replicas": result.replicas,
        "mean_iou_seen": metrics["mean_iou_seen"] or 0.0,
        "mean_iou_unseen": metrics["mean_iou_unseen"] or 0.0,
        "iou_table": MetadataValue.md(_markdown_table(rows)),
        "model": MetadataValue.path(version.model_location),
        "training_curve": MetadataValue.md(
            markdown_image(version.fetch() / curve.name, "training curve")
        ),
    }
    if overlays is not None:
        metadata["test_overlay"] = MetadataValue.md(
            markdown_image(version.fetch() / overlays.name, "particle / true mask / predicted mask")
        )
    return MaterializeResult(metadata=metadata)


def _load_keras(path: Path):
    import keras

    return keras.models.load_model(path, compile=False)


@asset(
    partitions_def=empiar_partitions,
    group_name="model",
    deps=[segmentation_model, particle_masks],
    kinds={"keras", "json"},
)
def iou_reports(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
    """The latest model on this dataset's test split: the paper's mean IoU (one confusion
    matrix over every pixel, IoU per class, mean of the three), per-class IoU, pixel accuracy,
    whether the model saw the dataset in training, and particles beside their true and
    predicted masks."""
    from particleseg_model.figures import markdown_image, segmentation_overlay, write_png
    from particleseg_model.model.registry import latest_model, load_model
    from particleseg_model.model.train import evaluate_partition

    key = context.partition_key
    version = latest_model(storage.models_root())
    if version is None:
        raise FileNotFoundError(
            f"no model registered under {storage.models_root()}: "
            "materialize segmentation_model first"
        )
    started = time.perf_counter()
    evaluation = evaluate_partition(load_model(version), storage.corpus_root(), key)
    row = _score_row(evaluation, key in version.partitions)
    out = storage.path("iou_reports", key)
    overlay = write_png(out / "overlay.png", segmentation_overlay(*evaluation.examples))
    report = {
        **row,
        "model_version": version.version,
        "split": "test",
        "scores": evaluation.scores,
        "scores_good": evaluation.scores_good,
        "seconds": round(time.perf_counter() - started, 2),
    }
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "report.json")
    write_manifest(
        out,
        {
            "report": str(out / "report.json"),
            "overlay": str(overlay),
            "model_version": version.version,
        },
    )
    return MaterializeResult(
        metadata={
            "model_version": version.version,
            "seen_in_training": row["seen_in_training"],
            "test_particles": evaluation.particles,
            "mean_iou": row["mean_iou"],
            "iou_background": row["iou_background"],
            "iou_signal": row["iou_signal"],
            "iou_edge": row["iou_edge"],
            "pixel_accuracy": row["pixel_accuracy"],
            **({"mean_iou_good": row["mean_iou_good"]} if "mean_iou_good" in row else {}),
            "particles_per_s": round(evaluation.particles / max(evaluation.seconds, 1e-9), 1),
            "report": MetadataValue.path(str(out / "report.json")),
            "overlay": MetadataValue.md(markdown_image(overlay, "particle / true / predicted")),
        }
    )
