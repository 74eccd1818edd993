"""Pictures a biologist looks at before reading numbers: particles beside their label masks.

PNGs are written without Pillow or matplotlib (8-bit grayscale, see
:func:`write_png`).
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
