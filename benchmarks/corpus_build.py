"""End-to-end corpus build of one simulated dataset: mask projections -> labels -> Zarr.

For ``--n`` particles at ``--box`` (default 20,000 at 128), streamed in batches:

1. input (timed apart, not part of the build): noisy particles with known poses from
   ``simulate_particles`` (a generated pseudo-atomic map, or ``--map``), with their STAR rows;
2. build: the MaskCreate-style mask of the map (``maps.make_mask``) projected at every
   particle's pose and origin (``simulate.FourierProjector``), the labels from the projections
   (``labels.labels_from_projection``: signal = projection > 10, edge = 11x11 dilation minus
   signal), and the particles, labels and table streamed into the Zarr corpus
   (``corpus.CorpusWriter``), committed atomically.

Prints particles/s (whole build and per stage), bytes/particle on disk (images, labels, table),
the float16 quantisation error against the normalised float32 images, the sequential read
speed, and the cost of an atomic append of ``--append`` particles (hard-link copy-on-write)
against a full copy of the partition. The machine's load average is printed with the figures.

    .venv/bin/python benchmarks/corpus_build.py [--n 20000] [--box 128] [--batch 1000]
        [--dtype float16] [--root DIR] [--map FILE] [--append 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from particleseg_model.corpus.store import (
    CorpusWriter,
    _hardlink_tree,
    append_to_corpus,
    open_corpus,
)
from particleseg_model.em.maps import DensityMap, generate_map, load_map, make_mask, prepare_map
from particleseg_model.simulation.simulate import (
    FourierProjector,
    SimulationConfig,
    simulate_particles,
)

try:  # the project's label rule (DESIGN section 3)
    from particleseg_model.corpus.labels import labels_from_projection
except ImportError:  # pragma: no cover - the inline rule, identical
    from scipy import ndimage

    def labels_from_projection(
        projections: np.ndarray, threshold: float = 10.0, edge_px: int = 11
    ) -> np.ndarray:
        signal = projections > threshold
        dilated = ndimage.maximum_filter(signal, size=(1, edge_px, edge_px))
        return (2 * dilated.astype(np.uint8) - signal.astype(np.uint8)).astype(np.uint8)


THRESHOLD, EDGE_PX = 10.0, 11
STAR_TO_TABLE = {
    "rlnImageName": "image_name",
    "rlnAngleRot": "rot_deg",
    "rlnAngleTilt": "tilt_deg",
    "rlnAnglePsi": "psi_deg",
    "rlnOriginXAngst": "origin_x_a",
    "rlnOriginYAngst": "origin_y_a",
    "rlnDefocusU": "defocus_u_a",
    "rlnDefocusV": "defocus_v_a",
    "rlnDefocusAngle": "defocus_angle_deg",
    "rlnMicrographName": "micrograph_name",
    "rlnCoordinateX": "coordinate_x_px",
    "rlnCoordinateY": "coordinate_y_px",
    "rlnOpticsGroup": "optics_group",
    "rlnRandomSubset": "random_subset",
}


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, started: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def load_density(box: int, map_path: Path | None) -> DensityMap:
    if map_path is not None:
        return prepare_map(load_map(map_path), box)
    return generate_map("globular", box, seed=0)


def simulated_input(
    density: DensityMap,
    n: int,
    batch: int,
    seed: int,
    timer: Timer,
    prefix: str = "Particles/batch",
) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """Noisy particles with known poses, ``batch`` at a time: (images, canonical table)."""
    done, k = 0, 0
    while done < n:
        size = min(batch, n - done)
        started = time.perf_counter()
        sim = simulate_particles(
            density,
            SimulationConfig(n_particles=size),
            seed=seed + k,
            keep_clean=False,
            stack_name=f"{prefix}{k:04d}.mrcs",
        )
        star = sim.star
        table = star[[c for c in STAR_TO_TABLE if c in star.columns]].rename(columns=STAR_TO_TABLE)
        table["pixel_size_a"] = sim.pixel_size_a
        table["image_size_px"] = sim.box
        table["voltage_kv"] = sim.optics["rlnVoltage"]
        table["spherical_aberration_mm"] = sim.optics["rlnSphericalAberration"]
        table["amplitude_contrast"] = sim.optics["rlnAmplitudeContrast"]
        timer.add("simulate (input)", started)
        yield sim.images, table
        done += size
        k += 1


def mask_labels(
    projector: FourierProjector, table: pd.DataFrame, pixel: float, timer: Timer
) -> np.ndarray:
    started = time.perf_counter()
    projections = projector.project(
        table["rot_deg"],
        table["tilt_deg"],
        table["psi_deg"],
        table["origin_x_a"].to_numpy() / pixel,
        table["origin_y_a"].to_numpy() / pixel,
    )
    timer.add("project mask", started)
    started = time.perf_counter()
    labels = labels_from_projection(projections, THRESHOLD, EDGE_PX)
    timer.add("labels", started)
    return labels


def tree_bytes(path: Path, sub: str = "") -> int:
    base = path / sub if sub else path
    return sum(f.stat().st_size for f in base.rglob("*") if f.is_file())


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} (2 cores)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="corpus root (kept); default: a temporary directory, deleted at the end",
    )
    parser.add_argument("--map", type=Path, default=None, help="map file (default: generated)")
    parser.add_argument("--append", type=int, default=1000, help="particles to append (0: no)")
    parser.add_argument("--id", default="sim-globular")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="corpus-bench-"))
    print(
        f"corpus build: {args.n} particles, box {args.box}, {args.dtype}, batches of "
        f"{args.batch}, root {root}"
    )
    print(f"start: {load()}")
    timer = Timer()

    started = time.perf_counter()
    density = load_density(args.box, args.map)
    mask, map_threshold = make_mask(density)
    projector = FourierProjector(mask)
    setup_s = time.perf_counter() - started
    pixel = density.pixel_size_a
    attrs = {
        "pixel_size_a": pixel,
        "threshold": THRESHOLD,
        "edge_px": EDGE_PX,
        "source_star": f"simulated ({density.source})",
        "mask_threshold": map_threshold,
        "simulated": True,
    }

    quantisation = None
    started_all = time.perf_counter()
    with CorpusWriter(root, args.id, args.box, attrs=attrs, dtype=args.dtype) as writer:
        for images, table in simulated_input(density, args.n, args.batch, 1, timer):
            labels = mask_labels(projector, table, pixel, timer)
            started = time.perf_counter()
            writer.append(images, labels, table)
            timer.add("zarr write", started)
            if quantisation is None:
                first = images.astype(np.float64)
                first = (first - first.mean(axis=(1, 2), keepdims=True)) / first.std(
                    axis=(1, 2), keepdims=True
                )
                quantisation = first
        started = time.perf_counter()
    timer.add("commit", started)
    total_s = time.perf_counter() - started_all - timer.seconds["simulate (input)"]
    build_s = sum(v for k, v in timer.seconds.items() if k != "simulate (input)")

    ds = open_corpus(root, args.id)
    path = Path(ds.location)
    n = ds.n_particles
    img_b, lab_b = tree_bytes(path, "images"), tree_bytes(path, "labels")
    tab_b = (path / "particles.parquet").stat().st_size
    print(f"set-up (map, mask, projector FFT): {setup_s:.2f} s")
    print(
        f"build: {n} particles in {build_s:.1f} s = {n / build_s:.0f} particles/s "
        f"(mask projection + labels + Zarr write + commit; wall {total_s:.1f} s without "
        f"the simulated input)"
    )
    for name, seconds in timer.seconds.items():
        print(f"  {name:18s} {seconds:7.2f} s  {n / seconds:9.0f} particles/s")
    print(
        f"on disk: {(img_b + lab_b + tab_b) / n:.0f} bytes/particle = images "
        f"{img_b / n:.0f} ({img_b / (n * args.box**2 * np.dtype(args.dtype).itemsize):.3f} of "
        f"raw {args.dtype}) + labels {lab_b / n:.0f} + table {tab_b / n:.0f}; "
        f"{(img_b + lab_b + tab_b) / 1e6:.1f} MB, chunks of {ds.chunk_particles} particles "
        f"({ds.n_chunks} per array)"
    )
    stored = ds.images[: len(quantisation)].astype(np.float64)
    err = np.abs(stored - quantisation)
    print(
        f"{args.dtype} error vs normalised float32: max {err.max():.2e} of the particle std "
        f"(RMS {np.sqrt((err**2).mean()):.1e}); max |value| {np.abs(stored).max():.1f}"
    )
    label_share = (
        np.bincount(ds.labels[: len(quantisation)].ravel(), minlength=3) / quantisation.size
    )
    print(
        f"label shares (first batch): background {label_share[0]:.3f}, signal "
        f"{label_share[1]:.3f}, edge {label_share[2]:.3f}"
    )

    started = time.perf_counter()
    for k in range(ds.n_chunks):
        ds.read_chunk(k)
    read_s = time.perf_counter() - started
    print(f"sequential read (images + labels, decoded): {n / read_s:.0f} particles/s")

    if args.append:
        extra = next(
            simulated_input(
                density, args.append, args.append, 10_000, timer, prefix="Particles/extra"
            )
        )
        labels = mask_labels(projector, extra[1], pixel, Timer())
        started = time.perf_counter()
        grown = append_to_corpus(
            root, args.id, extra[0], labels, extra[1], attrs={"source_star": "simulated extra"}
        )
        append_s = time.perf_counter() - started
        # the two ways to make the temporary version an append writes into
        started = time.perf_counter()
        _hardlink_tree(Path(grown.location), root / "linked.tmp")
        link_s = time.perf_counter() - started
        started = time.perf_counter()
        shutil.copytree(grown.location, root / "copied.tmp")
        copy_s = time.perf_counter() - started
        files = sum(1 for f in (root / "linked.tmp").rglob("*") if f.is_file())
        shutil.rmtree(root / "linked.tmp")
        shutil.rmtree(root / "copied.tmp")
        print(
            f"append {args.append} particles to {n} (atomic, hard-link copy-on-write): "
            f"{append_s:.2f} s in all; making the temporary version: hard links "
            f"{link_s:.3f} s vs full copy {copy_s:.2f} s ({files} files, "
            f"{tree_bytes(Path(grown.location)) / 1e9:.2f} GB, page cache warm)"
        )
    print(f"end: {load()}")
    if args.root is None:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
