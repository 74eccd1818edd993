"""Helpers shared by several test files: tiny synthetic corpora and STAR projects, the catalog
assets and sensors run on an instance, and the processes of a deployment (webserver, daemon).

Plain functions and constants; the fixtures built on them are in ``conftest.py``. Dagster and
the assets are imported inside the functions that need them, so that a library test importing
the corpus helpers does not load Dagster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from particleseg_model.access.fixtures import ORIGINAL_IDS_AT_3_5_A, SYNTHETIC_ELIGIBLE

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# ------------------------------------------------------------------ tiny corpora (test_model)

BOX = 32
TINY = dict(
    size=32,
    base_filters=12,
    batch_size=16,
    epochs=15,
    patience=4,
    optimizer="adam",
    learning_rate=3e-3,
)


def disc_particles(n: int, box: int = BOX, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright discs of random radius and centre in noise; labels: disc signal, a 2 px ring
    outside it edge, the rest background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:box, :box]
    images = np.empty((n, box, box), np.float32)
    labels = np.zeros((n, box, box), np.uint8)
    for i in range(n):
        cy, cx = box / 2 + rng.uniform(-3, 3, 2)
        radius = rng.uniform(5, 9)
        distance = np.hypot(yy - cy, xx - cx)
        labels[i][distance <= radius + 2] = 2
        labels[i][distance <= radius] = 1
        image = (distance <= radius) * 2.0 + rng.normal(0, 0.5, (box, box))
        images[i] = (image - image.mean()) / image.std()
    return images, labels


def write_partition(root: Path, key: str, n: int, seed: int) -> None:
    """A corpus partition ``key`` of ``n`` disc particles (box :data:`BOX`, 2 A/px)."""
    from particleseg_model.corpus.store import CorpusWriter

    images, labels = disc_particles(n, seed=seed)
    with CorpusWriter(root, key, BOX, attrs={"pixel_size_a": 2.0}) as writer:
        writer.append(images, labels, {"image_name": [f"{i + 1}@{key}.mrcs" for i in range(n)]})


def write_star_project(folder: Path, n: int, box: int = BOX, seed: int = 4) -> Path:
    """A RELION-style project: ``Particles/stack.mrcs`` of disc particles and the
    ``particles.star`` (optics and particles blocks) that names them; returns the STAR path."""
    import mrcfile
    import pandas as pd

    from particleseg_model.em.star import write_loop_blocks

    images, _ = disc_particles(n, box=box, seed=seed)
    (folder / "Particles").mkdir(parents=True)
    with mrcfile.new(folder / "Particles" / "stack.mrcs") as mrc:
        mrc.set_data(images)
        mrc.voxel_size = 2.0
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnImagePixelSize": [2.0],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i:06d}@Particles/stack.mrcs" for i in range(1, n + 1)],
            "rlnOpticsGroup": [1] * n,
        }
    )
    write_loop_blocks(folder / "particles.star", {"optics": optics, "particles": particles})
    return folder / "particles.star"


# ------------------------------------------------------- the catalog assets (test_assets)

# eligible entries of the embedded fixture catalog under the default rule (< 3.5 A)
N_ELIGIBLE = 56 - len(ORIGINAL_IDS_AT_3_5_A) + len(SYNTHETIC_ELIGIBLE)


def resources(tmp_path: Path, **empiar_options) -> dict:
    """The EMPIAR client (one retry, no polite delay) and a storage root under ``tmp_path``."""
    from particleseg_assets.resources import EmpiarResource, StorageResource

    return {
        "empiar": EmpiarResource(retries=1, polite_delay_s=0.0, timeout_s=5, **empiar_options),
        "storage": StorageResource(root=str(tmp_path / "data")),
    }


def run_catalog(instance, tmp_path, **config):
    """Materialize the catalog assets and their checks; ``config``: eligible_entries' config."""
    from dagster import materialize

    from particleseg_assets.assets.catalog import eligible_entries, empiar_entries
    from particleseg_assets.checks import (
        eligible_current,
        entry_ids_unique,
        few_catalog_errors,
    )

    return materialize(
        [
            empiar_entries,
            eligible_entries,
            entry_ids_unique,
            few_catalog_errors,
            eligible_current,
        ],
        instance=instance,
        resources=resources(tmp_path),
        run_config={"ops": {"eligible_entries": {"config": config}}} if config else None,
    )


def sensor_tick(sensor, instance, tmp_path, cursor=None, **empiar_options):
    """One evaluation of ``sensor``: its result and the cursor it left."""
    from dagster import build_sensor_context

    from particleseg_assets.definitions import defs

    with build_sensor_context(
        instance=instance,
        cursor=cursor,
        definitions=defs,
        resources=resources(tmp_path, **empiar_options),
    ) as context:
        return sensor(context), context.cursor


# ------------------------------------------------ a deployment's processes (test_dagster_e2e)

# particles per entry of the two-entry archive of the ``particle_archive`` fixture
N_PARTICLES = 64


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``args`` in a session of its own (so :func:`stop_process` stops its children too),
    stdout and stderr into ``log``."""
    handle = open(log, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
