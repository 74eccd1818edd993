"""Segmentation metrics (numpy only): confusion matrix, IoU as the paper computes it, ETS.

Label codes: 0 background, 1 signal, 2 edge (:data:`particleseg_model.corpus.labels.LABEL_NAMES`).

* **mean IoU** (the paper's figure, DESIGN section 3): *one* confusion matrix over all pixels of
  the evaluated set (:func:`confusion_matrix`, or :class:`ConfusionAccumulator` batch by batch),
  IoU per class ``TP / (TP + FP + FN)``, then the mean of the classes (:func:`iou_scores`).
  That is not the mean of per-particle IoUs (:func:`per_particle_iou`, for finding the worst
  particles). Values here are fractions in [0, 1]; the paper reports them x100 (71.07 = 0.7107).
* **ETS** (edge-to-signal ratio, :func:`edge_to_signal`): edge pixels / signal pixels of one
  particle's (predicted) mask; 0 for a particle without signal. The paper drops the particles
  with the *lowest* ETS.
"""

from __future__ import annotations

import numpy as np

from particleseg_model.corpus.labels import EDGE, LABEL_NAMES, SIGNAL

__all__ = [
    "ConfusionAccumulator",
    "confusion_matrix",
    "edge_to_signal",
    "iou_scores",
    "per_particle_iou",
]

_CHUNK = 1 << 22  # pixels per bincount pass: bounds the int64 temporaries to 32 MiB


def confusion_matrix(true: np.ndarray, pred: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """``(n, n)`` int64 pixel counts over all pixels: rows the true class, columns the predicted.

    Args:
        true: label codes, any shape, integer dtype, values in ``[0, n_classes)``.
        pred: predicted codes (e.g. ``probabilities.argmax(-1)``), the same shape.
        n_classes: number of classes.
    """
    t, p = _checked(true, pred, n_classes)
    t, p = t.reshape(-1), p.reshape(-1)
    n = int(n_classes)
    counts = np.zeros(n * n, dtype=np.int64)
    for start in range(0, t.size, _CHUNK):
        codes = t[start : start + _CHUNK].astype(np.intp)
        codes *= n
        np.add(codes, p[start : start + _CHUNK], out=codes, casting="unsafe")
        counts += np.bincount(codes, minlength=n * n)
    return counts.reshape(n, n)


def iou_scores(confusion: np.ndarray) -> dict[str, float]:
    """IoU per class and their mean from a confusion matrix (rows true, columns predicted).

    Returns ``iou_<class>`` (``iou_background``, ``iou_signal``, ``iou_edge``; ``iou_<i>`` for
    classes beyond the three named ones): ``TP / (TP + FP + FN)``, NaN for a class absent from
    both truth and prediction; ``mean_iou``: the mean over the classes that are not NaN (NaN if
    all are); ``pixel_accuracy``: ``trace / total`` (NaN with no pixels); ``pixels``: the
    total. Fractions in [0, 1] (the paper reports IoU x100).
    """
    matrix = np.asarray(confusion)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ValueError(f"confusion must be a square (n, n) matrix, got shape {matrix.shape}")
    matrix = matrix.astype(np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    iou = np.full(len(tp), np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    scores: dict[str, float] = {}
    for i, value in enumerate(iou):
        name = LABEL_NAMES[i] if i < len(LABEL_NAMES) else str(i)
        scores[f"iou_{name}"] = float(value)
    present = iou[~np.isnan(iou)]
    scores["mean_iou"] = float(present.mean()) if present.size else float("nan")
    total = matrix.sum()
    scores["pixel_accuracy"] = float(tp.sum() / total) if total > 0 else float("nan")
    scores["pixels"] = int(total)
    return scores


class ConfusionAccumulator:
    """One confusion matrix summed over batches: ``update`` per batch, then ``scores()``.

    The result equals :func:`confusion_matrix` of all batches at once (the paper's mean IoU).
    """

    def __init__(self, n_classes: int = 3):
        if int(n_classes) < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n_classes = int(n_classes)
        self._matrix = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)

    def update(self, true: np.ndarray, pred: np.ndarray) -> None:
        """Add the pixels of one batch (same rules as :func:`confusion_matrix`)."""
        self._matrix += confusion_matrix(true, pred, self.n_classes)

    def reset(self) -> None:
        """Back to no pixels."""
        self._matrix[...] = 0

    @property
    def matrix(self) -> np.ndarray:
        """A copy of the ``(n, n)`` int64 matrix so far (rows true, columns predicted)."""
        return self._matrix.copy()

    def scores(self) -> dict[str, float]:
        """:func:`iou_scores` of the matrix so far."""
        return iou_scores(self._matrix)


def edge_to_signal(labels: np.ndarray) -> np.ndarray:
    """ETS per particle: edge pixels / signal pixels, 0 where a particle has no signal.

    Args:
        labels: ``(N, S, S)`` label codes (or ``(S, S)``: one particle, N = 1), typically a
            prediction ``argmax``.

    Returns:
        ``(N,)`` float64.
    """
    data = np.asarray(labels)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"labels must be (N, S, S) or (S, S), got shape {data.shape}")
    signal = np.count_nonzero(data == SIGNAL, axis=(1, 2))
    edge = np.count_nonzero(data == EDGE, axis=(1, 2))
    ets = np.zeros(len(data), dtype=np.float64)
    np.divide(edge, signal, out=ets, where=signal > 0)
    return ets


def per_particle_iou(true: np.ndarray, pred: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Mean IoU of each particle on its own: ``(N,)`` float64.

    Per particle, IoU per class over its pixels and the mean over the classes present in its
    truth or its prediction (absent ones are skipped, as in :func:`iou_scores`). For ranking
    particles (galleries of the worst); the dataset figure is :func:`iou_scores`' ``mean_iou``.

    Args:
        true: ``(N, S, S)`` label codes (or ``(S, S)``: N = 1).
        pred: predicted codes, the same shape.
        n_classes: number of classes.
    """
    t, p = _checked(true, pred, n_classes)
    if t.ndim == 2:
        t, p = t[None], p[None]
    if t.ndim != 3:
        raise ValueError(f"labels must be (N, S, S) or (S, S), got shape {t.shape}")
    n = int(n_classes)
    count, pixels = t.shape[0], t.shape[1] * t.shape[2]
    matrices = np.zeros((count, n * n), dtype=np.int64)
    step = max(1, _CHUNK // max(pixels, 1))
    for start in range(0, count, step):
        tc = t[start : start + step].reshape(-1, pixels)
        pc = p[start : start + step].reshape(-1, pixels)
        codes = np.arange(len(tc), dtype=np.intp)[:, None] * (n * n) + tc.astype(np.intp) * n
        np.add(codes, pc, out=codes, casting="unsafe")
        matrices[start : start + len(tc)] = np.bincount(
            codes.reshape(-1), minlength=len(tc) * n * n
        ).reshape(len(tc), n * n)
    matrices = matrices.reshape(count, n, n).astype(np.float64)
    tp = np.diagonal(matrices, axis1=1, axis2=2)
    union = matrices.sum(axis=1) + matrices.sum(axis=2) - tp
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)
    present = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(
            present.any(axis=1), (iou * present).sum(axis=1) / present.sum(axis=1), np.nan
        )


def _checked(true: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays, checked: same shape, integer codes in ``[0, n_classes)``."""
    t, p = np.asarray(true), np.asarray(pred)
    if t.shape != p.shape:
        raise ValueError(
            f"true and pred must have the same shape, got true {t.shape} and pred {p.shape}"
        )
    if int(n_classes) < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    for name, a in (("true", t), ("pred", p)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise TypeError(f"{name} must hold integer label codes, got dtype {a.dtype}")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= n_classes):
            raise ValueError(
                f"{name} has codes outside [0, {n_classes}): min {int(a.min())}, max {int(a.max())}"
            )
    return t, p
