"""3D auto-refinement, reconstruction and pose errors with RELION (``relion_refine_mpi``)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from particleseg_model.em.geometry import euler_matrices
from particleseg_model.em.maps import (
    DensityMap,
    fourier_resample,
    load_map,
    make_mask,
    pad_or_crop,
    particle_diameter_px,
    write_mrc,
)
from particleseg_model.relion.runner import (
    LogTarget,
    RelionError,
    _read_blocks,
    run_relion,
)

__all__ = [
    "REFINE_DEFAULTS",
    "ReferenceGeometry",
    "Refinement",
    "auto_refine",
    "default_ini_lowpass_a",
    "pose_errors",
    "reconstruct",
    "reference_geometry",
    "summarise_pose_errors",
]


# ------------------------------------------------------------------------------ refinement


# Defaults of auto_refine (see its docstring for why they converge on simulated data): a few
# hundred particles at 64 px in minutes on 2 cores. ini_lowpass_a None: from the particle size.
REFINE_DEFAULTS: dict[str, Any] = {
    "ini_lowpass_a": None,
    "healpix_order": 2,
    "local_healpix_order": 4,
    "offset_range_px": 5.0,
    "offset_step_px": 2.0,
    "mpi_ranks": 3,
    "threads": 1,
    "pool_size": 10,
    "firstiter_cc": True,
    "norm_correction": True,
    "scale_correction": True,
    "flatten_solvent": True,
    "zero_mask": True,
    "low_resol_join_halves_a": 40.0,
}
# initial low-pass = particle diameter / LOWPASS_DIVISOR, within [LOWPASS_MIN_PX px, 60 A]
LOWPASS_DIVISOR = 4.0
LOWPASS_MIN_PX = 6.0
LOWPASS_MAX_A = 60.0


@dataclass(frozen=True)
class ReferenceGeometry:
    """Sizes taken from a reference map: the particle's diameter (largest extent of the map
    above its contour level, low-passed to 15 A, as :func:`~particleseg_model.maps.make_mask`
    thresholds it), the diameter of its MaskCreate-style mask (extended 3 px, soft edge 6 px,
    at mask level 0.5: RELION's ``--particle_diameter``), and the initial low-pass."""

    pixel_size_a: float
    body_diameter_a: float
    mask_diameter_a: float
    ini_lowpass_a: float


def default_ini_lowpass_a(diameter_a: float, pixel_size_a: float) -> float:
    """The initial low-pass for a particle of ``diameter_a``: a quarter of the diameter (four
    resolution elements across the particle, so the reference still shows its domains; 60 A
    for a 240 A ribosome as RELION's tutorial uses), at least 6 px (3x Nyquist), at most 60 A."""
    return float(
        min(max(diameter_a / LOWPASS_DIVISOR, LOWPASS_MIN_PX * pixel_size_a), LOWPASS_MAX_A)
    )


def reference_geometry(density: DensityMap) -> ReferenceGeometry:
    """:class:`ReferenceGeometry` of a map (its contour: the molecular volume when the map
    knows it, else :func:`~particleseg_model.maps.auto_threshold`). A map already low-passed
    far below its detail reads larger than the particle is."""
    pixel = density.pixel_size_a
    body, _ = make_mask(density, extend_px=0.0, soft_edge_px=0.0)
    mask, _ = make_mask(density)
    body_a = particle_diameter_px(body) * pixel
    mask_a = particle_diameter_px(mask) * pixel
    return ReferenceGeometry(
        pixel_size_a=pixel,
        body_diameter_a=body_a,
        mask_diameter_a=mask_a,
        ini_lowpass_a=default_ini_lowpass_a(body_a, pixel),
    )


@dataclass(frozen=True)
class Refinement:
    """What :func:`auto_refine` made: the refined particles (``data_star``), the final map
    (``map_path``: RELION's ``run_class001.mrc``), the unfiltered half maps, the model STAR, the
    final resolution (Angstrom, gold-standard FSC 0.143 without masking), the iterations run and
    the wall time. ``converged`` is False when ``max_iterations`` stopped it first: the paths are
    then those of the last iteration (``map_path`` the average of its half maps)."""

    data_star: Path
    map_path: Path
    half_maps: tuple[Path, Path]
    model_star: Path
    resolution_a: float
    iterations: int
    seconds: float
    particle_diameter_a: float
    ini_lowpass_a: float
    converged: bool
    command: tuple[str, ...]
    out_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)


def _particle_optics(particles_star: Path) -> tuple[float, int]:
    """(pixel size, box) of the particles from the STAR file's optics block."""
    blocks = _read_blocks(particles_star)
    optics = blocks.get("optics")
    if isinstance(optics, dict):
        optics = pd.DataFrame([optics])
    if optics is None or "rlnImagePixelSize" not in optics or "rlnImageSize" not in optics:
        raise ValueError(
            f"{particles_star}: needs a RELION 3.1 optics block with "
            "rlnImagePixelSize and rlnImageSize"
        )
    pixels = optics["rlnImagePixelSize"].astype(float).unique()
    boxes = optics["rlnImageSize"].astype(int).unique()
    if len(boxes) > 1:
        raise ValueError(f"{particles_star}: optics groups with different boxes {list(boxes)}")
    return float(pixels[0]), int(boxes[0])


def _match_reference(density: DensityMap, pixel: float, box: int) -> DensityMap:
    """The reference on the particles' grid (pixel size and box), by Fourier resampling and
    padding/cropping around the centre voxel."""
    data = density.data
    if abs(density.pixel_size_a - pixel) > 1e-3 * pixel:
        size = 2 * max(4, round(data.shape[0] * density.pixel_size_a / pixel / 2))
        data = fourier_resample(data, size)
    if data.shape[0] != box:
        data = pad_or_crop(data, box)
    return DensityMap(
        data=data, pixel_size_a=pixel, source=density.source, volume_a3=density.volume_a3
    )


def _final_resolution(lines: Sequence[str], model_star: Path) -> float:
    for line in reversed(lines):
        match = re.search(r"Final resolution.*?is:\s*([0-9.]+)", line)
        if match:
            return float(match.group(1))
    blocks = _read_blocks(model_star)
    general = blocks.get("model_general")
    if isinstance(general, pd.DataFrame):
        general = general.iloc[0].to_dict()
    if isinstance(general, dict) and "rlnCurrentResolution" in general:
        return float(general["rlnCurrentResolution"])
    raise ValueError(f"{model_star}: no rlnCurrentResolution in data_model_general")


def auto_refine(
    particles_star: str | os.PathLike,
    reference_map: str | os.PathLike | DensityMap,
    out_dir: str | os.PathLike,
    *,
    particle_diameter_a: float | None = None,
    ini_lowpass_a: float | None = REFINE_DEFAULTS["ini_lowpass_a"],
    symmetry: str = "C1",
    healpix_order: int = REFINE_DEFAULTS["healpix_order"],
    local_healpix_order: int = REFINE_DEFAULTS["local_healpix_order"],
    offset_range_px: float = REFINE_DEFAULTS["offset_range_px"],
    offset_step_px: float = REFINE_DEFAULTS["offset_step_px"],
    mpi_ranks: int = REFINE_DEFAULTS["mpi_ranks"],
    threads: int = REFINE_DEFAULTS["threads"],
    ctf: bool = True,
    pool_size: int = REFINE_DEFAULTS["pool_size"],
    firstiter_cc: bool = REFINE_DEFAULTS["firstiter_cc"],
    norm_correction: bool = REFINE_DEFAULTS["norm_correction"],
    scale_correction: bool = REFINE_DEFAULTS["scale_correction"],
    flatten_solvent: bool = REFINE_DEFAULTS["flatten_solvent"],
    zero_mask: bool = REFINE_DEFAULTS["zero_mask"],
    low_resol_join_halves_a: float | None = REFINE_DEFAULTS["low_resol_join_halves_a"],
    solvent_mask: str | os.PathLike | None = None,
    preread_images: bool = True,
    random_seed: int | None = 0,
    max_iterations: int | None = None,
    project_dir: str | os.PathLike | None = None,
    extra_args: Sequence[str] = (),
    log: LogTarget = None,
    timeout_s: float | None = None,
) -> Refinement:
    """3D auto-refine (gold-standard, split random halves) of ``particles_star`` from
    ``reference_map``, under ``mpirun -n mpi_ranks relion_refine_mpi``.

    The defaults (:data:`REFINE_DEFAULTS`) are RELION's GUI choices for a refinement from a
    reference that is not on the particles' grey scale, with the initial low-pass and mask
    taken from the reference (measured on simulated data, ``benchmarks/refine_accuracy.py``):

    - ``--ini_high`` = :func:`default_ini_lowpass_a`: a quarter of the particle diameter
      (:func:`reference_geometry`), 18-60 A for the demo maps. A fixed 40-60 A fails on small
      particles: a 74 A particle at 2.4 A/px low-passed to 40 A is a featureless blob and
      the first iterations assign random poses that never recover (median error 110 deg at
      40 A and 30 A, converging at 20 A);
    - ``--firstiter_cc``: the first iteration scores by cross-correlation, since the reference
      is not on the absolute grey scale of the normalised particles; later ones are ML;
    - ``--healpix_order 2`` (15 degrees, 7.5 after oversampling) global searches, local ones
      from ``--auto_local_healpix_order 4`` (3.75 degrees) on, RELION's default. The global
      3.75-degree iterations are most of the run time (about 80%); ``local_healpix_order=3``
      is about 5x faster but leaves about 10% of the particles in a wrong view (EMD-1832,
      400 particles at 64 px: 87% vs 96% within 5 degrees);
    - ``--offset_range 5 --offset_step 2`` pixels: simulated and picked particles sit within
      a few pixels of the box centre; oversampling halves the step and auto-refine refines it;
    - ``--flatten_solvent --zero_mask`` with ``--particle_diameter`` the diameter of the
      reference's MaskCreate-style mask: noise and ice texture outside the particle do not
      pull the alignment;
    - ``--norm --scale`` (GUI default), ``--low_resol_join_halves 40`` (the halves share the
      low resolution so that they do not diverge into different hands or positions),
      ``--pad 2``, ``--dont_combine_weights_via_disc``, ``--preread_images`` (small sets).

    Input origins (``rlnOriginX/YAngst``) are the centre of RELION's offset search: strip them
    (and the angles) from a STAR whose poses must not leak into the test.

    Args:
        particles_star: RELION 3.1 particle STAR (optics with pixel size and box; CTF columns
            when ``ctf``); image names relative to ``project_dir`` (default: the STAR file's
            directory, as :func:`extract_particles` writes it).
        reference_map: a map file or :class:`~particleseg_model.maps.DensityMap`, in the frame
            the poses should come out in.
        out_dir: output directory (created); files ``run_*`` as RELION names them.
        particle_diameter_a: RELION's mask diameter; default from the reference's mask.
        ini_lowpass_a: ``--ini_high``; default :func:`default_ini_lowpass_a` of the reference.
        solvent_mask: a mask for the references and the FSC (``--solvent_mask
            --solvent_correct_fsc``); default RELION's spherical mask.
        log: where RELION's output lines go (see :func:`run_relion`).
        random_seed: ``--random_seed`` (the random half split and noise); the default 0 makes
            a rerun reproducible, None lets RELION seed from the clock.
        max_iterations: ``--auto_iter_max`` (stop there even if not converged).
    Returns:
        :class:`Refinement` with the paths of ``run_data.star``, ``run_class001.mrc``, ...
    Raises:
        RelionError: the refinement failed or ran past ``timeout_s``.
    """
    if mpi_ranks < 3:
        raise ValueError(
            "auto-refine with split random halves needs at least 3 MPI ranks "
            f"(a leader and one per half), got {mpi_ranks}"
        )
    particles_star = Path(particles_star).resolve()
    if not particles_star.is_file():
        raise FileNotFoundError(f"{particles_star}: particle STAR file not found")
    project = Path(project_dir).resolve() if project_dir else particles_star.parent
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pixel, box = _particle_optics(particles_star)
    density = reference_map if isinstance(reference_map, DensityMap) else load_map(reference_map)
    density = _match_reference(density, pixel, box)
    reference = write_mrc(out / "reference.mrc", density.data, pixel)
    if particle_diameter_a is None or ini_lowpass_a is None:
        geometry = reference_geometry(density)
        if particle_diameter_a is None:
            particle_diameter_a = geometry.mask_diameter_a
        if ini_lowpass_a is None:
            ini_lowpass_a = geometry.ini_lowpass_a
    diameter = float(min(particle_diameter_a, (box - 2) * pixel))
    command = [
        "relion_refine",
        "--o",
        str(out / "run"),
        "--auto_refine",
        "--split_random_halves",
        "--i",
        str(particles_star),
        "--ref",
        str(reference),
        "--ini_high",
        f"{ini_lowpass_a:g}",
        "--particle_diameter",
        f"{diameter:.1f}",
        "--sym",
        symmetry,
        "--healpix_order",
        str(healpix_order),
        "--auto_local_healpix_order",
        str(local_healpix_order),
        "--offset_range",
        f"{offset_range_px:g}",
        "--offset_step",
        f"{offset_step_px:g}",
        "--oversampling",
        "1",
        "--pad",
        "2",
        "--j",
        str(threads),
        "--pool",
        str(pool_size),
        "--dont_combine_weights_via_disc",
    ]
    if preread_images:
        command.append("--preread_images")
    if random_seed is not None:
        command += ["--random_seed", str(int(random_seed))]
    if ctf:
        command.append("--ctf")
    if firstiter_cc:
        command.append("--firstiter_cc")
    if norm_correction:
        command.append("--norm")
    if scale_correction:
        command.append("--scale")
    if flatten_solvent:
        command.append("--flatten_solvent")
    if zero_mask:
        command.append("--zero_mask")
    if low_resol_join_halves_a:
        command += ["--low_resol_join_halves", f"{low_resol_join_halves_a:g}"]
    if solvent_mask is not None:
        command += ["--solvent_mask", str(Path(solvent_mask).resolve()), "--solvent_correct_fsc"]
    if max_iterations is not None:
        command += ["--auto_iter_max", str(int(max_iterations))]
    command += [str(a) for a in extra_args]
    run = run_relion(
        command,
        cwd=project,
        log=log,
        mpi=mpi_ranks,
        transcript=out / "run.log",
        timeout_s=timeout_s,
    )
    data_star, map_path = out / "run_data.star", out / "run_class001.mrc"
    model_star = out / "run_model.star"
    half_maps = (out / "run_half1_class001_unfil.mrc", out / "run_half2_class001_unfil.mrc")
    done = sorted(out.glob("run_it[0-9][0-9][0-9]_data.star"))
    iterations = max(0, len(done) - 1)  # it000 is the input
    converged = data_star.is_file() and map_path.is_file()
    if not converged:
        if max_iterations is None or not done:
            raise RelionError(
                f"relion_refine finished without {data_star.name} / "
                f"{map_path.name} in {out}; see {out / 'run.log'}",
                command=run.command,
                cwd=project,
            )
        last = done[-1].name[: len("run_itNNN")]
        data_star = out / f"{last}_data.star"
        model_star = out / f"{last}_half1_model.star"
        half_maps = (out / f"{last}_half1_class001.mrc", out / f"{last}_half2_class001.mrc")
        halves = [load_map(h).data for h in half_maps]
        map_path = write_mrc(
            out / f"{last}_class001_average.mrc", (halves[0] + halves[1]) / 2, pixel
        )
    settings = {
        "ini_lowpass_a": ini_lowpass_a,
        "symmetry": symmetry,
        "healpix_order": healpix_order,
        "local_healpix_order": local_healpix_order,
        "offset_range_px": offset_range_px,
        "offset_step_px": offset_step_px,
        "mpi_ranks": mpi_ranks,
        "threads": threads,
        "ctf": ctf,
        "firstiter_cc": firstiter_cc,
        "norm": norm_correction,
        "scale": scale_correction,
        "flatten_solvent": flatten_solvent,
        "zero_mask": zero_mask,
        "low_resol_join_halves_a": low_resol_join_halves_a,
        "pool_size": pool_size,
        "random_seed": random_seed,
    }
    resolution = _final_resolution(run.stdout_tail if converged else [], model_star)
    return Refinement(
        data_star=data_star,
        map_path=map_path,
        half_maps=half_maps,
        model_star=model_star,
        resolution_a=resolution,
        iterations=iterations,
        seconds=run.seconds,
        particle_diameter_a=diameter,
        ini_lowpass_a=float(ini_lowpass_a),
        converged=converged,
        command=tuple(run.command),
        out_dir=out,
        settings=settings,
    )


def reconstruct(
    particles_star: str | os.PathLike,
    out_map: str | os.PathLike,
    *,
    ctf: bool = True,
    symmetry: str = "C1",
    max_resolution_a: float | None = None,
    project_dir: str | os.PathLike | None = None,
    log: LogTarget = None,
    timeout_s: float | None = None,
) -> Path:
    """A map from the particles at their poses (``relion_reconstruct``): a quick check of a
    pose set. ``max_resolution_a`` limits it (``--maxres``)."""
    particles_star = Path(particles_star).resolve()
    if not particles_star.is_file():
        raise FileNotFoundError(f"{particles_star}: particle STAR file not found")
    project = Path(project_dir).resolve() if project_dir else particles_star.parent
    out_map = Path(out_map).resolve()
    out_map.parent.mkdir(parents=True, exist_ok=True)
    command = [
        "relion_reconstruct",
        "--i",
        str(particles_star),
        "--o",
        str(out_map),
        "--sym",
        symmetry,
    ]
    if ctf:
        command.append("--ctf")
    if max_resolution_a is not None:
        command += ["--maxres", f"{max_resolution_a:g}"]
    run_relion(command, cwd=project, log=log, timeout_s=timeout_s)
    if not out_map.is_file():
        raise RelionError(f"relion_reconstruct wrote no {out_map}", command=command, cwd=project)
    return out_map


# ------------------------------------------------------------------------------ pose accuracy


def _key(table: pd.DataFrame, on: Sequence[str]) -> pd.Series:
    missing = [c for c in on if c not in table]
    if missing:
        raise KeyError(f"pose table lacks the matching columns {missing}")
    parts = []
    for column in on:
        values = table[column]
        if pd.api.types.is_numeric_dtype(values):
            values = values.astype(float).round(3).map(repr)
        else:
            values = values.astype(str).str.strip()
        parts.append(values)
    key = parts[0]
    for extra in parts[1:]:
        key = key + "|" + extra
    return key


def pose_errors(
    refined: pd.DataFrame, truth: pd.DataFrame, on: str | Sequence[str] = "image_name"
) -> pd.DataFrame:
    """Per-particle pose errors of ``refined`` against ``truth`` (both with rot_deg, tilt_deg,
    psi_deg, origin_x_a, origin_y_a: the canonical table of :func:`~particleseg_model.star.
    read_star`, or a simulator ground-truth table), matched on ``on`` (default the image
    name; e.g. ``("micrograph_name", "coordinate_x_px", "coordinate_y_px")`` for particles
    extracted from simulated micrographs). Rows of ``truth`` without a pose (NaN: junk) and
    rows without a match are left out.

    Returns a table indexed like the matched ``refined`` rows with the key columns and
    ``angle_error_deg`` (rotation angle of ``R_refined^T R_true``, RELION ZYZ Euler matrices,
    0..180), ``shift_error_a`` (distance between the origins, Angstrom), ``shift_x_a``,
    ``shift_y_a`` (refined minus true).
    """
    keys = [on] if isinstance(on, str) else list(on)
    columns = ["rot_deg", "tilt_deg", "psi_deg", "origin_x_a", "origin_y_a"]
    for name, table in (("refined", refined), ("truth", truth)):
        missing = [c for c in columns if c not in table]
        if missing:
            raise KeyError(f"{name} table lacks pose columns {missing}")
    true = truth[columns].astype(float)
    true = true[np.isfinite(true.to_numpy()).all(axis=1)]
    true_key = _key(truth.loc[true.index], keys)
    if true_key.duplicated().any():
        raise ValueError(
            f"truth has duplicate keys on {keys}, e.g. {true_key[true_key.duplicated()].iloc[0]!r}"
        )
    lookup = pd.Series(np.arange(len(true)), index=true_key.to_numpy())
    ref_key = _key(refined, keys)
    found = ref_key.isin(lookup.index).to_numpy()
    ref = refined.loc[found, columns].astype(float)
    rows = lookup.loc[ref_key[found].to_numpy()].to_numpy()
    t = true.iloc[rows]
    r_ref = euler_matrices(*(ref[c].to_numpy() for c in ("rot_deg", "tilt_deg", "psi_deg")))
    r_true = euler_matrices(*(t[c].to_numpy() for c in ("rot_deg", "tilt_deg", "psi_deg")))
    trace = np.einsum("nji,nji->n", r_ref, r_true)  # trace(R_ref^T R_true)
    angle = np.degrees(np.arccos(np.clip((trace - 1) / 2, -1.0, 1.0)))
    dx = ref["origin_x_a"].to_numpy() - t["origin_x_a"].to_numpy()
    dy = ref["origin_y_a"].to_numpy() - t["origin_y_a"].to_numpy()
    out = refined.loc[found, keys].copy()
    out["angle_error_deg"] = angle
    out["shift_error_a"] = np.hypot(dx, dy)
    out["shift_x_a"] = dx
    out["shift_y_a"] = dy
    return out


def summarise_pose_errors(errors: pd.DataFrame, within_deg: float = 5.0) -> dict[str, float]:
    """Summary of a :func:`pose_errors` table: ``n_particles``, ``median_angle_error_deg``,
    ``mean_angle_error_deg``, ``fraction_within_deg`` (share with an angular error of at most
    ``within_deg``, recorded too), ``median_shift_error_a``, ``mean_shift_error_a``."""
    angle = errors["angle_error_deg"].to_numpy(dtype=float)
    shift = errors["shift_error_a"].to_numpy(dtype=float)
    n = len(errors)
    nan = math.nan
    return {
        "n_particles": float(n),
        "median_angle_error_deg": float(np.median(angle)) if n else nan,
        "mean_angle_error_deg": float(np.mean(angle)) if n else nan,
        "within_deg": float(within_deg),
        "fraction_within_deg": float(np.mean(angle <= within_deg)) if n else nan,
        "median_shift_error_a": float(np.median(shift)) if n else nan,
        "mean_shift_error_a": float(np.mean(shift)) if n else nan,
    }
