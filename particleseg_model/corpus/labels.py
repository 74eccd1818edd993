"""Segmentation labels from mask projections, and resizing of images and labels.

The label rule (DESIGN section 3, the original particleSeg rule):

- Codes: ``0`` background, ``1`` signal, ``2`` edge (:data:`BACKGROUND`, :data:`SIGNAL`,
  :data:`EDGE`), uint8.
- Signal: pixels whose projection of the mask volume exceeds ``threshold`` (default 10). The
  projection is ``relion_project``'s of a 0..1 mask, i.e. the line integral of the mask along the
  ray in voxel units (``particleseg_model.corpus.projection`` keeps that scale), so 10 means "at
  least ten voxels of mask along the ray".
- Edge: the binary dilation of the signal by an ``edge_px x edge_px`` square (default 11), minus
  the signal: a band ``(edge_px - 1) / 2`` pixels wide (Chebyshev distance) *outside* the signal.
  Nothing outside the box counts as signal.
- Labels are made at the particle's original box, before any resize; :func:`resize_labels`
  (nearest) and :func:`resize_images` (area or bilinear) then bring both to the model size.

Resizing treats pixels as squares with centres at ``i + 0.5`` (half-pixel centres, as
``cv2.resize`` and ``tf.image.resize``), so an image and its labels stay registered at any size.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = [
    "BACKGROUND",
    "EDGE",
    "LABEL_NAMES",
    "SIGNAL",
    "label_fractions",
    "labels_from_projection",
    "resize_images",
    "resize_images_taps",
    "resize_labels",
]

BACKGROUND, SIGNAL, EDGE = 0, 1, 2
LABEL_NAMES: tuple[str, ...] = ("background", "signal", "edge")


def labels_from_projection(
    projections: np.ndarray, threshold: float = 10.0, edge_px: int = 11
) -> np.ndarray:
    """Labels ``(b, S, S)`` uint8 (or ``(S, S)`` for one image) from mask projections.

    Args:
        projections: ``(b, S, S)`` or ``(S, S)`` mask projections at the particle's box.
        threshold: signal where ``projection > threshold``.
        edge_px: side of the square dilating the signal into the edge band; odd, >= 1 (1: no
            edge band).
    """
    data = np.asarray(projections)
    if data.ndim not in (2, 3):
        raise ValueError(f"projections must be (b, S, S) or (S, S), got shape {data.shape}")
    edge_px = int(edge_px)
    if edge_px < 1 or edge_px % 2 == 0:
        raise ValueError(f"edge_px must be an odd number >= 1 (a centred square), got {edge_px}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    signal = data > threshold
    if edge_px == 1:
        return signal.view(np.uint8).copy()
    radius = (edge_px - 1) // 2
    dilated = _dilate(_dilate(signal, radius, data.ndim - 1), radius, data.ndim - 2)
    # signal -> 1, dilated only -> 2, the rest 0: 2 * dilated - signal
    labels = dilated.astype(np.uint8)  # contiguous, owns its memory
    labels *= 2
    labels -= signal.view(np.uint8)
    return labels


def _dilate(mask: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Binary dilation along one axis by a window of ``2 radius + 1`` (outside is False).

    A run of in-place ORs with doubling shifts (window 1, 2, 4, ... then the rest) on a copy
    padded with ``radius`` leading zeros: about log2(window) passes instead of window-many
    (4x faster than ``scipy.ndimage.maximum_filter`` and identical to it).
    """
    n = mask.shape[axis]
    shape = list(mask.shape)
    shape[axis] = n + radius
    out = np.zeros(shape, dtype=bool)

    def part(start: int | None, stop: int | None) -> tuple[slice, ...]:
        index = [slice(None)] * mask.ndim
        index[axis] = slice(start, stop)
        return tuple(index)

    out[part(radius, None)] = mask
    width, span = 2 * radius + 1, 1
    # invariant: out[i] = any(padded[i : i + span])
    while span * 2 <= width:
        out[part(0, -span)] |= out[part(span, None)]
        span *= 2
    rest = width - span
    if rest:
        out[part(0, -rest)] |= out[part(rest, None)]
    # out[i] = any(padded[i : i + width]) = any(mask[i - radius : i + radius + 1])
    return out[part(0, n)]


def label_fractions(labels: np.ndarray) -> np.ndarray:
    """Fraction of pixels of each code (background, signal, edge): ``(b, 3)`` float64 per image
    for a stack, ``(3,)`` for one image."""
    data = np.asarray(labels)
    if data.ndim not in (2, 3):
        raise ValueError(f"labels must be (b, S, S) or (S, S), got shape {data.shape}")
    if data.size and int(data.max()) > EDGE:
        raise ValueError(f"labels hold code {int(data.max())}; only 0, 1, 2 are label codes")
    flat = data.reshape(1, -1) if data.ndim == 2 else data.reshape(data.shape[0], -1)
    counts = np.stack(
        [np.count_nonzero(flat == code, axis=1) for code in (BACKGROUND, SIGNAL, EDGE)], axis=1
    ).astype(np.float64)
    fractions = counts / max(flat.shape[1], 1)
    return fractions[0] if data.ndim == 2 else fractions


# ------------------------------------------------------------------------------ resizing


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    # np.isscalar does not narrow the int | tuple union
    out = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)  # pyright: ignore[reportArgumentType, reportGeneralTypeIssues]
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return out  # type: ignore[return-value]


def resize_labels(labels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``(b, S, S)`` or ``(S, S)`` labels to ``size`` (an int for a
    square, or ``(height, width)``): output pixel ``i`` takes input pixel
    ``floor((i + 0.5) * S / size)``. Codes are kept exactly."""
    data = np.asarray(labels)
    if data.ndim not in (2, 3):
        raise ValueError(f"labels must be (b, S, S) or (S, S), got shape {data.shape}")
    height, width = _size2(size)
    rows = np.minimum(
        ((np.arange(height) + 0.5) * data.shape[-2] / height).astype(np.int64), data.shape[-2] - 1
    )
    cols = np.minimum(
        ((np.arange(width) + 0.5) * data.shape[-1] / width).astype(np.int64), data.shape[-1] - 1
    )
    return np.ascontiguousarray(data[..., rows[:, None], cols[None, :]])


@lru_cache(maxsize=32)
def _weights(n_in: int, n_out: int, method: str) -> np.ndarray:
    """``(n_out, n_in)`` float32 resampling matrix along one axis (half-pixel centres)."""
    scale = n_in / n_out
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    if method == "area":
        # output pixel i covers input interval [i * scale, (i + 1) * scale): overlap lengths
        edges = np.arange(n_out + 1) * scale
        for i in range(n_out):
            lo, hi = edges[i], edges[i + 1]
            first, last = int(np.floor(lo)), min(int(np.ceil(hi)), n_in)
            for j in range(first, last):
                weights[i, j] = min(hi, j + 1) - max(lo, j)
        weights /= weights.sum(axis=1, keepdims=True)
    else:  # bilinear, clamped at the borders
        position = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0, n_in - 1)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, n_in - 1)
        frac = position - low
        rows = np.arange(n_out)
        np.add.at(weights, (rows, low), 1 - frac)
        np.add.at(weights, (rows, high), frac)
    weights.setflags(write=False)
    return weights.astype(np.float32)


def resize_images(
    images: np.ndarray, size: int | tuple[int, int], method: str = "auto"
) -> np.ndarray:
    """Resize ``(b, S, S)`` or ``(S, S)`` images to ``size`` as float32.

    ``method``: ``"area"`` (the mean over the area each output pixel covers: the right filter for
    shrinking, no aliasing), ``"bilinear"`` (half-pixel centres, clamped borders), or ``"auto"``
    (area when shrinking, bilinear when enlarging). A constant image stays constant.
    """
    data = np.asarray(images, dtype=np.float32)
    if data.ndim not in (2, 3):
        raise ValueError(f"images must be (b, S, S) or (S, S), got shape {data.shape}")
    if method not in ("auto", "area", "bilinear"):
        raise ValueError(f"unknown resize method {method!r}; use 'auto', 'area' or 'bilinear'")
    height, width = _size2(size)
    n_y, n_x = data.shape[-2:]

    def pick(n_in: int, n_out: int) -> str:
        if method != "auto":
            return method
        return "area" if n_out < n_in else "bilinear"

    wy = _weights(n_y, height, pick(n_y, height))
    wx = _weights(n_x, width, pick(n_x, width))
    # Separable: columns, then rows on the transposed stack. Both products have the weights on
    # the right, which numpy runs as one GEMM over the whole batch; `wy @ stack` (weights on
    # the left) runs one small product per image and was 5-15x slower at 64-256 particles.
    stack = data.reshape((-1, n_y, n_x))
    out = np.matmul(np.matmul(stack, wx.T).transpose(0, 2, 1), wy.T).transpose(0, 2, 1)
    return np.ascontiguousarray(out.reshape(data.shape[:-2] + (height, width)), dtype=np.float32)


@lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int, method: str) -> tuple[tuple[np.ndarray | slice, np.ndarray], ...]:
    """The non-zero weights of :func:`_weights`, tap by tap: ``K`` pairs (source index of each
    output pixel, its float32 weight), K the most non-zero weights of one output pixel (2 for
    bilinear, about ``n_in / n_out + 1`` for area). An output pixel with fewer repeats its last
    source with weight 0. A source index that steps evenly (an integer shrink factor) is a
    slice: a strided view instead of a gather."""
    dense = _weights(n_in, n_out, method)
    nonzero = [np.flatnonzero(row) for row in dense]
    k = max(1, max(len(cols) for cols in nonzero))
    taps = []
    for j in range(k):
        index = np.array([cols[min(j, len(cols) - 1)] for cols in nonzero], dtype=np.intp)
        weight = np.array(
            [dense[i, cols[j]] if j < len(cols) else 0.0 for i, cols in enumerate(nonzero)],
            dtype=np.float32,
        )
        weight.setflags(write=False)
        step = np.diff(index)
        if n_out > 1 and step[0] > 0 and (step == step[0]).all():
            where: np.ndarray | slice = slice(int(index[0]), int(index[-1]) + 1, int(step[0]))
        else:
            index.setflags(write=False)
            where = index
        taps.append((where, weight))
    return tuple(taps)


def _apply_taps(data: np.ndarray, n_out: int, method: str, axis: int) -> np.ndarray:
    """One axis of :func:`resize_images_taps`: ``sum_k w_k * data[..., index_k]`` along
    ``axis`` (-1 columns, -2 rows), float32, accumulated in tap order."""
    shape = (n_out,) if axis == -1 else (n_out, 1)
    out: np.ndarray | None = None
    scratch: np.ndarray | None = None
    for where, weight in _taps(data.shape[axis], n_out, method):
        if isinstance(where, slice):
            source = data[..., where] if axis == -1 else data[..., where, :]
        else:
            source = np.take(data, where, axis=axis, out=scratch)
            scratch = source
        if out is None:
            out = np.multiply(source, weight.reshape(shape))
        else:
            # the product into the scratch buffer (or a new array for a view), then one add
            product = np.multiply(source, weight.reshape(shape), out=scratch)
            out += product
    assert out is not None  # _taps gives at least one tap
    return out


def resize_images_taps(
    images: np.ndarray, size: int | tuple[int, int], method: str = "auto"
) -> np.ndarray:
    """:func:`resize_images` by gathers and multiply-adds instead of matrix products.

    The same weights, the same order (columns, then rows), applied as their few non-zero taps
    per output pixel (2 for bilinear, 2-3 for area at the usual ratios). It never calls BLAS:
    OpenBLAS' thread pool spins against the other threads of a busy 2-core machine (the
    network's, other jobs'), where a batch's resize measured 10-60x slower than on one thread
    (docs/pretrained.md, "Speed"). Shrinking by an integer factor gives the same bits as
    :func:`resize_images` (the products by 1/factor are exact); other ratios differ by at most
    one float32 rounding (|difference| <= 2.4e-7 measured at values of order 1).

    Parameters
    ----------
    images
        ``(b, S, S)`` or ``(S, S)`` images (any float dtype, computed in float32).
    size
        Output side in pixels, or ``(height, width)``.
    method
        As :func:`resize_images`: ``"auto"``, ``"area"`` or ``"bilinear"``.

    Returns
    -------
    numpy.ndarray
        float32 ``(b, height, width)`` or ``(height, width)``, C-contiguous.
    """
    data = np.asarray(images, dtype=np.float32)
    if data.ndim not in (2, 3):
        raise ValueError(f"images must be (b, S, S) or (S, S), got shape {data.shape}")
    if method not in ("auto", "area", "bilinear"):
        raise ValueError(f"unknown resize method {method!r}; use 'auto', 'area' or 'bilinear'")
    height, width = _size2(size)
    n_y, n_x = data.shape[-2:]

    def pick(n_in: int, n_out: int) -> str:
        if method != "auto":
            return method
        return "area" if n_out < n_in else "bilinear"

    out = data
    # an axis already at its size is left alone: both methods' weights are then the identity
    if n_x != width:
        out = _apply_taps(out, width, pick(n_x, width), -1)
    if n_y != height:
        out = _apply_taps(out, height, pick(n_y, height), -2)
    return np.ascontiguousarray(out, dtype=np.float32)
