"""Canonical particle tables completed from their stacks, and grouped by box and pixel size.

Old depositions (RELION 3.0 STAR files) give no box size (``rlnImageSize`` came with 3.1) and
sometimes no pixel size; the stacks they name do: :func:`complete_from_stacks` reads each
stack's MRC header once and fills ``image_size_px`` (the images' side, the stacks must be
square) and, where the table has none, ``pixel_size_a`` (the header's voxel size along x,
when it is set). RELION 3.0's ``rlnDetectorPixelSize * 1e4 / rlnMagnification`` is already
read by :func:`particleseg_model.em.star.read_star`, and it wins over the header, which often
holds a placeholder (0 or 1 A).

Several optics groups may have different boxes or pixel sizes: every row carries its own, and
:func:`particle_groups` splits a table into the sets that can be processed together.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mrcfile
import numpy as np
import pandas as pd

__all__ = [
    "ParticleGroup",
    "ParticleTableError",
    "StackHeader",
    "complete_from_stacks",
    "particle_groups",
    "stack_header",
]


class ParticleTableError(ValueError):
    """A particle table that disagrees with its stacks; the message names the file."""


@dataclass(frozen=True)
class StackHeader:
    """What an MRC stack's header says: images of ``nx`` x ``ny`` px, ``n`` of them, and the
    pixel size in Angstrom (None when the header gives 0)."""

    path: Path
    nx: int
    ny: int
    n: int
    pixel_size_a: float | None


@dataclass(frozen=True)
class ParticleGroup:
    """Particles sharing a box (px) and a pixel size (A); ``index``: their labels in the table,
    ``optics_groups``: the optics groups they come from (ascending)."""

    box_px: int | None
    pixel_size_a: float | None
    index: pd.Index
    optics_groups: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.index)


def stack_header(path: str | os.PathLike) -> StackHeader:
    """The header of the MRC stack at ``path`` (the data is not read).

    Raises
    ------
    ParticleTableError
        The file is missing or not MRC (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise ParticleTableError(f"{path}: stack not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                header = mrc.header.copy()  # pyright: ignore[reportOptionalMemberAccess]
    except Exception as exc:  # mrcfile raises ValueError/OSError on broken headers
        raise ParticleTableError(f"{path}: cannot read the MRC header: {exc}") from exc
    mx, cella = int(header.mx), float(header.cella.x)
    pixel = float(str(np.float32(cella / mx))) if mx > 0 and cella > 0 else None
    return StackHeader(path, int(header.nx), int(header.ny), int(header.nz), pixel)


def _resolve(stack: str, base_dir: Path | None) -> Path:
    path = Path(stack)
    return base_dir / path if base_dir is not None and not path.is_absolute() else path


def complete_from_stacks(
    particles: pd.DataFrame,
    base_dir: str | os.PathLike | None = None,
    *,
    source: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Fill a canonical table's missing ``image_size_px`` and ``pixel_size_a`` from its stacks.

    Parameters
    ----------
    particles
        A canonical particle table (:data:`particleseg_model.em.star.CANONICAL_COLUMNS`: at
        least ``stack_path``, ``image_index``, ``image_size_px``, ``pixel_size_a``).
    base_dir
        The folder relative stack paths are relative to (RELION: the project directory);
        None: the current directory.
    source
        The STAR (or ``.cs``) file the table came from, named in errors.

    Returns
    -------
    pandas.DataFrame
        A copy: ``image_size_px`` (Int64) from each stack's side where the table has none;
        ``pixel_size_a`` (A) from the stack header's voxel size where the table has none and
        the header gives one (a pixel size the table has is kept: headers often hold 0 or 1).

    Raises
    ------
    ParticleTableError
        A stack that is missing or not MRC, not square, holds fewer images than the table
        names, or whose side disagrees with the box the table gives (an optics table that
        disagrees with its stacks); the message names the file(s) and the stack.
    """
    where = f"{source}: " if source is not None else ""
    base = Path(base_dir) if base_dir is not None else None
    out = particles.copy()
    box = out["image_size_px"].astype("Int64")
    pixel = out["pixel_size_a"].astype(float)
    for stack, rows in out.groupby("stack_path", sort=False).groups.items():
        header = stack_header(_resolve(str(stack), base))
        if header.nx != header.ny:
            raise ParticleTableError(
                f"{where}stack {header.path} holds {header.nx} x {header.ny} px images; "
                "particles must be square"
            )
        largest = int(out.loc[rows, "image_index"].max())
        if largest > header.n:
            raise ParticleTableError(
                f"{where}names image {largest} of stack {header.path}, which holds {header.n}"
            )
        given = box.loc[rows].dropna()
        wrong = given[given != header.nx]
        if len(wrong):
            raise ParticleTableError(
                f"{where}the box of {len(wrong)} particle(s) of stack {header.path} is "
                f"{int(wrong.iloc[0])} px (rlnImageSize), but the stack's images are "
                f"{header.nx} px"
            )
        box.loc[rows] = header.nx
        if header.pixel_size_a is not None:
            missing = pixel.loc[rows].isna()
            pixel.loc[missing[missing].index] = header.pixel_size_a
    out["image_size_px"] = box
    out["pixel_size_a"] = pixel
    return out


def _missing(value: Any) -> bool:
    """A group key that is NA or NaN (``value != value`` holds for NaN only)."""
    return value is pd.NA or value is None or value != value


def particle_groups(particles: pd.DataFrame) -> list[ParticleGroup]:
    """Split a canonical table by (box, pixel size): the sets processed together.

    Returns
    -------
    list of ParticleGroup
        In order of first appearance; a missing box or pixel size is its own key (None).
        Pixel sizes are compared as written (1.24 and 1.25 A are two groups).
    """
    if len(particles) == 0:
        return []
    keys = pd.DataFrame(
        {
            "box": particles["image_size_px"].astype("Int64"),
            "pixel": particles["pixel_size_a"].astype(float),
        },
        index=particles.index,
    )
    groups = []
    for key, frame in keys.groupby(["box", "pixel"], dropna=False, sort=False):
        box, pix = cast(tuple[Any, Any], key)  # the two grouping columns' values
        optics = (
            tuple(sorted(int(g) for g in particles.loc[frame.index, "optics_group"].unique()))
            if "optics_group" in particles
            else ()
        )
        groups.append(
            ParticleGroup(
                box_px=None if _missing(box) else int(box),
                pixel_size_a=None if _missing(pix) else float(pix),
                index=frame.index,
                optics_groups=optics,
            )
        )
    return groups
