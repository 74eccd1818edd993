"""Training, prediction and evaluation of the segmentation model on the Zarr corpus.

- :func:`train_segmentation` trains from scratch on the train split of some partitions, or
  incrementally from a parent model on new partitions with replay of the old ones; early
  stopping on the validation loss of *all* partitions (so forgetting the old ones shows there);
  sparse categorical crossentropy, rmsprop or adam, a fixed seed.
- :func:`predict_labels` segments particle images of any box: resized to the model's input
  (area averaging when shrinking), softmax resized back to the box (bilinear), argmax. Codes
  0 background, 1 signal, 2 edge.
- ``TrainConfig.distribute`` trains under a ``tf.distribute`` strategy (MirroredStrategy over
  the GPUs of one node, MultiWorkerMirroredStrategy over the hosts of ``TF_CONFIG``); the
  configured batch stays the global batch.
- :func:`evaluate_partition` computes the paper's mean IoU (one confusion matrix over every
  pixel of a split, IoU per class, mean of the three) at the particles' own box, over all
  particles of the split and, where a simulation left ground truth, over the good ones; a
  partition's negatives (all-background boxes, ``negative`` in its table) are scored apart,
  as the share predicted all background.

Keras and TensorFlow are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from particleseg_model.atomic import atomic_path
from particleseg_model.corpus.store import CorpusDataset, open_corpus
from particleseg_model.model.loader import CorpusBatches, known_good
from particleseg_model.model.metrics import ConfusionAccumulator
from particleseg_model.model.predict import predict_labels

Log = Callable[[str], None]

DISTRIBUTE = ("default", "mirrored", "multi_worker", "one_device")


@dataclass
class TrainConfig:
    """How to train. ``size`` is the model input in pixels (the paper: 256); every particle
    is resized to it whatever its box."""

    arch: str = "custom"
    size: int = 64
    base_filters: int = 16
    weights: str | None = None
    """Local ImageNet weights for a keras.applications encoder (never downloaded)."""
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-3
    batch_size: int = 16
    epochs: int = 30
    patience: int = 3
    """Early stopping: epochs without a lower validation loss before stopping (the paper: 3)."""
    reduce_lr_patience: int = 2
    """Halve the learning rate after this many epochs without improvement (0: never)."""
    seed: int = 0
    flips: bool = True
    rot90: bool = True
    replay: float = 0.5
    """Incremental training: old-partition particles per new one in every batch."""
    max_train_particles: int = 0
    """Use at most this many train particles per epoch (0: all); for quick runs."""
    finetune_lr_factor: float = 0.1
    """Incremental training: learning rate times this (a fresh optimizer at the full rate
    would first undo much of what the parent learnt)."""
    junk: str = "background"
    """Particles a partition knows to be junk (a simulation's ``is_good`` False), whose label
    is the mask of a pose that is not in the image: "background" (kept with an all-background
    label: the model learns that no particle is there, which is what makes the paper's ETS
    rule find junk), "drop" (train and stop early on the good ones only), or "keep" (as
    labelled). Real corpora have no ``is_good``: every particle is kept as labelled."""
    distribute: str = "default"
    """The ``tf.distribute`` strategy: "default" (none: TensorFlow places the model itself, one
    GPU at most), "mirrored" (MirroredStrategy: one replica per visible GPU, or per logical CPU
    device on a host without GPU), "multi_worker" (MultiWorkerMirroredStrategy over the hosts
    named in ``TF_CONFIG``; every host runs the same training) or "one_device" (the first GPU,
    else the CPU). ``batch_size`` stays the global batch, split among the replicas."""

    def check(self) -> None:
        if self.optimizer not in ("rmsprop", "adam"):
            raise ValueError(f"optimizer must be rmsprop or adam, got {self.optimizer!r}")
        if self.size < 16 or self.batch_size < 1 or self.epochs < 1 or self.patience < 0:
            raise ValueError(f"bad training config: {asdict(self)}")
        if self.junk not in ("drop", "background", "keep"):
            raise ValueError(f"junk must be drop, background or keep, got {self.junk!r}")
        if not 0 <= self.replay <= 4:
            raise ValueError(f"replay must be in [0, 4], got {self.replay}")
        if self.distribute not in DISTRIBUTE:
            raise ValueError(
                f"distribute must be one of {', '.join(DISTRIBUTE)}, got {self.distribute!r}"
            )
        if self.distribute == "multi_worker" and not os.environ.get("TF_CONFIG"):
            raise ValueError(
                'distribute "multi_worker" needs TF_CONFIG in the environment '
                "(the cluster's workers and this task's type and index)"
            )


@dataclass
class TrainResult:
    """What a training produced (in ``out_dir``) and how it went."""

    model_path: Path
    history: dict[str, list[float]]
    epochs_run: int
    best_epoch: int
    seconds: float
    train_particles: dict[str, int]
    images_seen: int
    mode: str
    new_partitions: list[str] = field(default_factory=list)
    strategy: str = "default"
    """The ``TrainConfig.distribute`` it ran under."""
    replicas: int = 1
    """Model replicas that shared each global batch (1 without a strategy)."""

    @property
    def images_per_s(self) -> float:
        return self.images_seen / max(self.seconds, 1e-9)


def _open(root: str | os.PathLike, ids: Sequence[str]) -> list[CorpusDataset]:
    if not ids:
        raise ValueError(f"no corpus partitions to train on under {root}")
    return [open_corpus(root, i) for i in ids]


def _used(dataset: CorpusDataset, split: str, config: TrainConfig) -> int:
    """Particles of ``split`` that training uses (the good ones with ``junk="drop"``)."""
    rows = dataset.split_indices(split)
    return int(known_good(dataset, rows).sum()) if config.junk == "drop" else int(len(rows))


def _batches(
    datasets: list[CorpusDataset],
    split: str,
    config: TrainConfig,
    batch_size: int,
    train: bool,
    seed_offset: int = 0,
) -> CorpusBatches:
    return CorpusBatches(
        datasets,
        split=split,
        batch_size=batch_size,
        size=config.size,
        shuffle=train,
        seed=config.seed + seed_offset,
        flips=train and config.flips,
        rot90=train and config.rot90,
        good_only=config.junk == "drop",
        junk_background=config.junk == "background",
    )


def make_strategy(name: str) -> Any | None:
    """The ``tf.distribute`` strategy of ``TrainConfig.distribute`` ``name`` (None for
    "default"). Build it before any other TensorFlow work of the process: a multi-worker
    strategy must be set up before the runtime starts its collectives."""
    import tensorflow as tf

    if name == "default":
        return None
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if name == "mirrored":
        # without GPUs, MirroredStrategy would take CPU:0 only; the logical CPU devices (one
        # unless the process split its CPU) are what this host offers instead
        return tf.distribute.MirroredStrategy(
            devices=gpus or [d.name for d in tf.config.list_logical_devices("CPU")]
        )
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else "/cpu:0")
    raise ValueError(f"distribute must be one of {', '.join(DISTRIBUTE)}, got {name!r}")


def _output_dir(out_dir: str | os.PathLike) -> Path:
    """Where this process saves: ``out_dir`` on a single host and for the chief of a
    multi-worker training (the "chief" task, or worker 0 of a cluster without one, in
    ``TF_CONFIG``); ``out_dir/<type>-<index>`` for the other workers, which must save too (the
    runtime expects every worker to) but leave the result alone."""
    spec = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = spec.get("task") or {}
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    has_chief = "chief" in spec.get("cluster", {})
    chief = kind == "chief" if has_chief else (kind, index) == ("worker", 0)
    return Path(out_dir) if not task or chief else Path(out_dir) / f"{kind}-{index}"


def _train_dataset(
    new: CorpusBatches, old: CorpusBatches | None, limit_steps: int, multiple: int = 1
):
    """A PyDataset of the new partitions' batches, each topped up with a replay batch of the
    old ones (cycled) when ``old`` is given. With ``multiple`` > 1 (the replicas of a
    strategy) a batch whose size is no multiple of it is filled up by repeating its first
    particles: TensorFlow's all-reduce fails when replicas get unequal shares, and this
    touches only an epoch's last, short batch."""
    import keras

    class Mixed(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = 0

        def __len__(self) -> int:
            return min(len(new), limit_steps) if limit_steps else len(new)

        def __getitem__(self, i: int):
            x, y = new[i]
            if old is not None:
                k = (self.epoch * len(self) + i) % len(old)
                x_old, y_old = old[k]
                x, y = np.concatenate([x, x_old]), np.concatenate([y, y_old])
            if multiple > 1 and len(x) % multiple:
                keep = np.arange(-(-len(x) // multiple) * multiple) % len(x)
                x, y = x[keep], y[keep]
            # own, contiguous copies: at the stored box the loader hands out views of its
            # decoded-chunk cache, and TensorFlow aliasing those crashed (double free)
            return np.array(x, dtype=np.float32, order="C"), np.array(y, order="C")

        def on_epoch_end(self) -> None:
            self.epoch += 1
            new.on_epoch_end()
            if old is not None and (self.epoch * len(self)) % len(old) < len(self):
                old.on_epoch_end()

    return Mixed()


class _EpochLog:
    """Keras callback factory: one log line per epoch with the rate (built lazily)."""

    @staticmethod
    def make(log: Log, n_images_per_epoch: int):
        import keras

        class EpochLog(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                seconds = time.perf_counter() - self.started
                shown = ", ".join(
                    f"{k} {v:.4f}"
                    for k, v in sorted((logs or {}).items())
                    if k in ("loss", "val_loss", "accuracy", "val_accuracy")
                )
                log(
                    f"epoch {epoch + 1}: {shown} ({n_images_per_epoch / seconds:.1f} images/s, "
                    f"{seconds:.0f} s)"
                )

        return EpochLog()


def train_segmentation(
    corpus_root: str | os.PathLike,
    ids: Sequence[str],
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    parent: str | os.PathLike | None = None,
    new_ids: Sequence[str] | None = None,
    log: Log = print,
) -> TrainResult:
    """Train on the partitions ``ids`` and save ``out_dir/model.keras`` (plus
    ``history.csv``). With ``parent`` (a ``.keras`` file) and ``new_ids``, training starts
    from the parent and each batch mixes ``batch_size`` particles of the new partitions with
    ``replay * batch_size`` of the others; without, from scratch on all of ``ids``."""
    import keras

    from particleseg_model.model.unet import build_unet

    config.check()
    strategy = make_strategy(config.distribute)
    out = _output_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets = _open(corpus_root, ids)
    by_id = {d.empiar_id: d for d in datasets}
    incremental = parent is not None and bool(new_ids)
    keras.utils.set_random_seed(config.seed)
    if incremental:
        assert new_ids is not None  # incremental implies new_ids (narrows the Optional)
        unknown = [i for i in new_ids if i not in by_id]
        if unknown:
            raise ValueError(f"new partitions {unknown} are not among the training ids")
        fresh = [by_id[i] for i in new_ids]
        older = [d for d in datasets if d.empiar_id not in set(new_ids)]
        new_batches = _batches(fresh, "train", config, config.batch_size, True)
        n_replay = (
            max(1, round(config.replay * config.batch_size)) if older and config.replay > 0 else 0
        )
        old_batches = _batches(older, "train", config, n_replay, True, 1) if n_replay else None
    else:
        new_batches = _batches(datasets, "train", config, config.batch_size, True)
        old_batches, n_replay = None, 0
    limit = config.max_train_particles // config.batch_size if config.max_train_particles else 0
    val_sets = [d for d in datasets if _used(d, "val", config)]
    if not val_sets:
        raise ValueError(f"no validation particles in {list(ids)}: cannot stop early")
    rate = config.learning_rate * (config.finetune_lr_factor if incremental else 1.0)
    # variables made inside the scope are mirrored on every replica (and the optimizer's with
    # them); outside a strategy the scope is a no-op
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        if incremental:
            # load_model is typed as returning an optional object; a .keras file is a Model
            model = cast("keras.Model", keras.models.load_model(parent, compile=False))
            if tuple(model.input_shape[1:3]) != (config.size, config.size):
                raise ValueError(
                    f"{parent}: input {model.input_shape[1:3]} but the config "
                    f"asks for {config.size}x{config.size}"
                )
        else:
            model = build_unet(
                config.arch,
                size=config.size,
                base_filters=config.base_filters,
                weights=config.weights,
                seed=config.seed,
            )
        optimizer = (
            keras.optimizers.RMSprop if config.optimizer == "rmsprop" else keras.optimizers.Adam
        )(learning_rate=rate)
        model.compile(
            optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
    # the strategy the model was built under (Keras keeps it): what fit() will distribute over
    replicas = int(model.distribute_strategy.num_replicas_in_sync)
    train = _train_dataset(new_batches, old_batches, limit, replicas)
    val = _train_dataset(_batches(val_sets, "val", config, 64, False), None, 0, replicas)
    per_epoch = len(train) * (config.batch_size + n_replay)
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.patience, restore_best_weights=True
        ),
        keras.callbacks.ModelCheckpoint(
            str(out / "checkpoint.keras"), monitor="val_loss", save_best_only=True
        ),
        keras.callbacks.CSVLogger(str(out / "history.csv")),
        *(
            [
                keras.callbacks.ReduceLROnPlateau(
                    monitor="val_loss", factor=0.5, patience=config.reduce_lr_patience, min_lr=1e-5
                )
            ]
            if config.reduce_lr_patience
            else []
        ),
        _EpochLog.make(log, per_epoch),
    ]
    mode = "incremental" if incremental else "full"
    shared = f", {replicas} replicas ({config.distribute})" if strategy is not None else ""
    log(
        f"{mode} training of {model.name} ({model.count_params():,} parameters) on "
        f"{len(ids)} partitions, {per_epoch} images an epoch, up to {config.epochs} epochs"
        f"{shared}"
    )
    started = time.perf_counter()
    fitted = model.fit(
        train,
        validation_data=val,
        epochs=config.epochs,
        shuffle=False,
        callbacks=callbacks,
        verbose=0,  # pyright: ignore[reportArgumentType] - Keras types verbose as str ("auto")
    )
    seconds = time.perf_counter() - started
    history = {k: [float(v) for v in vals] for k, vals in fitted.history.items()}
    model.save(out / "model.keras")
    (out / "checkpoint.keras").unlink(missing_ok=True)
    epochs_run = len(history.get("loss", []))
    best = int(np.argmin(history["val_loss"])) + 1 if history.get("val_loss") else epochs_run
    counts = {d.empiar_id: _used(d, "train", config) for d in datasets}
    return TrainResult(
        out / "model.keras",
        history,
        epochs_run,
        best,
        seconds,
        counts,
        epochs_run * per_epoch,
        mode,
        list(new_ids or []),
        config.distribute,
        replicas,
    )


@dataclass
class Evaluation:
    """Scores of one model on one split of one partition (fractions in [0, 1])."""

    empiar_id: str
    split: str
    particles: int
    scores: dict[str, float]
    seconds: float
    examples: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    """(images, true labels, predicted labels) of the first few particles, for overlays."""
    good_particles: int = 0
    scores_good: dict[str, float] | None = None
    """The same scores over the particles known to be good (None without ground truth):
    junk particles' labels show a pose that is not in the image, which no model can find."""
    negatives: int = 0
    """The split's negatives (boxes far from every pick), scored apart from the particles."""
    negatives_all_background: float | None = None
    """The share of those negatives predicted all background (no signal, no edge pixel);
    None without negatives."""

    @property
    def mean_iou(self) -> float:
        return float(self.scores["mean_iou"])


def evaluate_partition(
    model: Any,
    corpus_root: str | os.PathLike,
    empiar_id: str,
    *,
    split: str = "test",
    batch: int = 64,
    examples: int = 8,
    max_particles: int = 0,
    edge_from_signal: bool = False,
) -> Evaluation:
    """The paper's scores of ``model`` on a split of one partition, at the particles' box
    (``edge_from_signal``: the edge derived from the predicted signal, as the manifest says).
    The scores are over the particles only; the partition's negatives (all background by
    construction) give :attr:`Evaluation.negatives_all_background` instead (``max_particles``
    caps each)."""
    dataset = open_corpus(corpus_root, empiar_id)
    every = dataset.split_indices(split)
    negative_rows = every[dataset.negative[every]]
    rows = every[~dataset.negative[every]]
    if max_particles:
        rows, negative_rows = rows[:max_particles], negative_rows[:max_particles]
    if len(rows) == 0:
        raise ValueError(f"{empiar_id}: no particles in the {split!r} split of {dataset.location}")
    has_truth = "is_good" in dataset.table.columns
    good = known_good(dataset, rows)
    accumulator, accumulator_good = ConfusionAccumulator(), ConfusionAccumulator()
    shown = None
    started = time.perf_counter()
    for start in range(0, len(rows), batch):
        index = rows[start : start + batch]
        images = np.asarray(dataset.images.get_orthogonal_selection((index,)), dtype=np.float32)
        truth = np.asarray(dataset.labels.get_orthogonal_selection((index,)))
        predicted = predict_labels(model, images, batch=batch, edge_from_signal=edge_from_signal)
        accumulator.update(truth, predicted)
        keep = good[start : start + batch]
        accumulator_good.update(truth[keep], predicted[keep])
        if shown is None and examples:
            shown = (images[:examples], truth[:examples], predicted[:examples])
    all_background = 0
    for start in range(0, len(negative_rows), batch):
        index = negative_rows[start : start + batch]
        images = np.asarray(dataset.images.get_orthogonal_selection((index,)), dtype=np.float32)
        predicted = predict_labels(model, images, batch=batch, edge_from_signal=edge_from_signal)
        all_background += int((~predicted.astype(bool).any(axis=(1, 2))).sum())
    seconds = time.perf_counter() - started
    return Evaluation(
        dataset.empiar_id,
        split,
        int(len(rows)),
        accumulator.scores(),
        seconds,
        shown,
        int(good.sum()),
        accumulator_good.scores() if has_truth and good.any() else None,
        int(len(negative_rows)),
        all_background / len(negative_rows) if len(negative_rows) else None,
    )


def training_curve_png(
    history: dict[str, list[float]], path: str | os.PathLike, title: str = "training"
) -> Path:
    """Loss and accuracy per epoch (train and validation) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        if key in history:
            ax.plot(epochs, history[key], "o-", label=f"train {key}")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], "s-", label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    # the temporary name ends in .tmp: the format comes from the target's name
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return out
