"""The paper's test of a cleaning: 2D classification before and after, and after a random drop.

:func:`classify_before_after` classifies, with the same RELION parameters and seed, (1) every
particle of the input STAR, (2) the particles the cleaning kept and (3) a control: as many
particles dropped at random (a fixed seed) as the cleaning dropped. It writes into one folder:

- ``before/``, ``after/``, ``random_drop/``: each a :func:`particleseg_model.relion.classify.
  classify_2d` folder (classified STAR, class averages, ``classes.csv``, gallery);
- ``subsets/cleaned.star`` and ``subsets/random_drop.star``: the two subsets classified, in
  the input's RELION flavour (image names as in the input: relative to its folder);
- ``galleries.png``: the three galleries side by side (every class average with its
  particle count, largest first);
- ``summary.csv`` / ``summary.json``: one row per condition: particles, good share of the
  input (with ground truth), particles in good classes and the good-class share (the
  paper's figures: 83,319 of 339,043 = 24.57 % before, 115,458 of 237,331 = 48.65 % after on
  EMPIAR-10406), good particles in good classes, the largest class's share, time and
  RELION's peak memory; and the after/before ratio of the particles in good classes (the
  paper's x1.39) for the cleaning and for the random drop.

A class is good when most of its particles are truly good (ground truth from the simulator's
``ground_truth.csv``); without ground truth the table has counts and times only, and the
galleries are for a person to judge. The folder appears (one rename) only when all three
classifications succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from particleseg_model.em.star import read_star, write_star_as_read
from particleseg_model.relion.classify import (
    CLASSIFY_DEFAULTS,
    Classification,
    class_labels,
    classify_2d,
)

__all__ = [
    "CONDITIONS",
    "PAPER_RATIO",
    "Comparison",
    "classify_before_after",
    "random_keep",
]

CONDITIONS = ("before", "after", "random_drop")
PAPER_RATIO = 115_458 / 83_319  # particles in good classes after / before cleaning (x1.39)

Log = Callable[[str], object]


def random_keep(n: int, kept: int, seed: int = 0) -> np.ndarray:
    """A keep mask over ``n`` rows keeping ``kept`` of them chosen uniformly at random
    (``numpy.random.default_rng(seed)``): the control that drops as many as a cleaning."""
    if not 0 <= kept <= n:
        raise ValueError(f"cannot keep {kept} of {n} particles")
    keep = np.zeros(n, dtype=bool)
    keep[np.random.default_rng(seed).choice(n, size=kept, replace=False)] = True
    return keep


@dataclass
class Comparison:
    """What :func:`classify_before_after` wrote and found."""

    out_dir: Path
    gallery: Path
    summary_csv: Path
    table: pd.DataFrame  # one row per condition (see the module docstring)
    runs: dict[str, Classification]

    def ratios(self) -> dict[str, float]:
        """Particles in good classes after / before, for the cleaning and the random drop
        (NaN without ground truth or with none before)."""
        if "particles_in_good_classes" not in self.table:
            return {}
        rows = self.table.set_index("condition")["particles_in_good_classes"]
        before = float(rows["before"])
        return {
            name: (float(rows[name]) / before if before else float("nan"))
            for name in ("after", "random_drop")
        }


def _row(name: str, run: Classification) -> dict[str, Any]:
    summary = run.summary()
    row: dict[str, Any] = {
        "condition": name,
        "particles": summary["particles"],
        "classes": run.k,
        "largest_class_share": round(summary["largest_class_share"], 4),
        "seconds": round(run.seconds, 1),
        "relion_peak_rss_mb": round(run.peak_rss_mb, 1),
    }
    if run.truth is not None:
        row.update(
            {
                "good_share_in": round(float(run.truth.mean()), 4),
                "good_classes": len(summary["good_classes"]),
                "particles_in_good_classes": summary["particles_in_good_classes"],
                "good_class_share": round(summary["good_class_share"], 4),
                "good_in_good_classes": summary["good_in_good_classes"],
                "good_recovered": round(summary["good_recovered"], 4),
            }
        )
    return row


def _panel(name: str, run: Classification) -> tuple[str, np.ndarray, list[str]]:
    from particleseg_model.em.mrc import read_map

    averages, _ = read_map(run.averages)
    averages = averages.reshape(-1, averages.shape[-2], averages.shape[-1])
    order = run.classes["class"].to_numpy() - 1
    labels = class_labels(run.classes, with_class=False)
    heading = f"{name.replace('_', ' ')}: {len(run.assignments)} particles"
    if run.truth is not None:
        figures = run.summary()
        heading += f"\n{figures['particles_in_good_classes']} in good classes"
    return heading, averages[order], labels


def classify_before_after(
    star: str | os.PathLike,
    keep: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    classes: int,
    iterations: int = CLASSIFY_DEFAULTS["iterations"],
    diameter_a: float | None = None,
    threads: int = CLASSIFY_DEFAULTS["threads"],
    truth: str | os.PathLike | None = None,
    particles_dir: str | os.PathLike | None = None,
    seed: int = 0,
    control_seed: int = 0,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    log: Log | None = None,
) -> Comparison:
    """Classify ``star`` whole, its rows ``keep`` and a random subset of the same size.

    Parameters
    ----------
    star
        The input particle STAR file (never modified).
    keep
        Boolean mask over its particle rows: what the cleaning kept.
    out_dir
        The folder to write (see the module docstring); must not exist unless ``overwrite``.
    classes, iterations, diameter_a, threads, seed
        As :func:`~particleseg_model.relion.classify.classify_2d`, the same for all three.
    truth
        Ground truth CSV (``image_name``, ``is_good``); default ``ground_truth.csv`` beside
        ``star`` when there is one.
    particles_dir
        Where the stacks' paths start (default the STAR file's folder).
    control_seed
        Seed of the random drop (:func:`random_keep`).
    settings
        Overrides of :data:`~particleseg_model.relion.classify.CLASSIFY_DEFAULTS`, the same
        for all three.

    Raises
    ------
    ValueError
        A mask of the wrong length; a subset too small for ``classes`` (before RELION runs).
    FileExistsError
        ``out_dir`` exists and not ``overwrite``.
    ClassifyError
        A RELION failure (its error text; its run folder kept).
    """
    star_path, out = Path(star), Path(out_dir)
    parsed = read_star(star_path)
    keep = np.asarray(keep, dtype=bool)
    n = len(parsed.particles)
    if keep.shape != (n,):
        raise ValueError(f"{star_path}: a keep mask of {keep.shape} for {n} particles")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another folder or remove it")
    if truth is None and (star_path.parent / "ground_truth.csv").is_file():
        truth = star_path.parent / "ground_truth.csv"
    base = Path(particles_dir) if particles_dir is not None else star_path.parent
    from particleseg_model.relion.classify import minimum_particles

    kept = int(keep.sum())
    if kept < minimum_particles(classes):
        raise ValueError(
            f"{star_path}: the cleaning kept {kept} particles, too few for {classes} classes "
            f"(at least {minimum_particles(classes)})"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        subsets = stage / "subsets"
        subsets.mkdir()
        inputs = {
            "before": star_path,
            "after": write_star_as_read(subsets / "cleaned.star", parsed, keep),
            "random_drop": write_star_as_read(
                subsets / "random_drop.star", parsed, random_keep(n, kept, control_seed)
            ),
        }
        runs: dict[str, Classification] = {}
        for name in CONDITIONS:
            began = time.perf_counter()
            if log is not None:
                log(f"2D classification {name}: {inputs[name]}")
            runs[name] = classify_2d(
                inputs[name],
                stage / name,
                classes=classes,
                iterations=iterations,
                diameter_a=diameter_a,
                threads=threads,
                truth=truth,
                particles_dir=base,
                seed=seed,
                settings=settings,
                run_root=out.parent,  # outside the staging folder: a failed run is kept
                title=f"{name.replace('_', ' ')}: {inputs[name].name}",
                progress=False,
                log=log,
            )
            if log is not None:
                log(f"{name}: done in {time.perf_counter() - began:.0f} s")
        table = pd.DataFrame([_row(name, runs[name]) for name in CONDITIONS])
        from particleseg_model.figures import galleries_side_by_side

        galleries_side_by_side(
            stage / "galleries.png", [_panel(name, runs[name]) for name in CONDITIONS]
        )
        table.to_csv(stage / "summary.csv", index=False)
        comparison = Comparison(
            out_dir=out,
            gallery=out / "galleries.png",
            summary_csv=out / "summary.csv",
            table=table,
            runs={},
        )
        record = {
            "source_star": str(star_path.resolve()),
            "truth": str(truth) if truth is not None else None,
            "settings": runs["before"].settings,
            "control_seed": control_seed,
            "conditions": table.to_dict(orient="records"),
            "ratio_particles_in_good_classes": comparison.ratios(),
            "paper_ratio": round(PAPER_RATIO, 4),
        }
        (stage / "summary.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    # the runs' paths now under out
    for name, run in runs.items():
        run.out_dir = out / name
        run.star, run.averages = out / name / run.star.name, out / name / run.averages.name
        run.table, run.gallery = out / name / run.table.name, out / name / run.gallery.name
    comparison.runs = runs
    return comparison
