"""How well RELION 3D auto-refine recovers known poses, and what that costs the labels.

Simulates good particles (no junk) with known poses from a map
(particleseg_model.simulation.simulate), writes them as a RELION project *without* their poses
(angles and origins removed, so the refinement starts from nothing but the reference), runs
:func:`particleseg_model.relion. auto_refine` with its defaults from the map low-passed to
``--lowpass`` Angstrom, and prints:

- wall time, iterations and the final (gold-standard, unmasked) resolution;
- median angular error (angle of R_refined^T R_true), share of particles within 5 degrees,
  median shift error (Angstrom) against the ground truth;
- the label IoU of refined against true poses: the MaskCreate-style mask of the map
  (``maps.make_mask``, as the demo archive makes it) projected at both pose sets
  (``simulate.FourierProjector``, origins in pixels, RELION sign) and labelled by the
  particleSeg rule (signal = projection > 10, edge = 11x11 square dilation minus signal;
  0 background, 1 signal, 2 edge); one confusion matrix over all pixels, per-class IoU and
  their mean. That is the ceiling for any model trained on labels made from refined poses.

Refinement is CPU-heavy (3 MPI ranks on the machine's cores): keep it to a few hundred
particles at 64 px. ``uptime`` load is printed before and after, since the CPU may be shared.

    .venv/bin/python benchmarks/refine_accuracy.py [--particles 400] [--box 64] [--snr 0.1]
        [--map FILE|generated:SHAPE] [--lowpass A] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from particleseg_model.em.maps import (
    DensityMap,
    lowpass,
    make_mask,
    particle_diameter_px,
    write_mrc,
)
from particleseg_model.em.star import read_star
from particleseg_model.relion import (
    auto_refine,
    pose_errors,
    reference_geometry,
    relion_available,
    summarise_pose_errors,
)
from particleseg_model.simulation.demo_archive import (
    MASK_EXTEND_PX,
    MASK_LOWPASS_A,
    MASK_SOFT_EDGE_PX,
    MapSource,
    default_maps,
    find_shared_data,
    write_star,
)
from particleseg_model.simulation.simulate import (
    FourierProjector,
    SimulationConfig,
    simulate_particles,
)

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


def labels_from_projection(
    projections: np.ndarray, threshold: float = 10.0, edge_px: int = 11
) -> np.ndarray:
    """The particleSeg label rule; particleseg_model.corpus.labels' version when it exists."""
    try:
        from particleseg_model.corpus.labels import labels_from_projection as shared
    except ImportError:
        shared = None
    if shared is not None:
        return shared(projections, threshold=threshold, edge_px=edge_px)
    from scipy import ndimage

    signal = projections > threshold
    structure = np.zeros((1, edge_px, edge_px), dtype=bool) if signal.ndim == 3 else None
    if structure is not None:
        structure[0] = True
    else:
        structure = np.ones((edge_px, edge_px), dtype=bool)
    dilated = ndimage.binary_dilation(signal, structure=structure)
    labels = np.zeros(projections.shape, dtype=np.uint8)
    labels[dilated & ~signal] = 2
    labels[signal] = 1
    return labels


def label_iou(
    predicted: np.ndarray, reference: np.ndarray, n_classes: int = 3
) -> tuple[float, np.ndarray]:
    """Mean and per-class IoU from one confusion matrix over all pixels."""
    confusion = np.bincount(
        reference.ravel().astype(np.int64) * n_classes + predicted.ravel().astype(np.int64),
        minlength=n_classes * n_classes,
    ).reshape(n_classes, n_classes)
    inter = np.diag(confusion).astype(float)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), iou


def project_labels(
    projector: FourierProjector, table: pd.DataFrame, pixel: float, chunk: int = 256
) -> np.ndarray:
    out = []
    for start in range(0, len(table), chunk):
        part = table.iloc[start : start + chunk]
        proj = projector.project(
            part["rot_deg"].to_numpy(),
            part["tilt_deg"].to_numpy(),
            part["psi_deg"].to_numpy(),
            part["origin_x_a"].to_numpy() / pixel,
            part["origin_y_a"].to_numpy() / pixel,
        )
        out.append(labels_from_projection(proj))
    return np.concatenate(out)


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=400)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument(
        "--map",
        default=None,
        help="map file or generated:SHAPE (default: the demo archive's first "
        "map: EMD-1832 from ../shared/data/maps when present, else "
        "generated:globular)",
    )
    parser.add_argument(
        "--lowpass",
        type=float,
        default=None,
        help="low-pass of the reference and --ini_high, Angstrom (default: "
        "auto_refine's, a quarter of the particle diameter)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mpi", type=int, default=3)
    parser.add_argument("--max-iterations", type=int, default=None)
    parser.add_argument(
        "--local-healpix-order",
        type=int,
        default=None,
        help="healpix order from which searches are local (default: "
        "auto_refine's, 3 = 7.5 degrees)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep the project and refinement here (default: a temporary dir)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo RELION's output")
    args = parser.parse_args()
    if not relion_available("relion_refine_mpi"):
        print(
            "RELION (relion_refine_mpi) is not on PATH: apt-get install -y relion", file=sys.stderr
        )
        return 2

    print(f"load before: {load()} ({os.cpu_count()} cores)")
    started = time.perf_counter()
    source = MapSource.parse(args.map) if args.map else default_maps(find_shared_data())[0]
    density = source.load(args.box, args.seed)
    pixel, box = density.pixel_size_a, density.box
    mask, threshold = make_mask(
        density, lowpass_a=MASK_LOWPASS_A, extend_px=MASK_EXTEND_PX, soft_edge_px=MASK_SOFT_EDGE_PX
    )
    diameter_px = particle_diameter_px(mask)
    config = SimulationConfig(n_particles=args.particles, junk_fraction=0.0, snr=args.snr)
    sim = simulate_particles(
        density, config, seed=args.seed, diameter_px=diameter_px, keep_clean=False
    )
    print(
        f"simulated {len(sim.truth)} good particles, box {box}, pixel {pixel:.3f} A, "
        f"SNR {args.snr:g}, map {source.label} "
        f"({time.perf_counter() - started:.1f} s)"
    )

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="refine_accuracy."))
    if args.keep and root.exists():
        shutil.rmtree(root)
    project = root / "project"
    try:
        stack = "Particles/particles_001.mrcs"
        write_mrc(project / stack, sim.images, pixel, stack=True)
        star = sim.star.drop(columns=list(POSE_COLUMNS))  # refinement must find the poses
        write_star(project / "particles.star", {"optics": sim.optics, "particles": star})
        geometry = reference_geometry(density)
        cutoff = args.lowpass if args.lowpass is not None else geometry.ini_lowpass_a
        # the reference: the true map low-passed (its volume kept for the contour level)
        reference = DensityMap(
            data=lowpass(density.data, pixel, cutoff),
            pixel_size_a=pixel,
            source=f"{density.source} low-passed to {cutoff:.1f} A",
            volume_a3=density.volume_a3,
        )
        write_mrc(root / "reference.mrc", reference.data, pixel)

        def echo(line: str) -> None:
            if not args.quiet:
                print(f"  | {line}", flush=True)

        options = (
            {}
            if args.local_healpix_order is None
            else {"local_healpix_order": args.local_healpix_order}
        )
        refine = auto_refine(
            project / "particles.star",
            reference,
            root / "refine",
            ini_lowpass_a=cutoff,
            mpi_ranks=args.mpi,
            max_iterations=args.max_iterations,
            log=echo,
            **options,
        )
        refined = read_star(refine.data_star).particles
        errors = pose_errors(refined, sim.truth)
        summary = summarise_pose_errors(errors, within_deg=5.0)

        projector = FourierProjector(mask)
        truth = sim.truth.set_index("image_name").loc[errors["image_name"]].reset_index()
        ref_rows = refined.set_index("image_name").loc[errors["image_name"]].reset_index()
        true_labels = project_labels(projector, truth, pixel)
        refined_labels = project_labels(projector, ref_rows, pixel)
        miou, per_class = label_iou(refined_labels, true_labels)

        mean_dx = float(errors["shift_x_a"].mean())
        mean_dy = float(errors["shift_y_a"].mean())
        print()
        print(
            f"particles {len(sim.truth)}, box {box} px, pixel {pixel:.3f} A, SNR {args.snr:g}, "
            f"particle diameter {geometry.body_diameter_a:.1f} A, reference low-passed to "
            f"{cutoff:.1f} A (--ini_high), mask diameter {refine.particle_diameter_a:.1f} A"
        )
        state = "converged" if refine.converged else "NOT converged: stopped"
        print(
            f"refinement wall time      {refine.seconds:8.1f} s  ({state} after "
            f"{refine.iterations} iterations, {args.mpi} MPI ranks)"
        )
        print(
            f"final resolution          {refine.resolution_a:8.2f} A  (Nyquist {2 * pixel:.2f} A)"
        )
        print(
            f"median angular error      {summary['median_angle_error_deg']:8.2f} deg  (mean "
            f"{summary['mean_angle_error_deg']:.2f})"
        )
        print(f"within 5 degrees          {100 * summary['fraction_within_deg']:8.1f} %")
        print(
            f"median shift error        {summary['median_shift_error_a']:8.2f} A  "
            f"({summary['median_shift_error_a'] / pixel:.2f} px; mean offset "
            f"{mean_dx:+.2f}, {mean_dy:+.2f} A)"
        )
        print(
            f"label IoU refined vs true poses (ceiling for any model trained on this "
            f"corpus): mean {miou:.4f}; background {per_class[0]:.4f}, signal "
            f"{per_class[1]:.4f}, edge {per_class[2]:.4f}"
        )
        print(
            f"total wall time           {time.perf_counter() - started:8.1f} s; load after: "
            f"{load()}"
        )
        if args.keep:
            errors.to_csv(root / "pose_errors.csv", index=False)
            print(f"kept in {root}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
