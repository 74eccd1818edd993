"""Cleaning a cryoSPARC particle file (``.cs``): the kept rows back to cryoSPARC as they were.

:func:`clean_cs` reads the ``.cs`` file (:func:`particleseg_model.em.cryosparc.read_cs`),
scores its particles exactly as :func:`particleseg_model.cleaning.clean.clean_star` scores a
STAR file's (the images read from ``blob/path`` and ``blob/idx``, relative to the cryoSPARC
project directory), and writes the kept rows with every field as read plus the passthrough
file (:func:`particleseg_model.em.cryosparc.write_cs_subset`), so that cryoSPARC takes the
subset without re-extraction. The scores of every particle go beside the output as for a STAR.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from particleseg_model.em.cryosparc import read_cs, write_cs_subset
from particleseg_model.em.particles import complete_from_stacks
from particleseg_model.em.star import write_loop_blocks

__all__ = ["clean_cs", "cs_project_dir", "cs_to_star"]


def cs_project_dir(cs_path: Path, first_stack: str) -> Path:
    """Where the ``blob/path`` values start: the ``.cs`` file's folder, or its parent (a
    cryoSPARC job folder ``P1/J12/`` inside the project ``P1/``), whichever holds the first
    stack; the folder itself when neither does (the error then names the stack)."""
    for folder in (cs_path.parent, cs_path.parent.parent):
        if (folder / first_stack).is_file():
            return folder
    return cs_path.parent


def cs_to_star(table: pd.DataFrame, path: Path, base_dir: Path, source: Path) -> Path:
    """A RELION 3.1 particle STAR file of a ``.cs`` file's canonical table (image names,
    CTF, optics groups: what scoring reads); box sizes and pixel sizes missing from the
    table come from the stacks' headers."""
    table = complete_from_stacks(table, base_dir, source=source)
    first = table.groupby("optics_group", sort=True).first()
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": first.index.to_numpy(dtype=np.int64),
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in first.index],
            "rlnVoltage": first["voltage_kv"].to_numpy(dtype=float),
            "rlnSphericalAberration": first["spherical_aberration_mm"].to_numpy(dtype=float),
            "rlnAmplitudeContrast": first["amplitude_contrast"].to_numpy(dtype=float),
            "rlnImagePixelSize": first["pixel_size_a"].to_numpy(dtype=float),
            "rlnImageSize": first["image_size_px"].to_numpy(dtype=np.int64),
            "rlnImageDimensionality": 2,
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": table["image_name"].astype(str).to_numpy(),
            "rlnDefocusU": table["defocus_u_a"].to_numpy(dtype=float),
            "rlnDefocusV": table["defocus_v_a"].to_numpy(dtype=float),
            "rlnDefocusAngle": table["defocus_angle_deg"].to_numpy(dtype=float),
            "rlnOpticsGroup": table["optics_group"].to_numpy(dtype=np.int64),
        }
    )
    return write_loop_blocks(path, {"optics": optics, "particles": particles})


def clean_cs(
    cs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    particles_dir: str | os.PathLike | None = None,
    passthrough_in: str | os.PathLike | None = None,
    scores_out: str | os.PathLike | None = None,
    overwrite: bool = False,
    **clean_options: Any,
) -> tuple[Any, Path, Path]:
    """Clean a cryoSPARC ``.cs`` particle file into ``out`` (a ``.cs`` name).

    Parameters
    ----------
    cs
        The cryoSPARC particle file (never modified).
    out
        The kept rows, every field as read; its passthrough file beside it
        (:func:`~particleseg_model.em.cryosparc.passthrough_path`).
    particles_dir
        Where ``blob/path`` starts (default :func:`cs_project_dir`).
    passthrough_in
        The input's passthrough file (default: cryoSPARC's name beside ``cs``, if present).
    scores_out
        The score table (default ``<out stem>_scores.parquet``).
    clean_options
        ``model``, ``models_root``, ``drop``, ``keep_above``, ``score``, ``report_dir``,
        ``on_bad``, ``batch``, ``progress``, ``log``: as
        :func:`~particleseg_model.cleaning.clean.clean_star`.

    Returns
    -------
    (CleanResult, Path, Path)
        The cleaning (its ``out`` the temporary STAR, removed), the ``.cs`` and the
        passthrough file written.

    Raises
    ------
    CryosparcError
        Not a ``.cs`` file, or one without the fields needed (named).
    ValueError, FileExistsError
        ``out`` not ending in ``.cs``, being the input, or existing without ``overwrite``.
    """
    from particleseg_model.cleaning.clean import clean_star, default_scores_path

    cs_path, out_path = Path(cs), Path(out)
    if out_path.suffix != ".cs":
        raise ValueError(f"{out_path}: the output of a .cs input is a .cs file (name it *.cs)")
    if out_path.resolve() == cs_path.resolve():
        raise ValueError(f"{out_path}: --out is the input .cs file; never overwriting it")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists: choose another --out or remove it")
    particles = read_cs(cs_path)
    table = particles.particles
    if len(table) == 0:
        raise ValueError(f"{cs_path}: no particles")
    base = (
        Path(particles_dir)
        if particles_dir is not None
        else cs_project_dir(cs_path, str(table["stack_path"].iloc[0]))
    )
    scores_path = Path(scores_out) if scores_out is not None else default_scores_path(out_path)
    work = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        star = cs_to_star(table, work / "particles.star", base, cs_path)
        result = clean_star(
            star,
            work / "cleaned.star",
            particles_dir=base,
            scores_out=scores_path,
            overwrite=overwrite,
            **clean_options,
        )
        scores = (
            pd.read_csv(result.scores_path)
            if result.scores_path.suffix.lower() == ".csv"
            else pd.read_parquet(result.scores_path)
        )
        keep = scores["keep"].to_numpy(dtype=bool)
        written, passthrough = write_cs_subset(
            particles, keep, out_path, passthrough_in=passthrough_in
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result, written, passthrough
