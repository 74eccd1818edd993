"""Negatives that real corpora have: boxes from micrograph regions far from every pick.

A refined STAR says where particles are; it never says where they are not. A micrograph with
its coordinates does: a box whose centre lies at least a particle diameter from every pick
shows ice, carbon or contamination, and its correct label is all background. Such boxes let a
model learn "no particle here" from real data, without a simulation's ``is_good``.

Expert picks are incomplete (DESIGN: many true particles carry no pick), so a negative can
hold an unpicked particle; the distance rule keeps that rare, not impossible.

Coordinates are RELION's: ``x`` the 0-based column, ``y`` the 0-based row of the box centre,
in micrograph pixels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "cut_boxes",
    "micrograph_rng",
    "negative_centres",
    "negative_chooser",
    "negative_rule",
]


def negative_centres(
    shape: tuple[int, int],
    picks_xy: np.ndarray,
    *,
    box: int,
    diameter_px: float,
    rng: np.random.Generator,
    n_max: int,
    min_distance_px: float | None = None,
    margin_px: int = 0,
    whole_pixels: bool = False,
) -> np.ndarray:
    """Up to ``n_max`` box centres ``(n, 2)`` (x, y) far from every pick.

    Candidates are a grid of step ``diameter_px / 2`` (jittered by a quarter step) inside the
    micrograph, keeping the whole box and ``margin_px`` more inside; a candidate is kept when
    its distance to every pick is at least ``min_distance_px`` (default: one particle
    diameter, so no picked particle reaches into the box's central disc). A random subset of
    at most ``n_max`` is returned.

    Parameters
    ----------
    shape
        The micrograph's (height, width) in pixels (rows, columns).
    picks_xy
        Every pick of the micrograph, ``(m, 2)``: x (column) and y (row) of the box centre,
        micrograph pixels (RELION's ``rlnCoordinateX/Y``). Junk picks count too: a region
        someone picked is not "no particle here".
    box
        The extraction box in micrograph pixels: the whole box stays inside.
    diameter_px
        The particle diameter in micrograph pixels (the grid step is half of it).
    rng
        The jitter and the subset (:func:`micrograph_rng` makes one per micrograph).
    n_max
        The cap; 0 gives none.
    min_distance_px
        The least distance from a centre to any pick (default ``diameter_px``).
    margin_px
        Keep this much more than the half box from the micrograph's border.
    whole_pixels
        Round the centres to whole pixels *before* the distance test: RELION cuts a box at
        the rounded coordinate, so the distance holds for the box it really cuts.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` float64 centres (x, y), ``n <= n_max``; ``(0, 2)`` when none fits.
    """
    height, width = shape
    distance = diameter_px if min_distance_px is None else min_distance_px
    step = max(diameter_px / 2, 1.0)
    low = box / 2 + margin_px
    xs = np.arange(low, width - low, step)
    ys = np.arange(low, height - low, step)
    if len(xs) == 0 or len(ys) == 0 or n_max <= 0:
        return np.zeros((0, 2))
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    grid = grid + rng.uniform(-step / 4, step / 4, grid.shape)
    if whole_pixels:
        grid = np.unique(np.round(grid), axis=0)  # a grid finer than 2 px may round together
    inside = (grid[:, 0] >= low) & (grid[:, 0] < width - low)
    grid = grid[inside & (grid[:, 1] >= low) & (grid[:, 1] < height - low)]
    picks = np.asarray(picks_xy, dtype=np.float64).reshape(-1, 2)
    if len(picks):
        nearest, _ = cKDTree(picks).query(grid)
        grid = grid[nearest >= distance]
    if len(grid) > n_max:
        grid = grid[rng.choice(len(grid), n_max, replace=False)]
    return grid


def cut_boxes(micrograph: np.ndarray, centres_xy: np.ndarray, box: int) -> np.ndarray:
    """The ``box``-pixel squares ``(n, box, box)`` float32 centred on ``centres_xy`` (the
    centre pixel at ``box // 2``, RELION's), each wholly inside the micrograph (ValueError
    otherwise: :func:`negative_centres` keeps them inside)."""
    image = np.asarray(micrograph, dtype=np.float32)
    out = np.empty((len(centres_xy), box, box), dtype=np.float32)
    half = box // 2
    for i, (x, y) in enumerate(np.asarray(centres_xy, dtype=np.float64)):
        x0, y0 = int(round(x)) - half, int(round(y)) - half
        if x0 < 0 or y0 < 0 or x0 + box > image.shape[1] or y0 + box > image.shape[0]:
            raise ValueError(f"box {i} at ({x:.1f}, {y:.1f}) reaches outside the micrograph")
        out[i] = image[y0 : y0 + box, x0 : x0 + box]
    return out


def micrograph_rng(entry: str | int, micrograph: str) -> np.random.Generator:
    """The random generator of one micrograph's negatives, from the entry's key and the
    micrograph's name only: the same entry gives the same negatives on every run, whatever the
    order or the number of its micrographs."""
    text = f"{entry}\0{micrograph}".encode()
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(text, digest_size=8).digest()))


def negative_chooser(
    entry: str | int, *, box: int, diameter_px: float, n_max: int
) -> Callable[[str, tuple[int, int], np.ndarray], np.ndarray]:
    """The negatives of each micrograph as extraction asks for them
    (``particleseg_model.relion.extract.NegativeCentres``): ``(name, (rows, columns), picks)``
    -> up to ``n_max`` centres by :func:`negative_centres`, whole pixels, at least
    ``diameter_px`` from every pick, seeded by :func:`micrograph_rng` (``entry``, ``name``).
    Sizes in micrograph pixels."""

    def choose(name: str, shape: tuple[int, int], picks_xy: np.ndarray) -> np.ndarray:
        return negative_centres(
            shape,
            picks_xy,
            box=box,
            diameter_px=diameter_px,
            rng=micrograph_rng(entry, name),
            n_max=n_max,
            whole_pixels=True,
        )

    return choose


def negative_rule(box: int, diameter_px: float, min_distance_px: float, n_max: int) -> str:
    """The rule :func:`negative_centres` applied, in one sentence (recorded in manifests and the
    corpus attributes). Sizes in micrograph pixels."""
    return (
        f"box centres on a jittered grid of step {diameter_px / 2:.1f} px, each at least "
        f"{min_distance_px:.1f} px (one particle diameter) from every pick of its micrograph, "
        f"the whole {box} px box inside the micrograph, at most {n_max} per micrograph chosen "
        "at random (seeded by the entry and the micrograph's name); labelled all background"
    )
