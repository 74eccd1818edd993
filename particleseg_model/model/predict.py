"""Prediction: label masks and class probabilities of particle images with a trained model.

Images are float32 ``(N, S, S)`` particles normalised per particle; they are resized to the
model's input (area averaging when shrinking) and the class maps resized back to ``S``
(bilinear), so labels come at the particles' own box. Label codes: 0 background, 1 signal,
2 edge.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from particleseg_model.corpus.labels import resize_images

__all__ = ["predict_labels", "predict_probabilities"]


def _class_maps(model: Any, images: np.ndarray) -> np.ndarray:
    """Softmax ``(n, classes, S, S)`` at the images' box for one batch ``(n, S, S)``."""
    size, box = int(model.input_shape[1]), images.shape[1]
    x = resize_images(images, size) if box != size else images
    probs = np.asarray(model.predict_on_batch(x[..., None]), dtype=np.float32)
    n, _, _, classes = probs.shape
    maps = np.ascontiguousarray(probs.transpose(0, 3, 1, 2))
    if box != size:  # every class map of the batch in one resize
        maps = resize_images(maps.reshape(n * classes, size, size), box, "bilinear")
    return maps.reshape(n, classes, box, box)


def _checked_images(images: np.ndarray) -> np.ndarray:
    data = np.asarray(images, dtype=np.float32)
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise ValueError(f"particle images must be (N, S, S) squares, got {data.shape}")
    return data


def predict_probabilities(model: Any, images: np.ndarray, *, batch: int = 64) -> np.ndarray:
    """Softmax ``(N, S, S, 3)`` float32 at the images' own box ``S`` (float32 ``(N, S, S)``
    particle images normalised per particle): resized to the model's input (area averaging
    when shrinking), the softmax resized back (bilinear)."""
    data = _checked_images(images)
    out = np.empty(data.shape + (3,), dtype=np.float32)
    for start in range(0, len(data), batch):
        maps = _class_maps(model, data[start : start + batch])
        out[start : start + len(maps)] = maps.transpose(0, 2, 3, 1)
    return out


def predict_labels(model: Any, images: np.ndarray, *, batch: int = 64) -> np.ndarray:
    """Label codes ``(N, S, S)`` uint8 (0 background, 1 signal, 2 edge) at the images' box:
    the argmax of :func:`predict_probabilities` (the first class wins a tie)."""
    data = _checked_images(images)
    labels = np.empty(data.shape, dtype=np.uint8)
    for start in range(0, len(data), batch):
        maps = _class_maps(model, data[start : start + batch])
        if maps.shape[1] != 3:
            labels[start : start + len(maps)] = maps.argmax(axis=1)
            continue
        # the argmax of three maps by two comparisons: 3x faster than argmax over axis 1
        background, signal, edge = maps[:, 0], maps[:, 1], maps[:, 2]
        out = labels[start : start + len(maps)]
        np.greater(signal, background, out=out, casting="unsafe")
        out[edge > np.maximum(background, signal)] = 2
    return labels
