"""The calibrated cleaning score: how typical a particle's predicted mask is.

The reference distribution is fitted at training time on the model's masks of good
validation particles (:func:`mask_calibration`) and kept in the model's manifest; cleaning
scores a user's particles against it (:func:`calibrated_scores`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from particleseg_model.corpus.labels import SIGNAL
from particleseg_model.corpus.store import open_corpus
from particleseg_model.model.loader import known_good
from particleseg_model.model.metrics import edge_to_signal
from particleseg_model.model.predict import predict_labels

__all__ = ["calibrated_scores", "fit_calibration", "mask_calibration", "mask_features"]

_CHI2_2_MEDIAN = 2 * math.log(2)
_CHI2_2_975 = -2 * math.log(0.025)


def mask_features(ets: np.ndarray, signal_px: np.ndarray, box: int) -> np.ndarray:
    """``(n, 2)`` features of predicted masks with signal: ``u = log(ets + 1 / (2 signal_px))``
    (the half pixel keeps a mask without edge finite) and ``v = log(signal_px / box^2)``, the
    log of the signal's share of the box (comparable across boxes)."""
    ets = np.asarray(ets, dtype=np.float64)
    signal = np.asarray(signal_px, dtype=np.float64)
    return np.column_stack([np.log(ets + 0.5 / signal), np.log(signal / float(box) ** 2)])


def fit_calibration(features: np.ndarray) -> dict[str, Any]:
    """The reference distribution of :func:`mask_features` for :func:`calibrated_scores`: a
    robust 2D Gaussian (see there), as JSON-ready ``{"mean", "cov", "particles"}``. Fit it on
    the model's masks of particles known to be good (the training corpus' validation split:
    :func:`particleseg_model.model.train.mask_calibration`)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2 or len(x) < 3:
        raise ValueError(f"a calibration needs (n >= 3, 2) mask features, got {x.shape}")
    mu, cov = _robust_gaussian(x)
    return {
        "mean": mu.tolist(),
        "cov": cov.tolist(),
        "particles": int(len(x)),
        "features": "log(ets + 0.5 / signal_px), log(signal_px / box^2)",
    }


def calibrated_scores(
    ets: np.ndarray,
    signal_px: np.ndarray,
    readable: np.ndarray | None = None,
    *,
    box: int | None = None,
    reference: dict[str, Any] | None = None,
) -> np.ndarray:
    """How typical each particle's mask is: a log-likelihood, higher = keep.

    Features :func:`mask_features` ``(u, v)`` (log ETS, log signal share of the box) under a
    2D Gaussian ``N(mu, C)``; the score is the log-density
    ``-d2 / 2 - log(2 pi) - log(det C) / 2`` with ``d2 = (x - mu)' C^-1 (x - mu)``.

    ``reference`` (a :func:`fit_calibration` result, which the model registry keeps in each
    model's manifest): ``N(mu, C)`` is the distribution of the model's masks on *good*
    training particles. Without it, ``N(mu, C)`` is fitted robustly to the data set itself:
    the median and MAD-scaled (x 1.4826) spread of each feature, then concentration steps
    (mean and covariance of the 75 % of particles nearest in ``d2``, until that subset stops
    changing), ``C`` scaled so the median ``d2`` is the chi-square(2) median, and a last
    re-weighting on the particles with ``d2`` below the chi-square(2) 97.5 % quantile. That
    needs the good particles to be the majority; a set that is mostly junk (the paper's
    EMPIAR-10406 test had 75 % junk) needs the reference, or its typical particle is junk.

    A particle is atypical both ways: an ETS too low (aggregates, blobs) or too HIGH
    (fragments, partial particles), an area too large (aggregates) or too small; particles
    without signal (empty, ice) get ``-inf``, unreadable ones (``readable`` False) NaN.
    Fewer than 3 particles with signal and no reference: the plain ETS ranks them.
    """
    ets = np.asarray(ets, dtype=np.float64)
    signal = np.asarray(signal_px, dtype=np.float64)
    ok = np.ones(len(ets), bool) if readable is None else np.asarray(readable, bool)
    out = np.full(len(ets), np.nan)
    out[ok] = -np.inf
    has = ok & (signal > 0)
    if reference is None and has.sum() < 3:
        out[has] = ets[has]
        return out
    if reference is not None and box is None:
        raise ValueError("a reference calibration needs the particles' box")
    x = mask_features(ets[has], signal[has], box or 1)
    if reference is not None:
        mu, cov = np.asarray(reference["mean"], float), np.asarray(reference["cov"], float)
    else:
        mu, cov = _robust_gaussian(x)
    d2 = _mahalanobis2(x, mu, cov)
    _, logdet = np.linalg.slogdet(cov)
    out[has] = -0.5 * d2 - math.log(2 * math.pi) - 0.5 * logdet
    return out


def _mahalanobis2(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    diff = x - mu
    return np.einsum("ij,ij->i", diff @ np.linalg.inv(cov), diff)


def _regularised(cov: np.ndarray, floor: np.ndarray) -> np.ndarray:
    # a data set whose particles all have the same area has zero spread: keep C invertible
    return cov + np.diag(floor)


def _robust_gaussian(
    x: np.ndarray, keep: float = 0.75, steps: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of ``x`` (n x 2) by concentration steps from the median and MAD."""
    n = len(x)
    mu = np.median(x, axis=0)
    mad = 1.4826 * np.median(np.abs(x - mu), axis=0)
    # a tiny floor relative to the spread of the data (or absolute, for a constant feature)
    floor = np.maximum(1e-6 * np.maximum(x.std(axis=0) ** 2, 1.0), 1e-12)
    cov = _regularised(np.diag(mad**2), floor)
    h = max(3, int(math.ceil(keep * n)))
    subset: np.ndarray | None = None
    for _ in range(steps):
        nearest = np.sort(np.argsort(_mahalanobis2(x, mu, cov), kind="stable")[:h])
        if subset is not None and np.array_equal(nearest, subset):
            break
        subset = nearest
        mu = x[subset].mean(axis=0)
        cov = _regularised(np.cov(x[subset], rowvar=False), floor)
    median = float(np.median(_mahalanobis2(x, mu, cov)))
    if median > 0:  # consistency: a Gaussian's median d2 is the chi-square(2) median
        cov = cov * (median / _CHI2_2_MEDIAN)
    inliers = _mahalanobis2(x, mu, cov) <= _CHI2_2_975
    if inliers.sum() >= 3:
        mu = x[inliers].mean(axis=0)
        cov = _regularised(np.cov(x[inliers], rowvar=False), floor)
    return mu, cov


def mask_calibration(
    model: Any,
    corpus_root: str | os.PathLike,
    ids: Sequence[str],
    *,
    split: str = "val",
    max_particles: int = 2000,
    batch: int = 64,
    edge_from_signal: bool = False,
) -> dict[str, Any]:
    """The distribution of the model's masks on good particles of ``split`` (ETS and signal
    share, :func:`fit_calibration`): the reference of the calibrated
    cleaning score, kept in the model's manifest. At most ``max_particles`` in all. A
    partition's negatives (all-background boxes) are not particles and never enter it."""
    features, per = [], max(1, max_particles // max(1, len(ids)))
    for key in ids:
        dataset = open_corpus(corpus_root, key)
        rows = dataset.split_indices(split)
        rows = rows[known_good(dataset, rows) & ~dataset.negative[rows]][:per]
        if not len(rows):
            continue
        images = np.asarray(dataset.images.get_orthogonal_selection((rows,)), np.float32)
        labels = predict_labels(model, images, batch=batch, edge_from_signal=edge_from_signal)
        signal = np.count_nonzero(labels == SIGNAL, axis=(1, 2))
        has = signal > 0
        features.append(mask_features(edge_to_signal(labels)[has], signal[has], dataset.box))
    if not features or sum(len(f) for f in features) < 3:
        raise ValueError(
            f"no good {split} particles with predicted signal in {list(ids)}: cannot calibrate"
        )
    return fit_calibration(np.concatenate(features))
