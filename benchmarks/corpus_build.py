"""End-to-end corpus build of one simulated dataset through the library's build steps.

For ``--n`` particles at ``--box`` (default 20,000 at 128), in batches of ``--batch``:

1. input (timed apart, not part of the build): noisy particles with known poses from
   ``simulate_particles`` (a generated pseudo-atomic map, or ``--map``), written as a
   deposited particle entry would be: MRC stacks, one STAR file (RELION 3.1, through the STAR
   writer) and the map, under ``<root>/input``;
2. build: the steps of ``particleseg_model.corpus.build`` that follow the download, as the
   Dagster assets run them: ``refine_poses`` (the deposited poses), ``make_mask_volume`` (the
   MaskCreate-style mask), ``label_partition`` (the mask projected at every particle's pose
   and origin, labels by ``labels_from_projection``, particles read from their stacks and
   streamed with labels and table into the Zarr corpus, committed atomically).

Prints particles/s (whole labelling and per stage: waiting for projections, reading images,
labels, Zarr write + commit), bytes/particle on disk (images, labels, table), the float16
quantisation error against the normalised float32 images, the sequential read speed, and the
cost of an atomic append of ``--append`` particles (``label_partition`` with ``append``;
hard-link copy-on-write) against a full copy of the partition. The machine's load average is
printed with the figures; the figures also go to ``--json`` when given.

    .venv/bin/python benchmarks/corpus_build.py [--n 20000] [--box 128] [--batch 1000]
        [--dtype float16] [--root DIR] [--map FILE] [--append 1000] [--json PATH]

``loader_speed.py`` takes its simulated corpus from here (``simulated_input``, ``mask_labels``).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_results  # noqa: E402

from particleseg_model.corpus import build  # noqa: E402
from particleseg_model.corpus.labels import labels_from_projection  # noqa: E402
from particleseg_model.corpus.manifests import StacksManifest  # noqa: E402
from particleseg_model.corpus.store import _hardlink_tree, open_corpus  # noqa: E402
from particleseg_model.em.maps import (  # noqa: E402
    DensityMap,
    generate_map,
    load_map,
    prepare_map,
    write_mrc,
)
from particleseg_model.em.star import read_star, write_loop_blocks  # noqa: E402
from particleseg_model.simulation.simulate import (  # noqa: E402
    FourierProjector,
    SimulationConfig,
    simulate_particles,
)

THRESHOLD, EDGE_PX = build.LabelOptions().threshold, build.LabelOptions().edge_px
"""The label rule's parameters: the corpus build's defaults."""


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, started: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def load_density(box: int, map_path: Path | None) -> DensityMap:
    if map_path is not None:
        return prepare_map(load_map(map_path), box)
    return generate_map("globular", box, seed=0)


def simulated_batches(
    density: DensityMap,
    n: int,
    batch: int,
    seed: int,
    timer: Timer,
    prefix: str = "Particles/batch",
    project: Path | None = None,
) -> Iterator[tuple[np.ndarray, pd.DataFrame, dict]]:
    """Noisy particles with known poses, ``batch`` at a time: (images, their RELION particle
    rows, the optics row); the stacks are written under ``project`` when given (MRC, one per
    batch, named as the rows' ``rlnImageName``)."""
    done, k = 0, 0
    while done < n:
        size = min(batch, n - done)
        started = time.perf_counter()
        stack = f"{prefix}{k:04d}.mrcs"
        sim = simulate_particles(
            density,
            SimulationConfig(n_particles=size),
            seed=seed + k,
            keep_clean=False,
            stack_name=stack,
        )
        rows = sim.star.copy()
        rows["rlnImageName"] = [f"{j + 1:06d}@{stack}" for j in range(size)]
        if project is not None:
            write_mrc(project / stack, sim.images, sim.pixel_size_a, stack=True)
        timer.add("simulate (input)", started)
        yield sim.images, rows, sim.optics
        done += size
        k += 1


def simulated_input(
    density: DensityMap,
    n: int,
    batch: int,
    seed: int,
    timer: Timer,
    prefix: str = "Particles/batch",
) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """Noisy particles with known poses, ``batch`` at a time: (images, canonical table), the
    table as the library's STAR reader makes it from the rows a depositor would write."""
    with tempfile.TemporaryDirectory(prefix="corpus-bench-star-") as folder:
        star = Path(folder) / "batch.star"
        for images, rows, optics in simulated_batches(density, n, batch, seed, timer, prefix):
            started = time.perf_counter()
            write_loop_blocks(star, {"optics": optics, "particles": rows})
            table = read_star(star).particles
            timer.add("simulate (input)", started)
            yield images, table


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


def write_entry(
    density: DensityMap, n: int, batch: int, project: Path, timer: Timer
) -> tuple[StacksManifest, np.ndarray, list[pd.DataFrame], dict]:
    """The simulated particle entry under ``project`` (stacks, ``particles.star``, ``map.mrc``)
    and its manifest as ``fetch_stacks`` would record it; also the first batch's images, every
    batch's STAR rows and the optics row (for the append)."""
    first, rows, optics = None, [], {}
    for images, batch_rows, batch_optics in simulated_batches(
        density, n, batch, 1, timer, project=project
    ):
        first = images if first is None else first
        rows.append(batch_rows)
        optics = batch_optics
    started = time.perf_counter()
    star = write_loop_blocks(
        project / "particles.star", {"optics": optics, "particles": pd.concat(rows)}
    )
    write_mrc(project / "map.mrc", density.data, density.pixel_size_a)
    timer.add("simulate (input)", started)
    stacks = StacksManifest(
        empiar_id="simulated",
        kind="particles",
        particles_star=star,
        base_dir=project,
        n_particles=n,
        box_px=density.box,
        pixel_size_a=density.pixel_size_a,
        has_poses=True,
        maps=(project / "map.mrc",),
        ground_truth=None,
        extraction=None,
        map_resolution_a=None,
        downloaded_bytes=0,
    )
    assert first is not None
    return stacks, first, rows, optics


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
        help="work folder (kept): the input entry, the steps' folders and corpus/; "
        "default: a temporary directory, deleted at the end",
    )
    parser.add_argument("--map", type=Path, default=None, help="map file (default: generated)")
    parser.add_argument("--append", type=int, default=1000, help="particles to append (0: no)")
    parser.add_argument("--id", default="sim-globular")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="corpus-bench-"))
    corpus_root = root / "corpus"
    print(
        f"corpus build: {args.n} particles, box {args.box}, {args.dtype}, batches of "
        f"{args.batch}, root {root}"
    )
    print(f"start: {load()}")
    timer = Timer()
    density = load_density(args.box, args.map)
    project = root / "input"
    stacks, first, rows, optics = write_entry(density, args.n, args.batch, project, timer)
    print(
        f"input: {args.n} simulated particles written in {timer.seconds['simulate (input)']:.1f} s"
    )

    started = time.perf_counter()
    refined = build.refine_poses(stacks, root / "refined_particles").manifest
    mask = build.make_mask_volume(stacks, refined, root / "mask_volume").manifest
    setup_s = time.perf_counter() - started
    options = build.LabelOptions(batch=args.batch)
    started = time.perf_counter()
    labelled = build.label_partition(
        stacks, refined, mask, corpus_root, root / "particle_masks", options,
        key=args.id, dtype=args.dtype,
    )  # fmt: skip
    total_s = time.perf_counter() - started
    build_s = labelled.seconds

    ds = open_corpus(corpus_root, args.id)
    path = Path(ds.location)
    n = ds.n_particles
    img_b, lab_b = tree_bytes(path, "images"), tree_bytes(path, "labels")
    tab_b = (path / "particles.parquet").stat().st_size
    print(f"set-up (deposited poses, mask volume): {setup_s:.2f} s")
    print(
        f"build: {n} particles in {build_s:.1f} s = {n / build_s:.0f} particles/s "
        f"(mask projection + reading the stacks + labels + Zarr write + commit; "
        f"label_partition in all {total_s:.1f} s with the row check)"
    )
    for name, seconds in labelled.stage_seconds.items():
        print(f"  {name:18s} {seconds:7.2f} s  {n / max(seconds, 1e-9):9.0f} particles/s")
    print(
        f"on disk: {(img_b + lab_b + tab_b) / n:.0f} bytes/particle = images "
        f"{img_b / n:.0f} ({img_b / (n * args.box**2 * np.dtype(args.dtype).itemsize):.3f} of "
        f"raw {args.dtype}) + labels {lab_b / n:.0f} + table {tab_b / n:.0f}; "
        f"{(img_b + lab_b + tab_b) / 1e6:.1f} MB, chunks of {ds.chunk_particles} particles "
        f"({ds.n_chunks} per array)"
    )
    quantisation = first.astype(np.float64)
    quantisation = (quantisation - quantisation.mean(axis=(1, 2), keepdims=True)) / (
        quantisation.std(axis=(1, 2), keepdims=True)
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

    figures: dict = {
        "particles": n,
        "setup_s": setup_s,
        "build_s": build_s,
        "build_particles_per_s": n / build_s,
        "stage_s": labelled.stage_seconds,
        "bytes_per_particle": (img_b + lab_b + tab_b) / n,
        "image_bytes_per_particle": img_b / n,
        "label_bytes_per_particle": lab_b / n,
        "table_bytes_per_particle": tab_b / n,
        "quantisation_max_error": float(err.max()),
        "read_particles_per_s": n / read_s,
    }
    if args.append:
        _, extra, _ = next(
            simulated_batches(
                density, args.append, args.append, 10_000, timer, "Particles/extra", project
            )
        )
        write_loop_blocks(
            stacks.particles_star, {"optics": optics, "particles": pd.concat([*rows, extra])}
        )
        started = time.perf_counter()
        grown = build.label_partition(
            stacks, refined, mask, corpus_root, root / "particle_masks",
            build.LabelOptions(batch=args.batch, append=True), key=args.id, dtype=args.dtype,
        )  # fmt: skip
        append_s = time.perf_counter() - started
        # the two ways to make the temporary version an append writes into
        location = Path(grown.location)
        started = time.perf_counter()
        _hardlink_tree(location, root / "linked.tmp")
        link_s = time.perf_counter() - started
        started = time.perf_counter()
        shutil.copytree(location, root / "copied.tmp")
        copy_s = time.perf_counter() - started
        files = sum(1 for f in (root / "linked.tmp").rglob("*") if f.is_file())
        shutil.rmtree(root / "linked.tmp")
        shutil.rmtree(root / "copied.tmp")
        print(
            f"append {grown.manifest.n_particles} particles to {n} (label_partition with append: "
            f"atomic, hard-link copy-on-write): {append_s:.2f} s in all; making the temporary "
            f"version: hard links {link_s:.3f} s vs full copy {copy_s:.2f} s ({files} files, "
            f"{tree_bytes(location) / 1e9:.2f} GB, page cache warm)"
        )
        figures.update({"append_s": append_s, "hardlink_s": link_s, "copy_s": copy_s})
    print(f"end: {load()}")
    figures["load_after"] = load()
    if args.json:
        write_results(
            args.json, "corpus_build", {k: str(v) for k, v in vars(args).items()}, figures
        )
        print(f"results: {args.json}")
    if args.root is None:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
