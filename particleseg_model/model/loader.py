"""Training batches streamed from the Zarr corpus: shuffled, chunk-aware, resized, augmented.

:class:`CorpusBatches` is the backend-free core (numpy only): batch ``i`` of an epoch is
``(x, y)`` with ``x`` float32 ``(b, size, size, 1)`` and ``y`` the label codes ``(b, size,
size)`` (uint8; 0 background, 1 signal, 2 edge) or one-hot float32 ``(b, size, size, 3)``.
:func:`corpus_pydataset` wraps it in a ``keras.utils.PyDataset`` (Keras 3, any backend) and
:func:`corpus_tf_dataset` in a ``tf.data.Dataset``; Keras and TensorFlow are imported inside
those functions only.

Reading order (chunk-aware shuffling)
    Zarr decodes whole chunks (about 4 MiB of images, 128 particles at box 128). An epoch's
    order is: the chunks holding particles of the requested split, in a random order, taken
    ``buffer_chunks`` at a time; the particles of each such window shuffled among themselves;
    batches cut from that sequence. A batch therefore touches the ``buffer_chunks`` chunks of
    one window (of two where it straddles windows), consecutive batches touch the same ones,
    and a small decoded-chunk cache (shared by the worker threads) makes each chunk decoded
    about once per epoch, read in whole sequential files. Every particle of the split appears
    exactly once per epoch (the last batch is short unless ``drop_last``); the order depends
    only on ``seed`` and the epoch counter, never on the worker that runs a batch.

    Pass ``shuffle=False`` to ``Model.fit`` with the PyDataset: the dataset shuffles itself,
    and Keras' own batch-order shuffle would defeat the cache. ``on_epoch_end`` moves to the
    next order; Keras 3 also calls it once when ``fit`` starts (after sampling two batches for
    the tensor signature) and, checked on Keras 3.15 (TensorFlow backend, 1 and 2 workers),
    requests no batch of an epoch before the previous epoch's ``on_epoch_end``, so every
    fitted epoch is one complete pass.

Resizing (to the model size, default 256)
    With :func:`particleseg_model.corpus.labels.resize_images` / ``resize_labels`` (the project's
    one resize rule, half-pixel centres): images bilinear when enlarging, area averaging when
    shrinking (``image_resize``), labels nearest neighbour, so only the codes 0, 1, 2 occur.
    Each image is then normalised at the model's size
    (:func:`particleseg_model.model.predict.normalise_for_model`: background plane and mean
    removed, spread 1), exactly as prediction prepares a user's particles
    (:func:`particleseg_model.model.predict.model_input`).
    Datasets of different boxes mix freely in one batch. The image weights are applied as
    gathers and multiply-adds (2-3 taps a pixel) rather than ``resize_images``' matrix
    products: the same numbers, no BLAS call, and so no OpenBLAS thread pool (which spun
    itself down on cores shared with training; ``docs/loader.md``).

Augmentation (``flips``, ``rot90``)
    One of the 8 (flips and rot90), 4 (rot90) or 4 (flips) symmetries of the square per
    particle, the same for image and labels, drawn from ``(seed, epoch, batch index)``.

Workers
    Default: ``workers=1``, no multiprocessing (one thread feeds the U-Net's training several
    hundred times over; worker processes were slower); raise ``workers`` for slow (remote)
    stores, where threads overlap the waiting. Measured by ``benchmarks/loader_speed.py``:
    ``docs/loader.md``.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from particleseg_model.corpus.labels import resize_images, resize_labels
from particleseg_model.corpus.store import CorpusDataset, list_corpus, open_corpus
from particleseg_model.model.predict import normalise_for_model

__all__ = ["CorpusBatches", "corpus_pydataset", "corpus_tf_dataset"]

N_CLASSES = 3


@lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The 1-D weights of :func:`particleseg_model.corpus.labels.resize_images` as taps: source
    indices and weights ``(n_out, K)``, K the most non-zero weights of an output pixel (2 for
    bilinear, about ``n_in / n_out + 1`` for area)."""
    if method == "auto":
        method = "area" if n_out < n_in else "bilinear"
    # the row of weights of each output pixel: resize an identity along one axis only
    dense = resize_images(np.eye(n_in, dtype=np.float32)[None], (n_out, n_in), method)[0]
    k = max(1, int(np.count_nonzero(dense, axis=1).max()))
    index = np.argsort(dense == 0, axis=1, kind="stable")[:, :k]  # non-zero weights first
    return index, np.take_along_axis(dense, index, axis=1)


def _resample(images: np.ndarray, size: int, method: str) -> np.ndarray:
    """``labels.resize_images`` (same weights) by gathers and multiply-adds: no BLAS call,
    so no OpenBLAS threads, which spin against the training's threads and cost 10-30x on 2
    loaded cores (measured: 40 against 1,300 samples/s)."""
    out = images
    for axis in (-2, -1):
        n_in = out.shape[axis]
        if n_in == size:
            continue
        index, weight = _taps(n_in, size, method)
        shape = (size, 1) if axis == -2 else (size,)
        acc = np.take(out, index[:, 0], axis=axis) * weight[:, 0].reshape(shape)
        for j in range(1, index.shape[1]):
            acc += np.take(out, index[:, j], axis=axis) * weight[:, j].reshape(shape)
        out = acc
    return out


def _dihedral(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(image, k, axes=(-2, -1)) if k else image
    return out[..., ::-1] if flip else out


# ------------------------------------------------------------------------------ batches


def known_good(dataset: CorpusDataset, rows: np.ndarray) -> np.ndarray:
    """Boolean mask over ``rows``: False where the table's ``is_good`` says junk (all True
    when the partition has no ground truth)."""
    if "is_good" not in dataset.table.columns:
        return np.ones(len(rows), dtype=bool)
    return dataset.table["is_good"].fillna(True).to_numpy(dtype=bool)[rows]


class CorpusBatches:
    """Shuffled, chunk-aware batches over many corpus partitions (see the module docstring).

    Args:
        datasets: opened partitions (:func:`particleseg_model.corpus.store.open_corpus`); see also
            :meth:`from_root`.
        split: ``"train"``, ``"val"``, ``"test"`` or None (all particles).
        batch_size: particles per batch.
        size: model input size (None: as stored; then all datasets must share one box).
        shuffle: chunk-window shuffling as described; False reads in storage order.
        seed: the order and the augmentation depend on ``(seed, epoch)`` only.
        buffer_chunks: chunks mixed in one shuffle window (more: better mixing across
            micrographs, more decoded chunks held in memory).
        flips, rot90: augmentation (random mirror, random quarter turns).
        one_hot: labels as float32 ``(b, size, size, 3)`` instead of codes.
        drop_last: leave out the last, short batch of an epoch.
        image_resize: ``"auto"`` (bilinear up, area down), ``"bilinear"`` or ``"area"``.
        label_dtype: dtype of the label codes when not one-hot.
        good_only: leave out the particles a partition's table marks as junk (``is_good``
            False: simulated ground truth, whose labels come from a pose that does not match
            the image); partitions without ``is_good`` keep every particle.
        junk_background: keep those particles but with an all-background label (the model
            learns that there is no particle in them).
    """

    def __init__(
        self,
        datasets: Sequence[CorpusDataset],
        *,
        split: str | None = "train",
        batch_size: int = 8,
        size: int | None = 256,
        shuffle: bool = True,
        seed: int = 0,
        buffer_chunks: int = 4,
        flips: bool = False,
        rot90: bool = False,
        one_hot: bool = False,
        drop_last: bool = False,
        image_resize: str = "auto",
        label_dtype: str = "uint8",
        good_only: bool = False,
        junk_background: bool = False,
    ):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("no corpus datasets to load")
        if batch_size < 1 or buffer_chunks < 1:
            raise ValueError("batch_size and buffer_chunks must be positive")
        boxes = {d.box for d in self.datasets}
        if size is None and len(boxes) > 1:
            raise ValueError(f"datasets have boxes {sorted(boxes)}: give a common size")
        self.size = int(size) if size is not None else boxes.pop()
        if image_resize not in ("auto", "area", "bilinear"):
            raise ValueError(f"unknown image resize mode {image_resize!r}: auto, area or bilinear")
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.buffer_chunks, self.flips, self.rot90 = buffer_chunks, flips, rot90
        self.one_hot, self.drop_last, self.image_resize = one_hot, drop_last, image_resize
        self.label_dtype = np.dtype(label_dtype)
        # units: (dataset, chunk, rows of that chunk in the split)
        self._units: list[tuple[int, int, np.ndarray]] = []
        # per dataset: rows known to be junk, whose labels are replaced by background
        self._junk = [
            ~known_good(ds, np.arange(ds.n_particles)) if junk_background else None
            for ds in self.datasets
        ]
        for d, ds in enumerate(self.datasets):
            rows = ds.split_indices(split)
            if good_only:
                rows = rows[known_good(ds, rows)]
            chunk_of = rows // ds.chunk_particles
            bounds = np.flatnonzero(np.diff(chunk_of)) + 1
            for part in np.split(rows, bounds):
                if len(part):
                    self._units.append((d, int(part[0] // ds.chunk_particles), part))
        self.n_samples = sum(len(u[2]) for u in self._units)
        if self.n_samples == 0:
            raise ValueError(
                f"no particles in split {split!r} of {[d.empiar_id for d in self.datasets]}"
            )
        self._cache_size = 2 * buffer_chunks + 2
        self._init_cache()
        self.epoch = 0
        self._plan_epoch: int | None = None

    @classmethod
    def from_root(
        cls,
        root: str | os.PathLike[str],
        ids: Sequence[str] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> CorpusBatches:
        """Batches over the partitions ``ids`` (default: all) of the corpus at ``root``."""
        ids = list(ids) if ids is not None else list_corpus(root, storage_options=storage_options)
        return cls([open_corpus(root, i, storage_options=storage_options) for i in ids], **kwargs)

    # -- pickling (process workers): no locks, an empty cache --------------------------------
    def _init_cache(self) -> None:
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[int, int], threading.Lock] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_cache", "_lock", "_loading"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_cache()

    # -- epochs -------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.drop_last:
            return self.n_samples // self.batch_size
        return -(-self.n_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def on_epoch_end(self) -> None:
        self.epoch += 1

    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, row) of every sample of the current epoch, in reading order."""
        with self._lock:
            if self._plan_epoch == self.epoch:
                return self._plan_ds, self._plan_rows
            order = np.arange(len(self._units))
            rng = np.random.default_rng([self.seed, self.epoch, 0])
            if self.shuffle:
                order = rng.permutation(order)
            ds_parts, row_parts = [], []
            for start in range(0, len(order), self.buffer_chunks):
                window = [self._units[u] for u in order[start : start + self.buffer_chunks]]
                d = np.concatenate([np.full(len(u[2]), u[0], dtype=np.int32) for u in window])
                r = np.concatenate([u[2] for u in window])
                if self.shuffle:
                    perm = rng.permutation(len(r))
                    d, r = d[perm], r[perm]
                ds_parts.append(d)
                row_parts.append(r)
            self._plan_ds, self._plan_rows = np.concatenate(ds_parts), np.concatenate(row_parts)
            self._plan_epoch = self.epoch
            return self._plan_ds, self._plan_rows

    def batch_indices(self, i: int) -> list[tuple[str, int]]:
        """``(dataset id, particle row)`` of the samples of batch ``i`` in this epoch."""
        d, r = self._slice(i)
        return [(self.datasets[a].empiar_id, int(b)) for a, b in zip(d, r, strict=True)]

    def _slice(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range (0..{len(self) - 1})")
        d, r = self._plan()
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return d[s], r[s]

    # -- reading ------------------------------------------------------------------------------
    def _chunk(self, d: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        key = (d, k)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one decode per chunk even when two threads want it at once
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    return hit
            data = self.datasets[d].read_chunk(k)
            with self._lock:
                self._cache[key] = data
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
                self._loading.pop(key, None)
        return data

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        d, r = self._slice(i)
        b, size = len(r), self.size
        x = np.empty((b, size, size), dtype=np.float32)
        y = np.empty((b, size, size), dtype=np.uint8)
        for dataset in np.unique(d):
            ds = self.datasets[dataset]
            at = np.flatnonzero(d == dataset)
            rows = r[at]
            chunks = rows // ds.chunk_particles
            images = np.empty((len(at), ds.box, ds.box), dtype=np.float32)
            labels = np.empty((len(at), ds.box, ds.box), dtype=np.uint8)
            for k in np.unique(chunks):
                sel = np.flatnonzero(chunks == k)
                chunk_images, chunk_labels = self._chunk(int(dataset), int(k))
                local = rows[sel] - k * ds.chunk_particles
                images[sel] = chunk_images[local]
                labels[sel] = chunk_labels[local]
            if self._junk[dataset] is not None:
                labels[self._junk[dataset][rows]] = 0
            # normalised at the model's size, as prediction does (predict.model_input): an
            # area-averaged box of 128 or 320 px has lost most of its noise and would reach
            # the network with a spread well below the 1 of a box already at the model's size
            x[at] = normalise_for_model(_resample(images, size, self.image_resize))
            y[at] = resize_labels(labels, size)
        if self.flips or self.rot90:
            rng = np.random.default_rng([self.seed, self.epoch, 1, i])
            turns = rng.integers(0, 4, b) if self.rot90 else np.zeros(b, dtype=int)
            mirror = rng.random(b) < 0.5 if self.flips else np.zeros(b, dtype=bool)
            for j in range(b):
                if turns[j] or mirror[j]:
                    x[j] = _dihedral(x[j], int(turns[j]), bool(mirror[j])).copy()
                    y[j] = _dihedral(y[j], int(turns[j]), bool(mirror[j])).copy()
        if self.one_hot:
            target = np.eye(N_CLASSES, dtype=np.float32)[y]
        else:
            target = y.astype(self.label_dtype, copy=False)
        return x[..., None], target

    def __iter__(self):
        """The batches of the current epoch, then moves to the next epoch."""
        for i in range(len(self)):
            yield self[i]
        self.on_epoch_end()


# ------------------------------------------------------------------------------ Keras / tf.data


def corpus_pydataset(
    batches: CorpusBatches,
    *,
    workers: int = 1,
    use_multiprocessing: bool = False,
    max_queue_size: int = 10,
) -> Any:
    """``batches`` as a ``keras.utils.PyDataset`` (works with every Keras 3 backend). Use
    ``model.fit(dataset, shuffle=False, epochs=...)``: the dataset shuffles itself and moves to
    the next epoch's order in ``on_epoch_end``."""
    import keras

    class CorpusPyDataset(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(
                workers=workers,
                use_multiprocessing=use_multiprocessing,
                max_queue_size=max_queue_size,
            )
            self.batches = batches

        def __len__(self) -> int:
            return len(self.batches)

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            return self.batches[i]

        def on_epoch_end(self) -> None:
            self.batches.on_epoch_end()

    return CorpusPyDataset()


def corpus_tf_dataset(batches: CorpusBatches, *, epochs: int = 1, prefetch: int = 2) -> Any:
    """``batches`` as a ``tf.data.Dataset`` of ``epochs`` epochs (TensorFlow backend only;
    prefer :func:`corpus_pydataset`)."""
    import tensorflow as tf

    y_shape = (None, batches.size, batches.size) + ((N_CLASSES,) if batches.one_hot else ())
    y_dtype = tf.float32 if batches.one_hot else tf.as_dtype(batches.label_dtype)

    def generate():
        for _ in range(epochs):
            yield from batches

    signature = (
        tf.TensorSpec((None, batches.size, batches.size, 1), tf.float32),
        tf.TensorSpec(y_shape, y_dtype),
    )
    return tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(prefetch)
