"""Segment a user's RELION particle set with a trained model: label masks in STAR row order.

:func:`segment_star` streams the particles of a STAR file (RELION 3.0/3.1/5.0; stacks found
relative to the STAR file or to ``particles_dir``) in batches through the model and writes a
Zarr v3 group with ``labels`` (uint8, N x S x S, 0 background, 1 signal, 2 edge, chunked along
N) at the particles' own box, plus the attributes saying which model and file made it. Memory
stays at one batch whatever the number of particles. The group is written under a temporary
name and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from particleseg_model.em.mrc import MrcError, read_particles_table
from particleseg_model.em.star import read_star

FORMAT = "particleseg-labels/1"


@dataclass
class SegmentResult:
    """What :func:`segment_star` wrote: the label file, particles, their box and the model's."""

    out: Path
    particles: int
    box: int
    model_size: int
    model_version: str
    seconds: float

    @property
    def particles_per_s(self) -> float:
        return self.particles / max(self.seconds, 1e-9)


def segment_star(
    star: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    models_root: str | os.PathLike | None = None,
    particles_dir: str | os.PathLike | None = None,
    batch: int = 256,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> SegmentResult:
    """Predicted label masks of every particle of ``star`` into the Zarr group ``out``.

    ``model``: a registered version folder or its ``model.keras``; None: the latest version
    under ``models_root`` (default ``$PARTICLESEG_DATA/models``, else ``./data/models``).
    """
    import zarr

    from particleseg_model.model.predict import predict_labels
    from particleseg_model.model.registry import load_model, resolve_model
    from particleseg_model.progress import progress as bar

    say = log or (lambda line: None)
    star_path, out_path = Path(star), Path(out)
    if out_path.exists():
        raise FileExistsError(f"{out_path} exists: choose another --out or remove it")
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    version = resolve_model(model, models_root)
    network = load_model(version)
    size = version.input_size
    particles = read_star(star_path).particles
    if particles.empty:
        raise ValueError(f"{star_path}: no particles")
    base_dir = Path(particles_dir) if particles_dir else star_path.parent
    first = read_particles_table(particles.head(1), base_dir=base_dir)
    box_y, box_x = first.shape[1:]
    if box_y != box_x:
        raise MrcError(f"{star_path}: particle images are {box_x} x {box_y} pixels, not square")
    box = int(box_x)
    if box != size:
        say(
            f"particles are {box} px, the model takes {size} px: resizing each particle to "
            f"{size} and the masks back to {box}"
        )
    n = len(particles)
    # a Zarr folder, built under a temporary name and renamed: a folder swap, not a file write
    tmp = out_path.with_name(f"{out_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    chunk = max(1, min(n, (4 << 20) // (box * box)))
    started = time.perf_counter()
    try:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        labels = group.create_array(
            "labels", shape=(n, box, box), chunks=(chunk, box, box), dtype="uint8"
        )
        with bar(total=n, desc="segment", unit="particle", disable=progress) as shown:
            for start in range(0, n, batch):
                rows = particles.iloc[start : start + batch]
                images = read_particles_table(rows, base_dir=base_dir)
                if images.shape[1:] != (box, box):
                    raise MrcError(
                        f"{star_path}: rows {start + 1}-{start + len(rows)} hold "
                        f"{images.shape[2]} x {images.shape[1]} images, the first "
                        f"particle {box} x {box}"
                    )
                labels[start : start + len(rows)] = predict_labels(network, images)
                shown.update(len(rows))
        seconds = time.perf_counter() - started
        group.attrs.update(
            {
                "format": FORMAT,
                "source_star": str(star_path.resolve()),
                "model_version": version.version,
                "model": version.model_location,
                "model_input_size": size,
                "box": box,
                "particles": n,
                "resized": box != size,
                "label_codes": {"0": "background", "1": "signal", "2": "edge"},
            }
        )
        os.rename(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SegmentResult(out_path, n, box, size, version.version, seconds)


def read_labels(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """(labels, attributes) of a group written by :func:`segment_star`."""
    import zarr

    group = zarr.open_group(path, mode="r")
    if group.attrs.get("format") != FORMAT:
        raise ValueError(f"{path}: not a particleSeg label group")
    # zarr types group[...] as Array | Group; 'labels' is an Array
    return np.asarray(group["labels"][:]), dict(group.attrs)  # pyright: ignore[reportArgumentType]
