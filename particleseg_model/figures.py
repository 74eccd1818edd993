"""Pictures a biologist looks at before reading numbers: particles beside their label masks.

PNGs are written without Pillow or matplotlib (8-bit grayscale, see
:func:`write_png`), except the class-average galleries (:func:`class_gallery`,
:func:`galleries_side_by_side`), whose captions need text: matplotlib, imported inside them.
"""

from __future__ import annotations

import base64
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from particleseg_model.atomic import atomic_write_bytes

__all__ = [
    "LABEL_GRAY",
    "class_gallery",
    "galleries_side_by_side",
    "markdown_image",
    "particle_grid",
    "particles_with_masks",
    "segmentation_overlay",
    "write_png",
]

# label code -> gray level: background black, edge mid-gray, signal white
LABEL_GRAY = np.array([0, 255, 128], dtype=np.uint8)


def write_png(path: Path, image: np.ndarray, text: dict[str, str] | None = None) -> Path:
    """Write an 8-bit grayscale PNG (no Pillow needed); ``text`` goes into tEXt chunks."""
    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    height, width = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    body = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    for key, value in (text or {}).items():
        body += chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1"))
    body += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    return atomic_write_bytes(path, b"\x89PNG\r\n\x1a\n" + body)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [1, 99])
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def particles_with_masks(
    images: np.ndarray, labels: np.ndarray | None = None, columns: int = 8, gap: int = 2
) -> np.ndarray:
    """A grid of bands of ``columns`` particles: the particle (contrast stretched to its
    1-99th percentiles) above its label mask (background black, edge gray, signal white);
    without ``labels``, the particles only. ``images`` and ``labels`` are ``(n, S, S)``."""
    return particle_grid(images, [] if labels is None else [labels], columns, gap)


def segmentation_overlay(
    images: np.ndarray, truth: np.ndarray, predicted: np.ndarray, columns: int = 8, gap: int = 2
) -> np.ndarray:
    """Particles, their true masks and the model's masks, in bands of three rows."""
    return particle_grid(images, [truth, predicted], columns, gap)


def particle_grid(
    images: np.ndarray, label_rows: list[np.ndarray], columns: int = 8, gap: int = 2
) -> np.ndarray:
    """Bands of ``columns`` particles, each above one mask per array of ``label_rows``."""
    n, size = len(images), images.shape[-1]
    if n == 0:
        return np.zeros((1, 1), dtype=np.uint8)
    columns = max(1, min(columns, n))
    rows = 1 + len(label_rows)
    band_height = rows * (size + gap)
    grid = np.full(
        (-(-n // columns) * band_height + gap, columns * (size + gap) + gap), 64, dtype=np.uint8
    )
    for i in range(n):
        band, col = divmod(i, columns)
        x = gap + col * (size + gap)
        y = gap + band * band_height
        grid[y : y + size, x : x + size] = _to_uint8(np.asarray(images[i], dtype=np.float32))
        for r, labels in enumerate(label_rows, start=1):
            top = y + r * (size + gap)
            grid[top : top + size, x : x + size] = LABEL_GRAY[np.clip(np.asarray(labels[i]), 0, 2)]
    return grid


def markdown_image(path: str | os.PathLike, alt: str = "figure") -> str:
    """Markdown that shows a (small) PNG inline in the Dagster UI, as a data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![{alt}](data:image/png;base64,{data})"


def _gallery_axes(figure: object, images: np.ndarray, labels: list[str], columns: int) -> None:
    """Draw ``images`` (each contrast-stretched) with ``labels`` as titles into ``figure``."""
    n = len(images)
    rows = max(1, -(-n // columns))
    for i in range(rows * columns):
        axes = figure.add_subplot(rows, columns, i + 1)  # pyright: ignore[reportAttributeAccessIssue]
        axes.set_axis_off()
        if i < n:
            tile = _to_uint8(np.asarray(images[i], dtype=np.float32))
            axes.imshow(tile, cmap="gray", vmin=0, vmax=255)
            axes.set_title(labels[i], fontsize=7)


def _save_figure(figure: object, path: Path, metadata: dict[str, str]) -> Path:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata=metadata)  # pyright: ignore[reportAttributeAccessIssue]
    return atomic_write_bytes(path, buffer.getvalue())


def class_gallery(
    path: str | os.PathLike,
    averages: np.ndarray,
    labels: list[str],
    *,
    title: str = "",
    columns: int = 5,
) -> Path:
    """Write a gallery of 2D class averages, one tile each with its caption (class number,
    particle count): the picture a cryo-EM user judges a classification by.

    ``averages`` is ``(K, S, S)`` in the order to show (largest class first); ``labels`` one
    caption per average. The PNG's ``Tiles`` text chunk holds K. Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if len(labels) != len(averages):
        raise ValueError(f"{len(labels)} labels for {len(averages)} class averages")
    columns = max(1, min(columns, len(averages)))
    rows = max(1, -(-len(averages) // columns))
    figure = Figure(figsize=(1.6 * columns, 1.75 * rows + (0.3 if title else 0)), dpi=80)
    _gallery_axes(figure, averages, labels, columns)
    if title:
        figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, Path(path), {"Title": title, "Tiles": str(len(averages))})


def galleries_side_by_side(
    path: str | os.PathLike,
    panels: list[tuple[str, np.ndarray, list[str]]],
    *,
    columns: int = 4,
) -> Path:
    """Several class-average galleries in one PNG, side by side: ``panels`` holds
    ``(heading, averages, labels)`` each (e.g. before cleaning, after, random drop). The
    PNG's ``Tiles`` text chunk lists the tiles per panel (``"10,10,10"``)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("no galleries to show")
    columns = max(1, columns)
    rows = max(max(1, -(-len(p[1]) // columns)) for p in panels)
    figure = Figure(figsize=(1.5 * columns * len(panels), 1.7 * rows + 0.4), dpi=80)
    subfigures = figure.subfigures(1, len(panels), squeeze=False)[0]
    for sub, (heading, averages, labels) in zip(subfigures, panels, strict=True):
        _gallery_axes(sub, averages, labels, min(columns, max(1, len(averages))))
        sub.suptitle(heading, fontsize=9)
    return _save_figure(
        figure, Path(path), {"Tiles": ",".join(str(len(p[1])) for p in panels)}
    )
