"""RELION 2D classification (``relion_refine`` without a reference) of a particle STAR file.

:func:`classify_2d` runs ``relion_refine --K K`` (no ``--ref``: RELION starts from random
class averages of the data), CTF on, and writes into one output folder:

- ``particles_classified.star``: every particle of the input with ``rlnClassNumber``, in the
  *input's* RELION flavour (3.0 stays 3.0, 3.1 stays 3.1, 5.0 keeps its stamp), every other
  column and block as read, image names as in the input (relative to the same folder);
- ``class_averages.mrcs``: the K class averages of the last iteration (RELION's
  ``_classes.mrcs``), class k the k-th image;
- ``classes.csv``: one row per class, largest first: ``class``, ``particles``, ``share``,
  ``resolution_a`` (RELION's ``rlnEstimatedResolution``, Angstrom), ``distribution``
  (``rlnClassDistribution``) and, where ground truth is given, ``good`` (truly good particles)
  and ``good_share``;
- ``class_averages.png``: every class average with its class number and particle count (and
  good share where known), sorted by size (:func:`particleseg_model.figures.class_gallery`);
- ``classify.json``: the command, the settings, the time and the figures of
  :meth:`Classification.summary`;
- ``relion/``: RELION's files of the last iteration (``run_itNNN_{data,model,optimiser,
  sampling}.star``, ``_classes.mrcs``) and the run's transcript.

Settings (:data:`CLASSIFY_DEFAULTS`) are those of RELION 3.1's 2D-classification job
(``--tau2_fudge 2``, in-plane sampling 6 degrees with oversampling 1, i.e. ``--psi_step 12
--oversampling 1``, ``--offset_range 5 --offset_step 2`` pixels, ``--zero_mask
--flatten_solvent --norm --scale --ctf``), a circular mask of ``diameter_a`` (default 90 % of
the box), ``--pool 30 --dont_combine_weights_via_disc`` and one process with ``--j
threads``. Measured here on simulated particles of 64 px at 5.5 A/px (EMD-1832; six junk
kinds) on 2 shared cores (``docs/classify_2d.md``):

- they reproduce clean views from good particles alone (246 particles, K=3, 10 iterations:
  three classes of the particle's views), while a set that is 75 % junk collapses (1,000
  particles, K=10, 25 iterations: all 1,000 in one class): what the paper says cleaning repairs;
- MPI (``relion_refine_mpi``, 3 ranks x 1 thread) took 18-21 % longer than one process with 2
  threads (300 particles, K=4, 3 iterations, ``benchmarks/classify_mpi.py``): the leader rank
  does no expectation work, so it is used only when ``mpi`` is given;
- the cost grows with particles x classes x orientations x translations: about 3.6 ms per
  particle and class and iteration at these settings on the loaded 2 cores;
- for 10,000 particles the settings ``fast_subsets`` (RELION's ``--fast_subsets``: 800, 2,400
  and 3,000 of the 10,000 particles in iterations 1-5, 6-10 and 11-15 at K=8, all from 16;
  RELION refuses it with fewer than 20 iterations, and so does :func:`classify_2d`) with
  ``psi_step_deg`` 20 and ``offset_range_px`` 4 make 20 iterations cost about 8 full ones
  (81,000 particle-iterations instead of 200,000: 2,110-2,203 s for 10,000 particles, K=8,
  one thread, load 5-11); ``highres_limit_a``
  (``--strict_highres_exp``) 25 A was no faster at 64 px (532 s against 511 s);
- ``--random_seed 0`` (the default ``seed``) makes RELION skip the randomisation of the
  particle order: the same input gives the same classes.

The run happens in a temporary folder beside the output folder; the output folder appears
(one rename) only when RELION succeeded and every file is written. On a RELION failure
:class:`ClassifyError` carries RELION's own error text, and the run folder is kept (its path
in the message) for inspection; the output folder is left untouched.

Units: ``diameter_a`` Angstrom, ``offset_*_px`` pixels, ``psi_step_deg`` degrees, times seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from particleseg_model.em.mrc import read_map
from particleseg_model.em.particles import complete_from_stacks
from particleseg_model.em.star import ParticleStar, read_star, write_star, write_star_as_read
from particleseg_model.relion.runner import (
    LogTarget,
    RelionError,
    _emitter,
    _read_blocks,
    run_relion,
)

__all__ = [
    "CLASSIFY_DEFAULTS",
    "FAST_SUBSETS_MIN_ITERATIONS",
    "MIN_PARTICLES_PER_CLASS",
    "ClassifyError",
    "Classification",
    "class_labels",
    "classify_2d",
    "good_class_figures",
    "minimum_particles",
    "read_truth",
]

CLASSIFY_DEFAULTS: dict[str, Any] = {
    "iterations": 25,
    "tau2_fudge": 2.0,
    "psi_step_deg": 12.0,
    "offset_range_px": 5.0,
    "offset_step_px": 2.0,
    "diameter_fraction": 0.9,  # of the box, when diameter_a is not given
    "pool": 30,
    "threads": 2,
    "norm": True,
    "scale": True,
    "zero_mask": True,
    "flatten_solvent": True,
    # off by default (RELION's GUI defaults); what makes 10,000 particles affordable on 2 cores
    "fast_subsets": False,  # --fast_subsets: subsets of the data in the first 15 iterations
    "highres_limit_a": None,  # --strict_highres_exp: E-step resolution limit, Angstrom
}
FAST_SUBSETS_MIN_ITERATIONS = 20
"""RELION 3.1 refuses ``--fast_subsets`` with fewer iterations ("when using --fast_subsets you
have to perform at least 20 iterations!"): refused here before it starts."""
MIN_PARTICLES_PER_CLASS = 20
"""RELION needs particles in every class to start (random subsets of the data become the first
averages) and a class of a handful of particles is noise: :func:`classify_2d` refuses fewer
than ``MIN_PARTICLES_PER_CLASS * K`` particles before RELION starts."""

OUTPUT_FILES = (
    "particles_classified.star",
    "class_averages.mrcs",
    "classes.csv",
    "class_averages.png",
    "classify.json",
)
_ITERATION = re.compile(r"_it(\d{3})_model\.star$")


class ClassifyError(RuntimeError):
    """The 2D classification failed: RELION's own error text, and where its run folder is kept."""

    def __init__(self, message: str, run_dir: Path | None = None):
        super().__init__(message)
        self.run_dir = run_dir


def minimum_particles(classes: int) -> int:
    """The fewest particles :func:`classify_2d` accepts for ``classes`` classes."""
    return MIN_PARTICLES_PER_CLASS * int(classes)


def read_truth(path: str | os.PathLike, image_names: Sequence[str] | pd.Series) -> np.ndarray:
    """Ground truth per particle, in the order of ``image_names``: a boolean array.

    ``path`` is a CSV with ``image_name`` and ``is_good`` (the simulator's
    ``ground_truth.csv``). Raises ValueError naming the file when a column or a particle is
    missing.
    """
    path = Path(path)
    table = pd.read_csv(path, dtype={"image_name": str})
    for column in ("image_name", "is_good"):
        if column not in table:
            raise ValueError(f"{path}: no {column} column (ground truth needs image_name, is_good)")
    good = table.drop_duplicates("image_name").set_index("image_name")["is_good"]
    names = pd.Index(list(image_names))
    missing = names.difference(good.index)
    if len(missing):
        raise ValueError(
            f"{path}: no ground truth for {len(missing)} particles (first: {missing[0]})"
        )
    values = good.loc[names]
    if values.dtype != bool:
        values = values.astype(str).str.lower().isin(["true", "1"])
    return values.to_numpy(dtype=bool)


def good_class_figures(classes: pd.DataFrame) -> dict[str, Any]:
    """Figures of a per-class table with ground truth (``particles``, ``good`` columns).

    A class is good when most (more than half) of its particles are truly good. Returns
    ``good_classes`` (their numbers), ``particles_in_good_classes`` (the paper's count:
    83,319 before and 115,458 after cleaning on EMPIAR-10406), ``good_in_good_classes``
    (truly good particles there), ``good_class_share`` (particles in good classes / all
    particles, the paper's 24.57 % -> 48.65 %) and ``good_recovered`` (truly good particles
    in good classes / all truly good particles).
    """
    total = int(classes["particles"].sum())
    is_good = classes["good"] > classes["particles"] / 2
    good_total = int(classes["good"].sum())
    in_good = int(classes.loc[is_good, "particles"].sum())
    good_in_good = int(classes.loc[is_good, "good"].sum())
    return {
        "good_classes": [int(c) for c in classes.loc[is_good, "class"]],
        "particles_in_good_classes": in_good,
        "good_in_good_classes": good_in_good,
        "good_class_share": in_good / total if total else float("nan"),
        "good_recovered": good_in_good / good_total if good_total else float("nan"),
        "particles": total,
        "good_particles": good_total,
    }


@dataclass
class Classification:
    """A finished 2D classification: where its files are and what it found.

    ``assignments`` is the class (1..K) of every input particle in STAR row order; ``classes``
    the per-class table of ``classes.csv``; ``truth`` the ground truth used (None without).
    """

    out_dir: Path
    star: Path
    averages: Path
    table: Path
    gallery: Path
    assignments: np.ndarray
    classes: pd.DataFrame
    version: str
    k: int
    iterations: int
    seconds: float
    command: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    truth: np.ndarray | None = None
    peak_rss_mb: float = 0.0  # RELION's largest memory high-water mark (VmHWM), MiB

    def summary(self) -> dict[str, Any]:
        """Plain values: particles, classes, time, settings and, with ground truth,
        :func:`good_class_figures`."""
        out: dict[str, Any] = {
            "particles": len(self.assignments),
            "classes": self.k,
            "iterations": self.iterations,
            "relion_version": self.version,
            "seconds": round(self.seconds, 1),
            "settings": self.settings,
            "largest_class_share": float(self.classes["particles"].max() / len(self.assignments)),
            "empty_classes": int((self.classes["particles"] == 0).sum()),
            "relion_peak_rss_mb": round(self.peak_rss_mb, 1),
        }
        if self.truth is not None:
            out.update(good_class_figures(self.classes))
        return out


def _fill_box(star: ParticleStar, base_dir: Path) -> None:
    """A box size on every row (RELION 3.1 wants ``rlnImageSize``; 3.0 files lack it)."""
    parts = star.particles
    if parts["image_size_px"].isna().any() or parts["pixel_size_a"].isna().any():
        star.particles = complete_from_stacks(parts, base_dir)


_POSE_LABELS = (
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginX",
    "rlnOriginY",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnClassNumber",
)


def _without_poses(star: ParticleStar) -> ParticleStar:
    """The STAR without poses, origins and classes: RELION would start its 2D alignment from
    them (and a refined set's 3D origins are not 2D-class centres); a classification starts
    from the images alone, as after extraction."""
    block = star.blocks[star.particles_block]
    block = block.drop(columns=[c for c in _POSE_LABELS if c in block])
    particles = star.particles.copy()
    for column in ("rot_deg", "tilt_deg", "psi_deg", "origin_x_a", "origin_y_a"):
        particles[column] = np.nan
    return ParticleStar(
        particles=particles,
        optics=star.optics,
        version=star.version,
        source=star.source,
        blocks={**star.blocks, star.particles_block: block},
        particles_block=star.particles_block,
    )


def _peak_rss_mb(marker: str) -> float:
    """The largest memory high-water mark (``VmHWM``, MiB) of the running processes whose
    command line holds ``marker`` (the run folder: RELION and its MPI ranks); 0 elsewhere
    than Linux."""
    peak = 0.0
    proc = Path("/proc")
    if not proc.is_dir():
        return peak
    needle = marker.encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "cmdline").read_bytes():
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peak


def _last_iteration(run_dir: Path) -> int:
    found = [
        int(m.group(1))
        for p in run_dir.glob("run_it*_model.star")
        if (m := _ITERATION.search(p.name))
    ]
    return max(found) if found else -1


def _model_classes(model_star: Path) -> pd.DataFrame:
    blocks = _read_blocks(model_star)
    table = blocks.get("model_classes")
    if table is None:
        raise ClassifyError(f"{model_star}: no data_model_classes block")
    return table


def _class_table(
    assignments: np.ndarray, model: pd.DataFrame, k: int, truth: np.ndarray | None
) -> pd.DataFrame:
    counts = np.bincount(assignments, minlength=k + 1)[1 : k + 1]
    table = pd.DataFrame({"class": np.arange(1, k + 1), "particles": counts})
    table["share"] = counts / max(len(assignments), 1)
    resolution = model.get("rlnEstimatedResolution")
    distribution = model.get("rlnClassDistribution")
    table["resolution_a"] = (
        resolution.to_numpy(dtype=float)[:k] if resolution is not None else np.nan
    )
    table["distribution"] = (
        distribution.to_numpy(dtype=float)[:k] if distribution is not None else np.nan
    )
    if truth is not None:
        good = np.bincount(assignments, weights=truth.astype(float), minlength=k + 1)[1 : k + 1]
        table["good"] = good.astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            table["good_share"] = np.where(counts > 0, good / np.maximum(counts, 1), np.nan)
    return table.sort_values(["particles", "class"], ascending=[False, True]).reset_index(drop=True)


def class_labels(table: pd.DataFrame, with_class: bool = True) -> list[str]:
    """Gallery captions of a per-class table, in its order: ``"class 3: 412, 38% good"``
    (the good share only where ground truth gave one)."""
    numbers = table["class"].to_numpy(dtype=np.int64)
    counts = table["particles"].to_numpy(dtype=np.int64)
    good = (
        table["good_share"].to_numpy(dtype=float)
        if "good_share" in table
        else np.full(len(table), np.nan)
    )
    labels = []
    for number, count, share in zip(numbers, counts, good, strict=True):
        text = f"class {number}: {count}" if with_class else f"{count}"
        if np.isfinite(share):
            text += f", {100 * share:.0f}% good"
        labels.append(text)
    return labels


def _assignments(data_star: Path, star: ParticleStar) -> np.ndarray:
    """Class of every input row from RELION's ``_data.star``, matched by image name."""
    blocks = _read_blocks(data_star)
    data = blocks.get("particles")
    if data is None or "rlnClassNumber" not in data:
        raise ClassifyError(f"{data_star}: no data_particles block with rlnClassNumber")
    names = star.particles["image_name"].astype(str).to_numpy()
    out_names = data["rlnImageName"].astype(str).to_numpy()
    classes = data["rlnClassNumber"].to_numpy(dtype=np.int64)
    if len(out_names) == len(names) and (out_names == names).all():
        return classes
    lookup = dict(zip(out_names.tolist(), classes.tolist(), strict=True))
    missing = [name for name in names.tolist() if name not in lookup]
    if missing:
        raise ClassifyError(
            f"{data_star}: RELION's output lacks {len(missing)} input particles "
            f"(first: {missing[0]})"
        )
    return np.array([lookup[name] for name in names.tolist()], dtype=np.int64)


def _command(
    input_star: Path,
    run_dir: Path,
    k: int,
    iterations: int,
    diameter_a: float,
    threads: int,
    seed: int,
    settings: dict[str, Any],
    extra_args: Sequence[str],
) -> list[str]:
    command = [
        "relion_refine",
        "--i", str(input_star),
        "--o", str(run_dir / "run"),
        "--K", str(k),
        "--iter", str(iterations),
        "--tau2_fudge", f"{settings['tau2_fudge']:g}",
        "--particle_diameter", f"{diameter_a:.1f}",
        "--psi_step", f"{settings['psi_step_deg']:g}",
        "--offset_range", f"{settings['offset_range_px']:g}",
        "--offset_step", f"{settings['offset_step_px']:g}",
        "--ctf",
        "--oversampling", "1",
        "--pool", str(int(settings["pool"])),
        "--j", str(int(threads)),
        "--random_seed", str(int(seed)),
        "--dont_combine_weights_via_disc",
    ]  # fmt: skip
    for flag in ("zero_mask", "flatten_solvent", "norm", "scale", "fast_subsets"):
        if settings[flag]:
            command.append(f"--{flag}")
    if settings["highres_limit_a"]:
        command += ["--strict_highres_exp", f"{float(settings['highres_limit_a']):g}"]
    return [*command, *extra_args]


def _stage_outputs(
    stage: Path,
    run_dir: Path,
    star: ParticleStar,
    iteration: int,
    assignments: np.ndarray,
    table: pd.DataFrame,
    summary: dict[str, Any],
    transcript: Path,
) -> None:
    from particleseg_model.figures import class_gallery

    prefix = f"run_it{iteration:03d}"
    block = star.blocks[star.particles_block].copy()
    block["rlnClassNumber"] = assignments
    out_star = ParticleStar(
        particles=star.particles,
        optics=star.optics,
        version=star.version,
        source=star.source,
        blocks={**star.blocks, star.particles_block: block},
        particles_block=star.particles_block,
    )
    write_star_as_read(stage / "particles_classified.star", out_star)
    shutil.copyfile(run_dir / f"{prefix}_classes.mrcs", stage / "class_averages.mrcs")
    table.to_csv(stage / "classes.csv", index=False, float_format="%.6g")
    averages, _ = read_map(stage / "class_averages.mrcs")
    averages = averages.reshape(-1, averages.shape[-2], averages.shape[-1])
    class_gallery(
        stage / "class_averages.png",
        averages[table["class"].to_numpy() - 1],
        class_labels(table),
        title=summary.get("title", ""),
    )
    (stage / "classify.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    relion = stage / "relion"
    relion.mkdir()
    for path in run_dir.glob(f"{prefix}_*"):
        shutil.copyfile(path, relion / path.name)
    for name in ("input.star", transcript.name):
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, relion / name)


def _replace_folder(stage: Path, out: Path) -> None:
    """``stage`` becomes ``out``: one rename; an earlier ``out`` is moved aside first and
    removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(out, old)
    try:
        os.rename(stage, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def classify_2d(  # noqa: C901 - a straight sequence of checked steps
    star: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    classes: int,
    iterations: int = CLASSIFY_DEFAULTS["iterations"],
    diameter_a: float | None = None,
    threads: int = CLASSIFY_DEFAULTS["threads"],
    mpi: int | None = None,
    truth: str | os.PathLike | np.ndarray | None = None,
    particles_dir: str | os.PathLike | None = None,
    seed: int = 0,
    overwrite: bool = False,
    title: str = "",
    settings: dict[str, Any] | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float | None = None,
    run_root: str | os.PathLike | None = None,
    progress: bool | None = None,
    log: LogTarget = None,
) -> Classification:
    """2D-classify the particles of ``star`` into ``classes`` classes with ``relion_refine``.

    Parameters
    ----------
    star
        RELION particle STAR file (3.0, 3.1 or 5.0) with CTF parameters; never modified.
    out_dir
        Output folder (see the module docstring for its files); must not exist unless
        ``overwrite`` (then replaced whole, only once the new one is complete).
    classes
        K, the number of classes (at least 1); at least :func:`minimum_particles` particles.
    iterations
        RELION ``--iter`` (default 25, RELION's own default for 2D classification).
    diameter_a
        The circular mask's diameter in Angstrom (``--particle_diameter``); default 90 % of
        the box. Must be smaller than the box.
    threads
        ``--j`` of the one process (or of each MPI rank).
    mpi
        Run ``relion_refine_mpi`` under ``mpirun -n mpi`` (measured slower on 2 cores).
    truth
        Ground truth: a CSV with ``image_name``, ``is_good`` (the simulator's
        ``ground_truth.csv``) or a boolean array in STAR row order; default the
        ``ground_truth.csv`` beside ``star`` when there is one. Adds ``good`` and
        ``good_share`` to the class table and the good-class figures to the summary.
    particles_dir
        Where the stacks' paths start (default the STAR file's folder): RELION runs there.
    seed
        RELION ``--random_seed`` (same seed, same data, same result).
    settings
        Overrides of :data:`CLASSIFY_DEFAULTS` (``psi_step_deg``, ``pool``, ...).
    extra_args
        More ``relion_refine`` arguments, appended as given.
    timeout_s, log
        As :func:`particleseg_model.relion.runner.run_relion` (log: RELION's lines).
    run_root
        Where RELION's temporary run folder goes (default beside ``out_dir``); a failed
        run's folder stays there.
    progress
        A bar of the iterations done (None: on a terminal only).

    Returns
    -------
    Classification

    Raises
    ------
    ValueError
        Fewer particles than :func:`minimum_particles` (the message says the minimum), K < 1,
        iterations < 1, a mask wider than the box, bad ground truth; raised before RELION runs.
    FileExistsError
        ``out_dir`` exists and not ``overwrite``.
    ClassifyError
        RELION failed (its own error text; the run folder kept, its path in the message).
    """
    from particleseg_model.progress import progress as progress_bar

    started = time.perf_counter()
    star_path, out = Path(star), Path(out_dir)
    emit = _emitter(log)
    params = {**CLASSIFY_DEFAULTS, **(settings or {})}
    unknown = set(settings or {}) - set(CLASSIFY_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown classification settings: {', '.join(sorted(unknown))}")
    if int(classes) < 1:
        raise ValueError(f"--classes must be at least 1, got {classes}")
    if int(iterations) < 1:
        raise ValueError(f"--iterations must be at least 1, got {iterations}")
    if int(threads) < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if params["fast_subsets"] and int(iterations) < FAST_SUBSETS_MIN_ITERATIONS:
        raise ValueError(
            f"fast subsets need at least {FAST_SUBSETS_MIN_ITERATIONS} iterations (RELION uses "
            f"subsets in the first 15 and refuses fewer), got {iterations}"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another output folder or remove it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder for {out.name}")
    parsed = read_star(star_path)
    n = len(parsed.particles)
    k = int(classes)
    if n < minimum_particles(k):
        raise ValueError(
            f"{star_path}: {n} particles are too few for {k} classes: 2D classification "
            f"needs at least {minimum_particles(k)} ({MIN_PARTICLES_PER_CLASS} per class)"
        )
    base_dir = Path(particles_dir) if particles_dir is not None else star_path.parent
    _fill_box(parsed, base_dir)
    box = int(parsed.particles["image_size_px"].max())
    pixel = float(parsed.particles["pixel_size_a"].max())
    if diameter_a is None:
        diameter_a = float(params["diameter_fraction"]) * box * pixel
    if not 0 < diameter_a < box * pixel:
        raise ValueError(
            f"--diameter-a {diameter_a:g} must be positive and smaller than the box "
            f"({box} px x {pixel:g} A = {box * pixel:g} A)"
        )
    truth_array: np.ndarray | None
    if truth is None and (star_path.parent / "ground_truth.csv").is_file():
        truth = star_path.parent / "ground_truth.csv"
    if truth is None:
        truth_array = None
    elif isinstance(truth, np.ndarray):
        truth_array = np.asarray(truth, dtype=bool)
        if truth_array.shape != (n,):
            raise ValueError(f"ground truth of shape {truth_array.shape}, {n} particles")
    else:
        truth_array = read_truth(truth, parsed.particles["image_name"].astype(str))

    run_dir = Path(
        tempfile.mkdtemp(
            prefix=f".{out.name}.run-", dir=Path(run_root) if run_root is not None else out.parent
        )
    )
    input_star = run_dir / "input.star"
    # RELION 3.1 reads its own layout best; image names unchanged (RELION runs in base_dir)
    write_star(input_star, _without_poses(parsed))
    transcript = run_dir / "relion_refine.log"
    command = _command(
        input_star.resolve(),
        run_dir.resolve(),
        k,
        int(iterations),
        float(diameter_a),
        int(threads),
        seed,
        params,
        extra_args,
    )
    emit(
        f"2D classification of {n} particles ({box} px, {pixel:g} A/px) into {k} classes, "
        f"{iterations} iterations, mask {diameter_a:.0f} A, "
        f"{f'{mpi} MPI ranks x ' if mpi else ''}{threads} thread{'s' if threads != 1 else ''}; "
        f"run folder {run_dir}"
    )
    bar = progress_bar(
        total=int(iterations),
        desc="2D classification",
        unit="iter",
        disable=None if progress is None else not progress,
    )
    seen = {"it": 0}
    memory = {"peak": 0.0, "last": 0.0}
    marker = str(run_dir.resolve())

    def tick() -> None:
        now = time.monotonic()
        if now - memory["last"] >= 2.0:  # a /proc scan every 2 s
            memory["peak"] = max(memory["peak"], _peak_rss_mb(marker))
            memory["last"] = now
        done = _last_iteration(run_dir)
        if done > seen["it"]:
            bar.update(done - seen["it"])
            seen["it"] = done
            emit(f"iteration {done}/{iterations} done ({time.perf_counter() - started:.0f} s)")

    # the command first in the transcript (RELION's lines are appended): the kept run folder of
    # a failure says in one file what ran and what RELION said
    transcript.write_text("$ " + " ".join(command) + f"\n# in {base_dir.resolve()}\n")
    try:
        run = run_relion(
            command,
            cwd=base_dir,
            log=log,
            mpi=mpi,
            transcript=transcript,
            timeout_s=timeout_s,
            tick=tick,
        )
    except RelionError as exc:
        # one line: RELION's own error text, the kept run folder (its transcript holds the
        # command and everything RELION printed), and that nothing was written
        said = " ".join(str(exc).split("\ncommand (in ", 1)[0].split())
        raise ClassifyError(
            f"2D classification of {star_path} failed: {said}; "
            f"RELION's run folder is kept for inspection: {run_dir} (command and output in "
            f"{transcript.name}); {out} was not written",
            run_dir=run_dir,
        ) from exc
    finally:
        bar.close()
    iteration = _last_iteration(run_dir)
    if iteration < 1:
        raise ClassifyError(
            f"relion_refine wrote no iteration into {run_dir} (kept for inspection)", run_dir
        )
    assignments = _assignments(run_dir / f"run_it{iteration:03d}_data.star", parsed)
    model = _model_classes(run_dir / f"run_it{iteration:03d}_model.star")
    table = _class_table(assignments, model, k, truth_array)
    seconds = time.perf_counter() - started
    used = {
        **{key: params[key] for key in CLASSIFY_DEFAULTS if key != "diameter_fraction"},
        "diameter_a": round(float(diameter_a), 1),
        "threads": int(threads),
        "mpi": mpi,
        "seed": seed,
        "box_px": box,
        "pixel_size_a": pixel,
        "iterations": int(iterations),
    }
    result = Classification(
        out_dir=out,
        star=out / "particles_classified.star",
        averages=out / "class_averages.mrcs",
        table=out / "classes.csv",
        gallery=out / "class_averages.png",
        assignments=assignments,
        classes=table,
        version=parsed.version,
        k=k,
        iterations=iteration,
        seconds=seconds,
        command=run.command,
        settings=used,
        truth=truth_array,
        peak_rss_mb=memory["peak"],
    )
    summary = {
        "source_star": str(star_path.resolve()),
        "command": run.command,
        "cwd": str(base_dir.resolve()),
        "relion_seconds": round(run.seconds, 1),
        **result.summary(),
        "title": title or f"{star_path.name}: {n} particles, K={k}",
    }
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _stage_outputs(stage, run_dir, parsed, iteration, assignments, table, summary, transcript)
        _replace_folder(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(run_dir, ignore_errors=True)
    emit(
        f"{n} particles in {k} classes in {seconds:.0f} s; largest class "
        f"{int(table['particles'].iloc[0])} particles: {out}"
    )
    return result
