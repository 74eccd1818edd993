"""Mask projections per second: our projector vs one ``relion_project --ang`` vs one
``relion_project`` process per particle (the original particleSeg), and the label agreement.

All three project the same mask at the same random poses with origins, in one run:

- ours: :func:`particleseg_model.corpus.projection.project_masks` (band-limited, threaded,
streamed), set-up
  (calibration and the low-frequency padded transform) included; a second pass adds the labels
  and compares them with the labels of RELION's projections, under ``tracemalloc`` (peak memory);
- ``relion_project --i mask.mrc --ang poses.star`` as one process (its wall time; it also writes
  its stack to disk, as the reference backend must);
- one ``relion_project --rot --tilt --psi --xoff --yoff`` process per particle: a sample of
  ``--per-particle-sample`` particles timed and extrapolated to ``--n``.

The mask is the MaskCreate-style mask of EMD-1832 (``../shared/data/maps/emd_1832.map``)
resampled so that the particle spans 55% of the box (``maps.prepare_map`` + ``maps.make_mask``),
or of a generated map when the shared data is absent. Other work on the machine slows every
column alike; the load average is printed before and after.

    .venv/bin/python benchmarks/projection_speed.py [--n 10000] [--box 256]
        [--per-particle-sample 5] [--band auto|full|N] [--batch 64] [--workers 2] [--map FILE]
        [--json PATH]

The figures also go to ``--json`` (default ``docs/results/projection_speed.json``), beside the
table they feed in ``docs/projection.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
from results import REPO, RESULTS_DIR, write_results

from particleseg_model.corpus.labels import labels_from_projection
from particleseg_model.corpus.projection import (
    MaskProjector,
    particle_poses,
    project_masks,
    project_with_relion,
    project_with_relion_per_particle,
    write_pose_star,
)
from particleseg_model.em.geometry import random_euler
from particleseg_model.em.maps import generate_map, load_map, make_mask, prepare_map, write_mrc

RESULTS = RESULTS_DIR / "projection_speed.json"
DEFAULT_MAP = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "maps" / "emd_1832.map"
)


def _pipeline_peak_rss(
    mask_path: str, table_path: str, band, batch: int, workers: int, queue
) -> None:
    """In a fresh process: read the mask, project and label every particle, report the
    process's peak RSS (MiB): what a labelling job holds, without this benchmark's extras."""
    from particleseg_model.em.maps import load_map

    density = load_map(mask_path)
    table = pd.read_pickle(table_path)
    count = 0
    for projections in project_masks(
        density.data,
        table,
        pixel_size_a=density.pixel_size_a,
        band=band,
        batch=batch,
        workers=workers,
    ):
        count += int(labels_from_projection(projections).shape[0])
    queue.put((count, _vm_hwm_mb()))


def _vm_hwm_mb() -> float:
    """This process's peak resident memory (MiB) since its exec: VmHWM from /proc (ru_maxrss
    would carry over the forking parent's peak across exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="particles (default 10000)")
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument(
        "--per-particle-sample",
        type=int,
        default=5,
        help="relion_project processes timed for the per-particle column",
    )
    parser.add_argument("--band", default="auto", help="auto, full, or a number")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--map",
        type=Path,
        default=None,
        help=f"map to mask (default {DEFAULT_MAP} if present, else generated)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS,
        help=f"write the figures here as JSON (default {RESULTS.relative_to(REPO)})",
    )
    args = parser.parse_args()
    n, box = args.n, args.box
    band = None if args.band == "full" else (args.band if args.band == "auto" else int(args.band))
    relion = shutil.which("relion_project")

    print(f"before: {load_text()}")
    source = args.map or (DEFAULT_MAP if DEFAULT_MAP.is_file() else None)
    started = time.perf_counter()
    density = (
        prepare_map(load_map(source), box)
        if source
        else generate_map("globular", box, seed=args.seed)
    )
    mask, level = make_mask(density)
    pixel = density.pixel_size_a
    print(
        f"mask: {source or 'generated globular map'} -> box {box}, {pixel:.4f} A/px, "
        f"threshold {level:.3g}, made in {time.perf_counter() - started:.1f} s"
    )

    rng = np.random.default_rng(args.seed)
    rot, tilt, psi = random_euler(rng, n)
    origins = rng.uniform(-0.04 * box, 0.04 * box, (n, 2))  # up to 4% of the box, in px
    table = pd.DataFrame(
        {
            "image_name": [f"{i + 1}@Extract/particles.mrcs" for i in range(n)],
            "rot_deg": rot,
            "tilt_deg": tilt,
            "psi_deg": psi,
            "origin_x_a": origins[:, 0] * pixel,
            "origin_y_a": origins[:, 1] * pixel,
            "pixel_size_a": pixel,
            "image_size_px": box,
        }
    )
    print(f"{n} random poses (uniform on SO(3)), origins uniform within +-{0.04 * box:.1f} px")

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="projection_speed_") as tmp:
        work = Path(tmp)
        write_mrc(work / "mask.mrc", mask, pixel)
        write_pose_star(work / "poses.star", table, pixel_size_a=pixel, box=box)

        # --- one relion_project --ang process
        if relion:
            t0 = time.perf_counter()
            stack_path = project_with_relion(
                work / "mask.mrc", work / "poses.star", work / "relion.mrcs"
            )
            results["relion_s"] = time.perf_counter() - t0
            # ru_maxrss of the children so far (KiB on Linux): relion_project's own peak
            results["relion_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

        # --- ours: projection only (set-up included), timed without tracemalloc
        t0 = time.perf_counter()
        projector = MaskProjector(
            mask, pixel_size_a=pixel, box=box, band=band, workers=args.workers
        )
        results["setup_s"] = time.perf_counter() - t0
        done = 0
        for batch in project_masks(
            mask, table, pixel_size_a=pixel, batch=args.batch, projector=projector
        ):
            done += len(batch)
        results["ours_s"] = time.perf_counter() - t0
        assert done == n

        # --- ours with the labels (what a labelling job does), timed
        t0 = time.perf_counter()
        projector = MaskProjector(
            mask, pixel_size_a=pixel, box=box, band=band, workers=args.workers
        )
        for batch in project_masks(
            mask, table, pixel_size_a=pixel, batch=args.batch, projector=projector
        ):
            labels_from_projection(batch)
        results["ours_with_labels_s"] = time.perf_counter() - t0

        # --- ours again, with labels and the comparison, under tracemalloc
        tracemalloc.start()
        t0 = time.perf_counter()
        projector = MaskProjector(
            mask, pixel_size_a=pixel, box=box, band=band, workers=args.workers
        )
        same = np.zeros(n)
        signal_both = signal_any = 0
        reference = None
        if relion:
            reference = mrcfile.mmap(stack_path, mode="r").data
        start = 0
        for batch in project_masks(
            mask, table, pixel_size_a=pixel, batch=args.batch, projector=projector
        ):
            ours_labels = labels_from_projection(batch)
            if reference is not None:
                theirs = labels_from_projection(np.asarray(reference[start : start + len(batch)]))
                same[start : start + len(batch)] = (ours_labels == theirs).mean(axis=(1, 2))
                signal_both += int(np.count_nonzero((ours_labels == 1) & (theirs == 1)))
                signal_any += int(np.count_nonzero((ours_labels == 1) | (theirs == 1)))
            start += len(batch)
        results["ours_labels_s"] = time.perf_counter() - t0
        results["ours_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        del reference

        # --- ours in a fresh process: peak RSS of a project + label job
        table.to_pickle(work / "table.pkl")
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(
            target=_pipeline_peak_rss,
            args=(
                str(work / "mask.mrc"),
                str(work / "table.pkl"),
                band,
                args.batch,
                args.workers,
                queue,
            ),
        )
        child.start()
        count, results["ours_rss_mb"] = queue.get()
        child.join()
        assert count == n

        # --- one relion_project process per particle, a sample extrapolated
        if relion and args.per_particle_sample > 0:
            poses = particle_poses(table)
            k = min(args.per_particle_sample, n)
            t0 = time.perf_counter()
            project_with_relion_per_particle(
                work / "mask.mrc", poses, pixel_size_a=pixel, indices=range(k), workdir=work
            )
            results["per_particle_s"] = (time.perf_counter() - t0) / k * n
            results["per_particle_k"] = k

    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"after: {load_text()}")
    print()
    print(
        f"ours: band {projector.band} of {box // 2} (Nyquist), "
        f"{projector.samples_per_projection} Fourier samples per projection, "
        f"{args.workers} threads, batches of {args.batch}; calibration (band: mismatched "
        "labelled pixels on the axis views) "
        + ", ".join(f"{b}: {v:.2%}" for b, v in projector.calibration.items())
    )

    def rate(seconds: float) -> str:
        return f"{n / seconds:8.1f} /s  ({seconds:8.1f} s for {n})"

    ours = results["ours_s"]
    print(f"{'method':44s} {'throughput':>30s} {'ours is':>10s}")
    print(f"{'ours (set-up included)':44s} {rate(ours):>30s}")
    print(
        f"{'ours (after the ' + format(results['setup_s'], '.2f') + ' s set-up)':44s} "
        f"{rate(ours - results['setup_s']):>30s}"
    )
    print(f"{'ours + labels (set-up included)':44s} {rate(results['ours_with_labels_s']):>30s}")
    print(
        f"{'ours + labels + RELION labels + comparison':44s} "
        f"{rate(results['ours_labels_s']):>30s}  (tracemalloc on)"
    )
    if "relion_s" in results:
        r = results["relion_s"]
        print(f"{'relion_project --ang, one process':44s} {rate(r):>30s} {r / ours:9.1f}x")
    if "per_particle_s" in results:
        p = results["per_particle_s"]
        print(
            f"{'relion_project per particle (' + str(results['per_particle_k']) + ' timed)':44s}"
            f" {rate(p):>30s} {p / ours:9.1f}x"
        )
    if not relion:
        print("relion_project not found: RELION columns and label agreement skipped")
    else:
        print(
            f"labels (threshold 10, edge 11), ours vs relion_project --ang: "
            f"{same.mean():.4%} of pixels identical; worst particle {same.min():.4%}; "
            f"signal IoU {signal_both / max(signal_any, 1):.5f}"
        )
    print(
        f"peak memory: ours {results['ours_peak_mb']:.0f} MiB allocated (tracemalloc: "
        f"projector set-up + streaming + labels); a fresh process reading the mask, "
        f"projecting and labelling all {n}: max RSS {results['ours_rss_mb']:.0f} MiB"
        + (f"; relion_project --ang: max RSS {results['relion_rss_mb']:.0f} MiB" if relion else "")
        + f" (this benchmark process: {self_rss:.0f} MiB, with the mask making and the "
        "memory-mapped RELION stack)"
    )
    figures = {
        "n": n,
        "box": box,
        "pixel_size_a": float(pixel),
        "mask": str(source or "generated globular map"),
        "band": projector.band,
        "samples_per_projection": projector.samples_per_projection,
        "calibration": {str(b): float(v) for b, v in projector.calibration.items()},
        "workers": args.workers,
        "batch": args.batch,
        "ours_per_s": n / ours,
        "ours_after_setup_per_s": n / (ours - results["setup_s"]),
        "ours_with_labels_per_s": n / results["ours_with_labels_s"],
        **({"relion_per_s": n / results["relion_s"]} if "relion_s" in results else {}),
        **(
            {"per_particle_per_s": n / results["per_particle_s"]}
            if "per_particle_s" in results
            else {}
        ),
        **(
            {
                "labels_identical": float(same.mean()),
                "labels_identical_worst_particle": float(same.min()),
                "signal_iou": signal_both / max(signal_any, 1),
            }
            if relion
            else {}
        ),
        "timings": results,
        "load_after": load_text(),
    }
    write_results(args.json, "projection_speed", vars(args), figures)
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
