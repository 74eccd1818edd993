"""Inputs for the tests of a user's mistakes (test_cli_errors, test_protected_paths): a model
that needs no training, small RELION projects with one defect each, small mounts.

The model is one 1x1 convolution with fixed weights: signal where a normalised pixel is above
about 0.6, background below about -0.1, edge between; on the bright discs of
:func:`helpers.disc_particles` it finds each disc (signal) in a band of edge, with a spread of
ETS values, so cleaning ranks and drops as it does with a trained model, in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from helpers import BOX, disc_particles

from particleseg_model.em.star import write_loop_blocks


def threshold_model(root: Path) -> Path:
    """Register the fixed 1x1-convolution model (input :data:`helpers.BOX`) under ``root``;
    returns ``root``."""
    import keras

    from particleseg_model.model.registry import register_model, staging_dir

    inputs = keras.Input((BOX, BOX, 1))
    layer = keras.layers.Conv2D(3, 1, activation="softmax")
    network = keras.Model(inputs, layer(inputs))
    kernel = np.zeros((1, 1, 1, 3), np.float32)
    kernel[0, 0, 0] = [-4.0, 4.0, 0.0]  # background, signal, edge
    layer.set_weights([kernel, np.array([0.0, -2.0, 0.5], np.float32)])
    staged = staging_dir(root)
    network.save(staged / "model.keras")
    register_model(root, staged, {"input_size": BOX, "arch": "custom", "partitions": {}})
    return root


def write_stack(path: Path, images: np.ndarray) -> Path:
    """An MRC stack of ``images`` at 2 A/px (folders made)."""
    import mrcfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(images.astype(np.float32))
        mrc.voxel_size = 2.0
    return path


def project(
    folder: Path,
    n: int = 24,
    *,
    boxes: tuple[int, ...] = (BOX,),
    declared: tuple[int, ...] | None = None,
    seed: int = 4,
) -> Path:
    """A RELION 3.1 project: one optics group and one stack per entry of ``boxes`` (``n``
    particles each, group g in ``Particles/stack_g.mrcs``), ``rlnImageSize`` per group from
    ``declared`` (default: the stacks' boxes). Returns the STAR file."""
    declared = declared or boxes
    names, groups = [], []
    for g, box in enumerate(boxes, start=1):
        images, _ = disc_particles(n, box=box, seed=seed + g)
        write_stack(folder / "Particles" / f"stack_{g}.mrcs", images)
        names += [f"{i:06d}@Particles/stack_{g}.mrcs" for i in range(1, n + 1)]
        groups += [g] * n
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": list(range(1, len(boxes) + 1)),
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, len(boxes) + 1)],
            "rlnImagePixelSize": [2.0] * len(boxes),
            "rlnImageSize": list(declared),
            "rlnImageDimensionality": [2] * len(boxes),
        }
    )
    rng = np.random.default_rng(seed)
    particles = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnDefocusU": rng.uniform(8000, 20000, len(names)).round(2),
            "rlnClassNumber": rng.integers(1, 4, len(names)),
            "rlnOpticsGroup": groups,
        }
    )
    star = folder / "particles.star"
    write_loop_blocks(star, {"optics": optics, "particles": particles})
    return star


def edit_row(star: Path, out: Path, row: int, edit) -> Path:
    """``star`` copied to ``out`` with the particle row ``row`` (1-based) replaced by
    ``edit(line)``."""
    lines = star.read_text().splitlines()
    rows = [i for i, line in enumerate(lines) if "@Particles/" in line]
    lines[rows[row - 1]] = edit(lines[rows[row - 1]])
    out.write_text("\n".join(lines) + "\n")
    return out


@contextlib.contextmanager
def small_mount(folder: Path, size: str = "16k", read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` (read-only when asked): a real full or
    read-only file system. Yields the folder; raises OSError when this host cannot mount
    (not root, no CAP_SYS_ADMIN), for the test to skip."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise OSError(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def can_mount() -> bool:
    """Whether :func:`small_mount` works here (root with CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        return False
    import tempfile

    with tempfile.TemporaryDirectory() as where:
        try:
            with small_mount(Path(where) / "m"):
                return True
        except OSError:
            return False
