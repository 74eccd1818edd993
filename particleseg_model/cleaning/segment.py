"""Segment a user's RELION particle set with a trained model: label masks in STAR row order.

:func:`segment_star` streams the particles of a STAR file (RELION 3.0/3.1/5.0; stacks found
relative to the STAR file or to ``particles_dir``) in batches through the model and writes a
Zarr v3 group with ``labels`` (uint8, N x S x S, 0 background, 1 signal, 2 edge, chunked along
N) at the particles' own box, ``readable`` (bool, N: False for an image with a NaN or infinite
pixel, whose labels are left 0 and mean nothing), plus the attributes saying which model and
file made it, how many particles were unreadable and whether the model found no signal on most
of them (``out_of_distribution``, ``no_signal_share``: see
:data:`particleseg_model.cleaning.clean.OOD_NO_SIGNAL_SHARE`). Images are normalised with
:func:`particleseg_model.model.predict.normalise_for_model` first (any units), and a model
whose manifest says ``edge_from_signal`` derives the edge from its signal. Memory stays at one
batch whatever the number of particles. The group is written under a temporary name and
renamed into place.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from particleseg_model.atomic import remove_stale_temporaries, temporary_name
from particleseg_model.cleaning.inputs import INPUT_STAR, check_one_box, check_outputs, read_paths
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
    unreadable: int = 0  # images with a NaN or infinite pixel
    no_signal: int = 0  # readable particles without predicted signal
    out_of_distribution: bool = False

    @property
    def particles_per_s(self) -> float:
        return self.particles / max(self.seconds, 1e-9)

    @property
    def no_signal_share(self) -> float:
        """Share of the readable particles without predicted signal (0 when none is readable)."""
        return self.no_signal / max(self.particles - self.unreadable, 1)


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
    ``log`` gets a line for unreadable (non-finite) images and one
    :func:`~particleseg_model.cleaning.clean.no_signal_line` when the model is out of
    distribution.
    """
    import zarr

    from particleseg_model.cleaning.clean import (
        _scale_rows,
        is_out_of_distribution,
        no_signal_line,
        scale_note,
    )
    from particleseg_model.corpus.labels import SIGNAL
    from particleseg_model.model.inference import load_engine
    from particleseg_model.model.predict import (
        finite_images,
        predict_labels,
        stack_scale,
    )
    from particleseg_model.model.registry import resolve_model
    from particleseg_model.progress import progress as bar

    say = log or (lambda line: None)
    star_path, out_path = Path(star), Path(out)
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    # before any work: the folder takes --out, which is no input and does not exist yet
    check_outputs({"--out": out_path}, {star_path: INPUT_STAR})
    remove_stale_temporaries(out_path)  # what a killed run of this command left
    particles = read_star(star_path).particles
    if particles.empty:
        raise ValueError(f"{star_path}: no particles")
    version = resolve_model(model, models_root)
    base_dir = Path(particles_dir) if particles_dir else star_path.parent
    check_one_box(star_path, particles, base_dir)
    check_outputs({"--out": out_path}, read_paths(star_path, particles, base_dir, version.path))
    # ONNX Runtime when installed (the onnx extra), else Keras: model.inference
    network = load_engine(version, log=say)
    size = version.input_size
    from_signal = bool(version.manifest.get("edge_from_signal", False))
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
    # one scale for the stack, from a sample read before the stream (see normalise_for_model)
    try:
        sample = read_particles_table(particles.iloc[_scale_rows(n)], base_dir=base_dir)
    except MrcError:  # a bad row among them: the stream below names it; the first one will do
        sample = first
    scale = stack_scale(sample, size=size)  # what the model's input is divided by
    note = scale_note(stack_scale(sample))  # the spread at the particles' box: their units
    if note:
        say(note)
    # a Zarr folder, built under a temporary name and renamed: a folder swap, not a file write
    tmp = temporary_name(out_path)
    chunk = max(1, min(n, (4 << 20) // (box * box)))
    started = time.perf_counter()
    readable = np.ones(n, bool)
    no_signal = 0
    try:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        labels = group.create_array(
            "labels", shape=(n, box, box), chunks=(chunk, box, box), dtype="uint8"
        )
        disable = None if progress is None else not progress
        with bar(total=n, desc="segment", unit="particle", disable=disable) as shown:
            for start in range(0, n, batch):
                rows = particles.iloc[start : start + batch]
                images = read_particles_table(rows, base_dir=base_dir)
                if images.shape[1:] != (box, box):
                    raise MrcError(
                        f"{star_path}: rows {start + 1}-{start + len(rows)} hold "
                        f"{images.shape[2]} x {images.shape[1]} images, the first "
                        f"particle {box} x {box}"
                    )
                finite = finite_images(images)
                batch_labels = np.zeros(images.shape, np.uint8)
                if finite.any():
                    batch_labels[finite] = predict_labels(
                        network,
                        images[finite],
                        scale=scale,
                        edge_from_signal=from_signal,
                    )
                readable[start : start + len(rows)] = finite
                no_signal += int((~(batch_labels[finite] == SIGNAL).any(axis=(1, 2))).sum())
                labels[start : start + len(rows)] = batch_labels
                shown.update(len(rows))
        unreadable = int((~readable).sum())
        if unreadable:
            first = ", ".join(str(int(r) + 1) for r in np.flatnonzero(~readable)[:3])
            say(
                f"{unreadable} of {n} particles have NaN or infinite pixels: unreadable, their "
                f"labels left 0 and marked in 'readable' (rows {first}"
                + (" ..." if unreadable > 3 else "")
                + ")"
            )
        out_of_distribution = is_out_of_distribution(no_signal, n - unreadable)
        if out_of_distribution:
            say(
                no_signal_line(
                    version.version,
                    no_signal,
                    n - unreadable,
                    "the masks are not meaningful",
                )
            )
        group.create_array("readable", shape=(n,), chunks=(n,), dtype="bool")[:] = readable
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
                "edge_from_signal": from_signal,
                "unreadable": unreadable,
                "no_signal_share": round(no_signal / max(n - unreadable, 1), 4),
                "out_of_distribution": out_of_distribution,
            }
        )
        os.rename(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SegmentResult(
        out_path,
        n,
        box,
        size,
        version.version,
        seconds,
        unreadable=unreadable,
        no_signal=no_signal,
        out_of_distribution=out_of_distribution,
    )


def read_labels(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """(labels, attributes) of a group written by :func:`segment_star`."""
    import zarr

    group = zarr.open_group(path, mode="r")
    if group.attrs.get("format") != FORMAT:
        raise ValueError(f"{path}: not a particleSeg label group")
    # zarr types group[...] as Array | Group; 'labels' is an Array
    return np.asarray(group["labels"][:]), dict(group.attrs)  # pyright: ignore[reportArgumentType]
