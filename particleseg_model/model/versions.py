"""Making a model version: the training decision, the training run and the manifest the
registry keeps; the IoU report of a registered version on one partition.

- :func:`plan_training` decides what to train on and how: every corpus partition but the
  held-out ones (or those named), incrementally from the latest version when it has the same
  architecture and input size and partitions were added since (``mode="auto"``), else from
  scratch.
- :func:`train_and_register` stages a version (:func:`~particleseg_model.model.registry.
  staging_dir`), trains it, draws the training curve, scores every partition's test split
  (the parent's IoU beside it for the old partitions of an incremental run), fits the mask
  calibration on the validation split and registers the version with its manifest
  (:func:`model_manifest`). A failure removes the staging folder: the latest version is never
  replaced by a half-made one.
- :func:`register_keras` registers a network trained elsewhere (calibrated the same way).
- :func:`evaluate_report` scores a registered version on one partition and writes
  ``report.json``, ``overlay.png`` and ``manifest.json`` in a folder.

IoU figures in the rows (:func:`score_row`) and in the manifest's ``metrics`` are percent,
rounded to 2 decimals (the paper's unit); :class:`~particleseg_model.model.train.Evaluation`
holds fractions.

The manifest of a trained version (``manifest.json``; the registry adds ``format``,
``version``, ``created`` and ``code_version``), in this key order::

    arch, input_size, channels   the network (channels: 1)
    edge_from_signal             only when True: prediction derives the edge from the predicted
                                 signal by the label rule (``predict_labels(edge_from_signal=)``;
                                 cleaning and segmenting follow it); absent means False
    parent                       the version an incremental run started from, else None
    mode                         "full" or "incremental"
    partitions                   training particles per partition, the parent's included
    new_partitions, holdout      the partitions learnt in this run; those never trained on
    config                       the settings as given (the launchpad's fields in the platform)
    epochs_run, best_epoch, seconds, train_images_per_s, distribute, replicas, history
    metrics                      mean_iou_seen, mean_iou_unseen (None without such partitions)
                                 and per_partition (the rows of :func:`score_row`)
    calibration                  :func:`~particleseg_model.model.calibration.mask_calibration`
    dagster_run_id               the run that trained it (None outside Dagster)

Keras and TensorFlow are imported inside the functions.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from particleseg_model.model.registry import ModelVersion
from particleseg_model.model.train import Evaluation, TrainConfig, TrainResult

Log = Callable[[str], None]

MODES = ("auto", "incremental", "full", "pretrained")


@dataclass(frozen=True)
class TrainingPlan:
    """What one training run does (decided by :func:`plan_training`)."""

    ids: tuple[str, ...]
    """The partitions trained on (and evaluated as seen)."""
    holdout: tuple[str, ...]
    """The held-out partitions that have a corpus (evaluated as unseen, never trained on)."""
    new_ids: tuple[str, ...]
    """The partitions of ``ids`` that the latest version did not train on (all of ``ids``
    without a latest version)."""
    incremental: bool
    """Whether training starts from ``parent`` on ``new_ids``, with replay of the others."""
    parent: ModelVersion | None
    """The version an incremental run starts from; None for a full one."""
    note: str | None = None
    """A line for the log when ``mode="auto"`` retrains from scratch for want of a new
    partition."""


@dataclass(frozen=True)
class TrainingOutcome:
    """What :func:`train_and_register` registered and measured."""

    version: ModelVersion
    plan: TrainingPlan
    result: TrainResult
    rows: list[dict[str, Any]]
    """One :func:`score_row` per partition: the trained ones, then the held-out ones."""
    metrics: dict[str, Any]
    """The manifest's ``metrics`` (percent)."""
    curve_png: Path
    """The training curve in the version's local folder."""
    overlay_png: Path | None
    """Test particles beside their true and predicted masks (the first partition with
    examples), in the version's local folder; None when no evaluation kept examples."""

    @property
    def manifest(self) -> dict[str, Any]:
        return self.version.manifest

    def summary(self) -> dict[str, Any]:
        """The run in plain values (what the platform shows as the asset's metadata): lists
        joined by ", " (``"all"`` for no new partition, ``"none"`` for no parent or no
        held-out partition), seconds and images/s to 1 decimal, mean IoU in percent (0.0
        where there was no such partition)."""
        result = self.result
        return {
            "version": self.version.version,
            "parent": self.manifest["parent"] or "none",
            "mode": result.mode,
            "partitions": ", ".join(self.plan.ids),
            "new_partitions": ", ".join(result.new_partitions) or "all",
            "held_out": ", ".join(self.plan.holdout) or "none",
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "train_seconds": round(result.seconds, 1),
            "train_images_per_s": round(result.images_per_s, 1),
            "replicas": result.replicas,
            "mean_iou_seen": self.metrics["mean_iou_seen"] or 0.0,
            "mean_iou_unseen": self.metrics["mean_iou_unseen"] or 0.0,
        }


@dataclass(frozen=True)
class IouReport:
    """What :func:`evaluate_report` measured and wrote."""

    version: ModelVersion
    evaluation: Evaluation
    row: dict[str, Any]
    """:func:`score_row` of the partition (percent)."""
    report: dict[str, Any]
    """The content of ``report.json``."""
    report_path: Path
    overlay_path: Path

    def summary(self) -> dict[str, Any]:
        """The report in plain values (what the platform shows as the asset's metadata):
        the version, the :func:`score_row` fields but the good-particle count (the negatives'
        count and the share predicted all background where the partition has negatives), and
        the evaluation's particles per second (1 decimal)."""
        row, evaluation = self.row, self.evaluation
        scores = ("mean_iou", "iou_background", "iou_signal", "iou_edge", "pixel_accuracy")
        return {
            "model_version": self.version.version,
            "seen_in_training": row["seen_in_training"],
            "test_particles": evaluation.particles,
            **{name: row[name] for name in scores},
            **({"mean_iou_good": row["mean_iou_good"]} if "mean_iou_good" in row else {}),
            **{k: row[k] for k in ("test_negatives", "negatives_all_background") if k in row},
            "particles_per_s": round(evaluation.particles / max(evaluation.seconds, 1e-9), 1),
        }


def train_config(values: dict[str, Any]) -> TrainConfig:
    """The :class:`~particleseg_model.model.train.TrainConfig` from the settings of the same
    names in ``values`` (others are ignored; missing fields keep the library's defaults); an
    empty ``weights`` means none.

    Parameters
    ----------
    values
        Settings by name, e.g. the Dagster launchpad's ``ModelConfig.model_dump()``.

    Returns
    -------
    TrainConfig
        Not checked yet (:meth:`TrainConfig.check` runs when training starts).
    """
    shared = {f.name: values[f.name] for f in fields(TrainConfig) if f.name in values}
    return TrainConfig(**{**shared, "weights": values.get("weights") or None})


def plan_training(
    corpus_root: str | os.PathLike,
    models_root: str | os.PathLike,
    *,
    partitions: Sequence[str] = (),
    holdout: Sequence[str] = (),
    mode: str = "auto",
    arch: str = "custom",
    size: int = 64,
) -> TrainingPlan:
    """Decide which partitions to train on and whether incrementally.

    Parameters
    ----------
    corpus_root, models_root
        The Zarr corpus and the model registry (local paths or URLs).
    partitions
        Train on these; empty: every partition of the corpus but the held-out ones.
    holdout
        Partitions never trained on (those without a corpus are ignored).
    mode
        ``"auto"``: incremental from the latest version when it has architecture ``arch`` and
        input size ``size`` (pixels) and some, not all, of the partitions are new to it, else
        from scratch; ``"incremental"`` or ``"full"`` force one; ``"pretrained"``: fine-tune
        the model shipped in the package (:mod:`particleseg_model.model.pretrained`) on every
        partition (``arch`` and ``size`` must be its own).
    arch, size
        The network to train (``TrainConfig.arch``, ``TrainConfig.size``).

    Returns
    -------
    TrainingPlan

    Raises
    ------
    ValueError
        A partition without a corpus; nothing to train on; a partition (trained or held out)
        without test particles; an unknown ``mode``; ``"incremental"`` without a compatible
        latest version or without a new partition.
    """
    from particleseg_model.corpus.store import list_corpus, open_corpus
    from particleseg_model.model.registry import latest_model

    available = list_corpus(corpus_root)
    held = [h for h in holdout if h in available]
    ids = [p for p in (partitions or available) if p not in set(holdout)]
    missing = [p for p in ids if p not in available]
    if missing:
        raise ValueError(
            f"partitions {missing} have no corpus under {corpus_root}: "
            "materialize particle_masks for them first"
        )
    if not ids:
        raise ValueError(
            f"no corpus partitions to train on under {corpus_root} "
            f"(available: {available}, held out: {list(holdout)})"
        )
    no_test = [k for k in ids + held if not len(open_corpus(corpus_root, k).split_indices("test"))]
    if no_test:
        raise ValueError(
            f"partitions {no_test} have no test particles: no IoU can be "
            "reported for them (add particles or hold the partition out)"
        )
    if mode == "pretrained":
        from particleseg_model.model.registry import pretrained_model

        shipped = pretrained_model()
        if shipped.manifest.get("arch") != arch or shipped.input_size != size:
            raise ValueError(
                f"mode 'pretrained' trains the shipped {shipped.manifest.get('arch')} network at "
                f"{shipped.input_size} px; set arch and size to those (got {arch}, {size})"
            )
        return TrainingPlan(tuple(ids), tuple(held), tuple(ids), True, shipped, None)
    latest = latest_model(models_root)
    compatible = (
        latest is not None and latest.manifest.get("arch") == arch and latest.input_size == size
    )
    new_ids = [i for i in ids if latest is None or i not in latest.partitions]
    if mode not in MODES:
        raise ValueError(f"mode must be auto, incremental or full, got {mode!r}")
    incremental = mode == "incremental" or (
        mode == "auto" and compatible and bool(new_ids) and len(new_ids) < len(ids)
    )
    if incremental and (latest is None or not compatible or not new_ids):
        raise ValueError(
            "incremental training needs a latest model of the same architecture "
            "and size and at least one new partition "
            f"(latest: {latest.version if latest else 'none'}, new: {new_ids})"
        )
    note = None
    if mode == "auto" and latest is not None and compatible and not new_ids:
        note = (
            f"no partition added since {latest.version}: retraining from scratch "
            "on the current corpus (mode 'full' does the same)"
        )
    return TrainingPlan(
        tuple(ids),
        tuple(held),
        tuple(new_ids),
        incremental,
        latest if incremental else None,
        note,
    )


def score_row(evaluation: Evaluation, seen: bool, before: float | None = None) -> dict[str, Any]:
    """One partition's scores as a table row, in percent (2 decimals).

    Parameters
    ----------
    evaluation
        :func:`~particleseg_model.model.train.evaluate_partition` of the test split.
    seen
        Whether the model trained on the partition (``seen_in_training``).
    before
        The parent version's mean IoU on it (a fraction), for an incremental run; adds
        ``mean_iou_parent``.

    Returns
    -------
    dict
        ``empiar_id, seen_in_training, test_particles, mean_iou, iou_background, iou_signal,
        iou_edge, pixel_accuracy`` (over the particles only), then ``good_test_particles,
        mean_iou_good`` where the corpus knows the good particles, then ``test_negatives,
        negatives_all_background`` (the share of the negatives predicted all background)
        where the partition has negatives, then ``mean_iou_parent``.
    """
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
    if evaluation.negatives_all_background is not None:
        row["test_negatives"] = evaluation.negatives
        row["negatives_all_background"] = round(100 * evaluation.negatives_all_background, 2)
    if before is not None:
        row["mean_iou_parent"] = round(100 * before, 2)
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """``rows`` as a Markdown table: the columns of every row in order of first appearance, an
    empty cell where a row lacks one; ``"(no partitions)"`` for no row."""
    if not rows:
        return "(no partitions)"
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def iou_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``metrics``: the mean of ``mean_iou`` (percent, 2 decimals) over the
    seen and over the unseen partitions (None where there are none), and the rows."""
    seen = [r["mean_iou"] for r in rows if r["seen_in_training"]]
    unseen = [r["mean_iou"] for r in rows if not r["seen_in_training"]]
    return {
        "mean_iou_seen": round(sum(seen) / len(seen), 2) if seen else None,
        "mean_iou_unseen": round(sum(unseen) / len(unseen), 2) if unseen else None,
        "per_partition": rows,
    }


def model_manifest(
    plan: TrainingPlan,
    config: TrainConfig,
    result: TrainResult,
    *,
    metrics: dict[str, Any],
    calibration: dict[str, Any] | None,
    settings: dict[str, Any],
    run_id: str | None = None,
    edge_from_signal: bool = False,
) -> dict[str, Any]:
    """The manifest of a trained version (the keys of the module docstring, in that order)
    for :func:`~particleseg_model.model.registry.register_model`.

    Parameters
    ----------
    plan, config, result
        The decision, the training settings and what the training produced.
    metrics
        :func:`iou_metrics` of the evaluation rows.
    calibration
        :func:`~particleseg_model.model.calibration.mask_calibration` of the trained network.
    settings
        Recorded as ``config`` as given (JSON-serialisable).
    edge_from_signal
        Recorded as ``edge_from_signal: true`` after ``channels`` when True (omitted when
        False, so older manifests read the same).
    run_id
        Recorded as ``dagster_run_id``.

    Returns
    -------
    dict
    """
    parent = plan.parent if plan.incremental else None
    partitions = dict(parent.partitions) if parent is not None else {}
    partitions.update(result.train_particles)
    manifest: dict[str, Any] = {
        "arch": config.arch,
        "input_size": config.size,
        "channels": 1,
        **({"edge_from_signal": True} if edge_from_signal else {}),
        "parent": parent.version if parent is not None else None,
        "mode": result.mode,
        "partitions": partitions,
        "new_partitions": result.new_partitions,
        "holdout": list(plan.holdout),
        "config": settings,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 1),
        "train_images_per_s": round(result.images_per_s, 1),
        "distribute": result.strategy,
        "replicas": result.replicas,
        "history": result.history,
        "metrics": metrics,
        "calibration": calibration,
        "dagster_run_id": run_id,
    }
    return manifest


def train_and_register(
    corpus_root: str | os.PathLike,
    models_root: str | os.PathLike,
    config: TrainConfig,
    *,
    partitions: Sequence[str] = (),
    holdout: Sequence[str] = (),
    mode: str = "auto",
    settings: dict[str, Any] | None = None,
    run_id: str | None = None,
    edge_from_signal: bool = False,
    log: Log = print,
) -> TrainingOutcome:
    """Plan, train, evaluate, calibrate and register a new model version.

    Parameters
    ----------
    corpus_root, models_root
        The Zarr corpus and the model registry (local paths or URLs; the staging folder is
        local either way).
    config
        The training settings; ``config.arch`` and ``config.size`` also decide whether the
        latest version can be trained on incrementally.
    partitions, holdout, mode
        As :func:`plan_training`.
    settings
        Recorded as the manifest's ``config``; default: ``mode``, ``partitions``, ``holdout``
        and the fields of ``config``.
    run_id
        Recorded as the manifest's ``dagster_run_id``.
    edge_from_signal
        Record that this model's edge is derived from its predicted signal at prediction
        (:func:`model_manifest`) and evaluate and calibrate it so; training is the same (the
        edge class still teaches the outline). A model trained from a parent that derives its
        edge (the shipped model, mode ``"pretrained"``) always does.
    log
        Receives the progress lines (one per epoch, one per evaluated partition).

    Returns
    -------
    TrainingOutcome

    Raises
    ------
    ValueError
        As :func:`plan_training`, or a bad ``config`` (:meth:`TrainConfig.check`).
    """
    from particleseg_model.figures import segmentation_overlay, write_png
    from particleseg_model.model.calibration import mask_calibration
    from particleseg_model.model.registry import load_model, register_model, staging_dir
    from particleseg_model.model.train import (
        evaluate_partition,
        train_segmentation,
        training_curve_png,
    )

    plan = plan_training(
        corpus_root,
        models_root,
        partitions=partitions,
        holdout=holdout,
        mode=mode,
        arch=config.arch,
        size=config.size,
    )
    if plan.note:
        log(plan.note)
    if settings is None:
        settings = {
            "mode": mode,
            "partitions": list(partitions),
            "holdout": list(holdout),
            **asdict(config),
        }
    ids, parent = list(plan.ids), plan.parent
    # a fine-tuned model predicts as its parent did (the shipped model derives its edge)
    edge_from_signal = edge_from_signal or bool(
        parent is not None and parent.manifest.get("edge_from_signal")
    )
    staged = staging_dir(models_root)
    try:
        result = train_segmentation(
            corpus_root,
            ids,
            config,
            staged,
            parent=parent.model_path if parent is not None else None,
            new_ids=list(plan.new_ids) if plan.incremental else None,
            log=log,
        )
        curve = training_curve_png(
            result.history,
            staged / "training_curve.png",
            f"{result.mode} training on {', '.join(ids)}",
        )
        model = _load_keras(result.model_path)
        parent_model = load_model(parent) if parent is not None else None
        rows, overlay = [], None
        for key in ids + list(plan.holdout):
            evaluation = evaluate_partition(
                model, corpus_root, key, edge_from_signal=edge_from_signal
            )
            before = None
            if parent is not None and key in parent.partitions:
                before = evaluate_partition(
                    parent_model, corpus_root, key, examples=0, edge_from_signal=edge_from_signal
                ).mean_iou
            rows.append(score_row(evaluation, key in ids, before))
            if overlay is None and evaluation.examples is not None:
                overlay = write_png(
                    staged / "test_overlay.png", segmentation_overlay(*evaluation.examples)
                )
            log(
                f"EMPIAR-{key}: mean IoU {rows[-1]['mean_iou']} on "
                f"{evaluation.particles} test particles" + (" (unseen)" if key not in ids else "")
            )
        metrics = iou_metrics(rows)
        calibration = mask_calibration(
            model, corpus_root, ids, edge_from_signal=edge_from_signal
        )
        manifest = model_manifest(
            plan,
            config,
            result,
            metrics=metrics,
            calibration=calibration,
            settings=settings,
            run_id=run_id,
            edge_from_signal=edge_from_signal,
        )
        version = register_model(models_root, staged, manifest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    log(f"registered {version.version} ({result.mode}) in {version.address}")
    return TrainingOutcome(
        version,
        plan,
        result,
        rows,
        metrics,
        version.fetch() / curve.name,
        version.fetch() / overlay.name if overlay is not None else None,
    )


def register_keras(
    models_root: str | os.PathLike,
    keras_file: str | os.PathLike,
    *,
    corpus_root: str | os.PathLike | None = None,
    arch: str = "custom",
    edge_from_signal: bool = False,
) -> ModelVersion:
    """Register a ``.keras`` network trained elsewhere as the next version (the latest).

    Its manifest: ``input_size`` (the network's input, pixels), ``arch``, ``partitions``
    (empty: unknown), ``source`` (the file) and, with ``corpus_root``, the ``calibration``
    fitted on the validation split of every partition there, as :func:`train_and_register`
    fits it. The staging folder is removed on any failure.

    Parameters
    ----------
    models_root
        The model registry (a local path or a URL).
    keras_file
        The network (copied; never modified).
    corpus_root
        The corpus it was trained on, for the calibration; None: no calibration (the
        ``calibrated`` cleaning score is then unavailable).
    arch
        Recorded as the manifest's ``arch``.
    edge_from_signal
        Recorded as the manifest's ``edge_from_signal: true`` when True (else omitted).

    Returns
    -------
    ModelVersion
    """
    from particleseg_model.corpus.store import list_corpus
    from particleseg_model.model.calibration import mask_calibration
    from particleseg_model.model.registry import MODEL_FILE, register_model, staging_dir

    model = _load_keras(Path(keras_file))
    manifest: dict[str, Any] = {
        "input_size": int(model.input_shape[1]),
        "arch": arch,
        **({"edge_from_signal": True} if edge_from_signal else {}),
        "partitions": {},
        "source": str(keras_file),
    }
    if corpus_root is not None:
        manifest["calibration"] = mask_calibration(model, corpus_root, list_corpus(corpus_root))
    staged = staging_dir(models_root)
    try:
        shutil.copy(keras_file, staged / MODEL_FILE)
        return register_model(models_root, staged, manifest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _load_keras(path: Path) -> Any:
    import keras

    return keras.models.load_model(path, compile=False)


def evaluate_report(
    version: ModelVersion,
    corpus_root: str | os.PathLike,
    key: str,
    out_dir: str | os.PathLike,
) -> IouReport:
    """Score a registered version on the test split of one partition and write the report.

    Writes, in ``out_dir`` (replacing them atomically): ``overlay.png`` (test particles beside
    their true and predicted masks), ``report.json`` (the :func:`score_row` fields, then
    ``model_version``, ``split``, ``scores`` and ``scores_good`` as fractions, ``seconds``
    of loading and evaluating) and ``manifest.json`` (the two files' paths and the version).

    Parameters
    ----------
    version
        The registered version (its network is loaded, downloaded first if remote).
    corpus_root
        The Zarr corpus (a local path or a URL).
    key
        The partition (EMPIAR id).
    out_dir
        The report's local folder (created).

    Returns
    -------
    IouReport

    Raises
    ------
    ValueError
        The partition has no test particles.
    """
    from particleseg_model.atomic import atomic_write_json
    from particleseg_model.figures import segmentation_overlay, write_png
    from particleseg_model.model.registry import load_model
    from particleseg_model.model.train import evaluate_partition

    out = Path(out_dir)
    started = time.perf_counter()
    evaluation = evaluate_partition(
        load_model(version),
        corpus_root,
        key,
        edge_from_signal=bool(version.manifest.get("edge_from_signal")),  # as it predicts
    )
    row = score_row(evaluation, key in version.partitions)
    assert evaluation.examples is not None  # evaluate_partition keeps the first 8 by default
    overlay = write_png(out / "overlay.png", segmentation_overlay(*evaluation.examples))
    report = {
        **row,
        "model_version": version.version,
        "split": "test",
        "scores": evaluation.scores,
        "scores_good": evaluation.scores_good,
        "seconds": round(time.perf_counter() - started, 2),
    }
    report_path = atomic_write_json(out / "report.json", report)
    atomic_write_json(
        out / "manifest.json",
        {"report": str(report_path), "overlay": str(overlay), "model_version": version.version},
    )
    return IouReport(version, evaluation, row, report, report_path, overlay)
