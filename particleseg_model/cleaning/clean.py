"""Clean a user's RELION particle set: score every particle from its predicted mask, drop the worst.

:func:`clean_star` streams the particles of a STAR file (RELION 3.0/3.1/5.0; stacks found
relative to the STAR file or to ``particles_dir``) in batches through a registered model, scores
each particle from its predicted mask (0 background, 1 signal, 2 edge) and writes

- the cleaned STAR file in the *input's* RELION flavour (every block, column and value as read,
  only the kept particle rows, in their original order);
- the score table of every particle (Parquet, or CSV for a ``.csv`` name);
- optionally a report folder: ``score_histogram.png``, ``gallery.png``, ``report.json``.

Scores (higher = better particle, for both):

- ``ets``: the paper's edge-to-signal ratio (edge pixels / signal pixels, 0 without signal); the
  paper drops the particles with the *lowest* ETS (30 % of EMPIAR-10406).
- ``calibrated``: how typical a particle's (ETS, signal area) pair is for this data set (see
  :func:`calibrated_scores`); it also drops fragments (ETS too high), aggregates (area too
  large) and empty or ice particles (no signal), which the ETS rule keeps or misses.
- ``centred``: the model's mean signal probability inside the box's central disc (radius
  box / 4: the particle's radius when, as usual, the box is twice the particle); empty boxes,
  picks between particles and off-centre picks score low. It needs no calibration and measured
  best on real particles (docs/real_particles.md).

Every image is put on the corpus' scale first
(:func:`particleseg_model.model.predict.normalise_for_model`), so a stack in any units scores as
the same stack RELION-normalised; an image with a NaN or infinite pixel is unreadable (counted and
dropped, never scored). A model that finds signal on (almost) no particle
(:data:`OOD_NO_SIGNAL_SHARE`) does not see these images (out of distribution): one line says so,
the report records it, and no particle is dropped by a ranking that would only be row order. A
set where most particles, but not (almost) all, have no signal (:data:`NO_SIGNAL_WARN_SHARE`) is
what a set that is mostly junk looks like (the paper's EMPIAR-10406 was 75 % junk): one line
warns and the cleaning goes on.

Memory stays at one batch of images whatever the number of particles; outputs are written under
temporary names and renamed into place only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from particleseg_model.atomic import atomic_path, remove_stale_temporaries
from particleseg_model.cleaning.inputs import (
    INPUT_STAR,
    check_outputs,
    check_space,
    check_writable,
)
from particleseg_model.corpus.labels import EDGE, SIGNAL
from particleseg_model.em.mrc import MrcError, read_particles, read_particles_table
from particleseg_model.em.star import ParticleStar, read_star, write_star_as_read
from particleseg_model.model.calibration import calibrated_scores

__all__ = [
    "DEFAULT_DROP",
    "DEFAULT_SCORE",
    "SCORES",
    "NO_SIGNAL_WARN_SHARE",
    "OOD_NO_SIGNAL_SHARE",
    "CleanResult",
    "clean_star",
    "is_mostly_without_signal",
    "is_out_of_distribution",
    "no_signal_line",
    "score_particles",
    "select_particles",
    "tie_order",
]

DEFAULT_DROP = 0.3  # the paper's share of particles dropped (EMPIAR-10406)
SCORES = ("ets", "calibrated", "centred")
DEFAULT_SCORE = "centred"
"""The score used unless one is asked for. Measured with the pretrained model
(docs/real_particles.md, docs/pretrained.md): ROC AUC good vs junk 0.956 on real EMPIAR-10017
particles of micrographs it never trained on (calibrated 0.936, the paper's ETS 0.638;
``benchmarks/real_particles.py --micrographs odd``) and 0.9996 on simulated particles of a map
it never saw, junk of the six kinds at 24.55 % good (calibrated 0.720, ETS 0.546;
``benchmarks/clean_quality.py --model particleseg_model/pretrained --map emd_5625.map``). With
the edge derived from the signal, ETS measures only the mask's size and shape; ``score="ets"``
keeps the paper's rule."""
ON_BAD = ("skip", "stop")
GALLERY_PER_GROUP = 6  # particles shown for each of the lowest, median and highest scores
OOD_NO_SIGNAL_SHARE = 0.9
"""Out of distribution above this share of readable particles without predicted signal: the
model finds signal in fewer than 1 particle in 10, so it does not see these images, and every
particle is kept whatever the score. Measured (``benchmarks/no_signal_guard.py``,
``benchmarks/real_particles.py``; docs/classify_2d.md): a model trained on simulated EMD-1832
particles finds no signal in 100 % of 3,000 real EMPIAR-10017 particles, in 93.1 % of 29 raw
real particles (three public sets) and in 97.8 % of Gaussian noise (the shipped model: 99.2 %),
while on simulated sets it sees, with the six junk kinds, it finds none in 73.8 % at the
paper's 24.57 % good, 85.9 % at 10 % good and 90.6 % at 5 % good (98-100 % of the good
particles have signal): sets with less than about 5 % good particles are kept whole too. Past
this share the ETS ranking is ties at 0 broken by the tie order (a random drop), and the
centred score of a blind model is no better (ROC AUC 0.42 on the real particles: inverted)."""
NO_SIGNAL_WARN_SHARE = 0.5
"""Above this share without signal (up to :data:`OOD_NO_SIGNAL_SHARE`) one line warns and the
cleaning goes on: a set that is mostly junk has no signal in most particles (72.5 % of the
simulated 10,000-particle set at 24.57 % good), and those rank lowest, as the paper's rule
wants (there 2,995 of the 3,000 dropped were junk); but a model that sees only some of the
images would look the same, which the line asks the user to check (the report's gallery)."""

Log = Callable[[str], None]

# chi-square quantiles with 2 degrees of freedom, closed form: -2 ln(1 - p)


@dataclass
class CleanResult:
    """What :func:`clean_star` did. Counts are particles (STAR rows)."""

    source: Path
    out: Path
    scores_path: Path
    score: str
    total: int
    kept: int
    dropped: int  # readable particles dropped by the score
    skipped: int  # unreadable particles (missing or broken images), always dropped
    cut: float  # keep_above, or the lowest kept score (NaN when nothing is kept)
    version: str  # RELION flavour of the input, and so of the output
    model_version: str
    model_input_size: int
    box: int
    seconds: float
    report: dict[str, Path] = field(default_factory=dict)
    no_signal: int = 0  # readable particles without predicted signal
    out_of_distribution: bool = False  # no_signal > OOD_NO_SIGNAL_SHARE: nothing dropped

    @property
    def particles_per_s(self) -> float:
        return self.total / max(self.seconds, 1e-9)

    @property
    def no_signal_share(self) -> float:
        """Share of the readable particles without predicted signal (0 when none is readable)."""
        return self.no_signal / max(self.total - self.skipped, 1)

    def summary(self) -> dict[str, Any]:
        """The version, counts, cut and speed in plain values (what the platform shows as the
        cleaning's metadata; particles per second to 1 decimal)."""
        return {
            "model_version": self.model_version,
            "score": self.score,
            "relion_version": self.version,
            "particles_before": self.total,
            "particles_after": self.kept,
            "dropped": self.dropped,
            "unreadable": self.skipped,
            "cut": float(self.cut),
            "particles_per_s": round(self.particles_per_s, 1),
            # only when it happened: the metadata of a normal cleaning stays as it was
            **(
                {"out_of_distribution": True, "no_signal_share": round(self.no_signal_share, 4)}
                if self.out_of_distribution
                else {}
            ),
        }


# ------------------------------------------------------------------------------------ scoring


@dataclass
class _Scored:
    star: ParticleStar
    scores: pd.DataFrame
    network: Any
    version: Any  # registry.ModelVersion
    base_dir: Path
    box: int
    no_signal: int  # readable particles without predicted signal
    out_of_distribution: bool
    edge_from_signal: bool
    scale: float | None  # the stack's spread at the model's input size (stack_scale), its units


MIN_SIGNAL_MODEL_PX = 4
"""Fewer signal pixels than this, counted at the model's input size, are a speck, not a
particle: scored as no signal (and no edge). A model shown a box without contrast can answer
with one stray pixel (a tiny test model did, on 5 of 6 empty boxes), whose ETS would be the
highest there is; the smallest real particle a model is trained on covers hundreds of pixels."""


def min_signal_px(box: int, model_size: int) -> int:
    """Signal pixels at the particles' ``box`` below which a mask is a speck
    (:data:`MIN_SIGNAL_MODEL_PX` at the model's ``model_size``, scaled by the area ratio)."""
    return max(1, math.ceil(MIN_SIGNAL_MODEL_PX * (box / model_size) ** 2))


def no_signal_line(model_version: str, no_signal: int, readable: int, consequence: str) -> str:
    """The one line saying a model found no signal on most particles.

    Out of distribution (:func:`is_out_of_distribution`) it says the images are unlike the
    model's training data; below that (:func:`is_mostly_without_signal`) it says the set is
    mostly junk to the model, or partly unlike its training data.

    Parameters
    ----------
    model_version
        The model's version (``"v0001"``).
    no_signal, readable
        Readable particles without predicted signal, and readable particles.
    consequence
        What the caller does about it, appended after a colon.

    Returns
    -------
    str
        E.g. "model v0001 found no particle signal in 2,990 of 3,000 particles (99.7%): ...".
    """
    share = no_signal / max(readable, 1)
    cause = (
        "these images are unlike its training data (out of distribution)"
        if is_out_of_distribution(no_signal, readable)
        else "most of the set is junk to it, or the images are partly unlike its training data "
        "(check the gallery)"
    )
    return (
        f"model {model_version} found no particle signal in {no_signal:,} of {readable:,} "
        f"particles ({100 * share:.1f}%): {cause}; {consequence}"
    )


def is_out_of_distribution(no_signal: int, readable: int) -> bool:
    """True when more than :data:`OOD_NO_SIGNAL_SHARE` of ``readable`` have no signal: the
    model sees (almost) nothing in these images, so its ranking would be the tie order.

    Parameters
    ----------
    no_signal, readable
        Readable particles without predicted signal, and readable particles.

    Returns
    -------
    bool
    """
    return readable > 0 and no_signal > OOD_NO_SIGNAL_SHARE * readable


def is_mostly_without_signal(no_signal: int, readable: int) -> bool:
    """True when more than :data:`NO_SIGNAL_WARN_SHARE` of ``readable`` have no signal but the
    set is not out of distribution (:func:`is_out_of_distribution`): worth one line, and the
    cleaning goes on.

    Parameters
    ----------
    no_signal, readable
        Readable particles without predicted signal, and readable particles.

    Returns
    -------
    bool
    """
    return (
        readable > 0
        and no_signal > NO_SIGNAL_WARN_SHARE * readable
        and not is_out_of_distribution(no_signal, readable)
    )


def _scale_rows(n: int) -> np.ndarray:
    """Rows read for the stack's scale: :data:`~particleseg_model.model.predict.SCALE_SAMPLE`
    evenly spaced through all ``n`` (a stack sorted by micrograph or defocus is sampled whole)."""
    from particleseg_model.model.predict import SCALE_SAMPLE

    return np.unique(np.linspace(0, n - 1, min(n, SCALE_SAMPLE)).round().astype(np.int64))


def scale_note(scale: float | None) -> str | None:
    """The line saying a stack is not in the corpus' units (None when it is, about 1).

    Parameters
    ----------
    scale
        :func:`~particleseg_model.model.predict.stack_scale` of the stack.

    Returns
    -------
    str or None
    """
    if scale is None or 0.5 <= scale <= 2:
        return None
    return (
        f"particle images are in other units than the model's (a spread of {scale:.3g} per "
        "particle, the corpus' 1): normalised for the model (background plane and mean "
        "removed, divided by that spread)"
    )


def _read_batch(
    rows: pd.DataFrame, base_dir: Path, box: int | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images of the readable rows, readable mask, error per row ("" if readable)).

    One read per batch; only a batch that fails is read again image by image, to find which
    rows are bad. Images of another size than ``box`` (the first readable particle's) are bad.
    """
    n = len(rows)
    try:
        images = read_particles_table(rows, base_dir=base_dir)
    except MrcError:
        images = None
    if images is not None and (box is None or images.shape[1:] == (box, box)):
        if images.shape[1] != images.shape[2]:
            # a property of the data set, not of one row: no skipping it
            raise MrcError(
                f"{rows['image_name'].iloc[0]}: particle images are "
                f"{images.shape[2]} x {images.shape[1]} pixels, not square"
            )
        return images, np.ones(n, bool), [""] * n
    names = rows["image_name"].tolist()
    ok, errors, kept = np.zeros(n, bool), [""] * n, []
    for i, name in enumerate(names):
        try:
            image = read_particles([name], base_dir=base_dir)
        except MrcError as exc:
            errors[i] = str(exc)
            continue
        if box is None:
            box_y, box_x = image.shape[1:]
            if box_y != box_x:
                raise MrcError(f"{name}: particle images are {box_x} x {box_y} pixels, not square")
            box = int(box_x)
        if image.shape[1:] != (box, box):
            errors[i] = (
                f"{name}: image is {image.shape[2]} x {image.shape[1]} px, the first "
                f"readable particle {box} x {box}"
            )
            continue
        ok[i] = True
        kept.append(image[0])
    stacked = np.stack(kept) if kept else np.zeros((0, box or 0, box or 0), np.float32)
    return stacked, ok, errors


def _score(
    star: str | os.PathLike | ParticleStar,
    *,
    model: str | os.PathLike | None,
    models_root: str | os.PathLike | None,
    particles_dir: str | os.PathLike | None,
    batch: int,
    on_bad: str,
    progress: bool | None,
    log: Log | None,
    guard: Callable[[dict[Path, str]], None] | None = None,
) -> _Scored:
    from particleseg_model.cleaning.inputs import check_one_box, read_paths
    from particleseg_model.model.inference import load_engine
    from particleseg_model.model.predict import (
        finite_images,
        predict_labels_and_centre,
        stack_scale,
    )
    from particleseg_model.model.registry import resolve_model
    from particleseg_model.progress import progress as bar

    say = log or (lambda line: None)
    _check_options(batch=batch, on_bad=on_bad)
    parsed = star if isinstance(star, ParticleStar) else read_star(star)
    star_path = parsed.source
    particles = parsed.particles
    if particles.empty:
        raise ValueError(f"{star_path}: no particles")
    version = resolve_model(model, models_root)
    base_dir = Path(particles_dir) if particles_dir else star_path.parent
    # before the model loads and anything is read: one box, and nothing read is an output
    check_one_box(star_path, particles, base_dir)
    if guard is not None:
        guard(read_paths(star_path, particles, base_dir, version.path))
    # ONNX Runtime when installed (the onnx extra), else Keras: model.inference
    network = load_engine(version, log=say)
    size = version.input_size
    from_signal = bool(version.manifest.get("edge_from_signal", False))

    n = len(particles)
    # one scale for the stack, from a sample read before the stream (see normalise_for_model):
    # its spread at the particles' box says the units, at the model's size it scales the input
    sample = _read_batch(particles.iloc[_scale_rows(n)], base_dir, None)[0]
    scale = stack_scale(sample, size=size)
    note = scale_note(stack_scale(sample))
    if note:
        say(note)
    readable = np.zeros(n, bool)
    signal_px = np.zeros(n, np.int64)
    edge_px = np.zeros(n, np.int64)
    centred = np.zeros(n, np.float64)
    errors = [""] * n
    box: int | None = None
    disable = None if progress is None else not progress
    with bar(total=n, desc="score", unit="particle", disable=disable) as shown:
        for start in range(0, n, batch):
            rows = particles.iloc[start : start + batch]
            images, ok, batch_errors = _read_batch(rows, base_dir, box)
            finite = finite_images(images)
            if not finite.all():
                # a NaN pixel makes the whole particle's prediction meaningless: unreadable
                read_rows = np.flatnonzero(ok)
                for j in np.flatnonzero(~finite):
                    bad_px = int(np.count_nonzero(~np.isfinite(images[j])))
                    batch_errors[read_rows[j]] = (
                        f"{rows['image_name'].iloc[read_rows[j]]}: {bad_px} non-finite pixels "
                        "(NaN or inf)"
                    )
                ok[read_rows[~finite]] = False
                images = images[finite]
            bad = np.flatnonzero(~ok)
            if len(bad) and on_bad == "stop":
                row = start + int(bad[0])
                raise MrcError(
                    f"{star_path}: particle row {row + 1} of {n} cannot be read: "
                    f"{batch_errors[bad[0]]}"
                )
            for i in bad:
                errors[start + i] = batch_errors[i]
            if len(images):
                if box is None:
                    box = int(images.shape[1])
                    if box != size:
                        say(
                            f"particles are {box} px, the model takes {size} px: resizing "
                            f"each particle to {size} and the masks back to {box}"
                        )
                labels, centre = predict_labels_and_centre(
                    network,
                    images,
                    scale=scale,
                    edge_from_signal=from_signal,
                )
                where = start + np.flatnonzero(ok)
                readable[where] = True
                signal_px[where] = np.count_nonzero(labels == SIGNAL, axis=(1, 2))
                centred[where] = centre
                edge_px[where] = np.count_nonzero(labels == EDGE, axis=(1, 2))
            shown.update(len(rows))
    skipped = int((~readable).sum())
    if skipped:
        first = [f"row {r + 1} ({errors[r]})" for r in np.flatnonzero(~readable)[:3]]
        say(
            f"{skipped} of {n} particles cannot be read and are skipped (dropped): "
            + "; ".join(first)
            + (" ..." if skipped > 3 else "")
        )
    if box is None:
        raise MrcError(
            f"{star_path}: none of the {n} particle images can be read (first: {errors[0]})"
        )

    # a speck is no particle: without this a box the model sees nothing in but one pixel
    # would get the largest ETS there is (a whole 11 x 11 edge band over 1 signal pixel)
    speck = signal_px < min_signal_px(box, size)
    signal_px[speck], edge_px[speck] = 0, 0
    no_signal = int((readable & (signal_px == 0)).sum())
    out_of_distribution = is_out_of_distribution(no_signal, int(readable.sum()))
    signal = signal_px.astype(np.float64)
    ets = np.divide(edge_px, signal, out=np.zeros(n), where=signal > 0)
    scores = pd.DataFrame(
        {
            "row": np.arange(1, n + 1, dtype=np.int64),  # the STAR row, 1-based
            "image_name": particles["image_name"].astype(str).to_numpy(),
            "readable": readable,
            "error": errors,
            "signal_px": signal_px,
            "edge_px": edge_px,
            "ets": ets,
            "signal_fraction": signal / (box * box),
            "centred": centred,
        }
    )
    reference = version.manifest.get("calibration")
    scores["calibrated"] = calibrated_scores(ets, signal_px, readable, box=box, reference=reference)
    say(
        f"calibrated score: {'the model manifest' if reference else 'this data set'}'s "
        "distribution of mask ETS and signal area"
        + (f" ({reference['particles']} good training particles)" if reference else "")
    )
    # unreadable particles have no scores, not zero ones
    for col in ("signal_px", "edge_px"):
        scores[col] = scores[col].astype("Int64").mask(~readable)
    scores.loc[~readable, ["ets", "signal_fraction", "centred"]] = np.nan
    return _Scored(
        parsed,
        scores,
        network,
        version,
        base_dir,
        box,
        no_signal,
        out_of_distribution,
        from_signal,
        scale,
    )


def score_particles(
    star: str | os.PathLike | ParticleStar,
    *,
    model: str | os.PathLike | None = None,
    models_root: str | os.PathLike | None = None,
    particles_dir: str | os.PathLike | None = None,
    batch: int = 256,
    on_bad: str = "skip",
    progress: bool | None = None,
    log: Log | None = None,
) -> tuple[ParticleStar, pd.DataFrame]:
    """Score every particle of ``star`` from the mask ``model`` predicts: (the STAR, scores).

    ``model``: a registered version folder or its ``model.keras``; None: the latest under
    ``models_root`` (default ``$PARTICLESEG_DATA/models``, else ``./data/models``). Particles
    are read ``batch`` at a time (one batch in memory); a box other than the model's input is
    resized by :func:`particleseg_model.model.predict.predict_labels` (logged once).

    The score table has one row per STAR row, in order: ``row`` (1-based, as every message
    numbers rows), ``image_name``,
    ``readable`` (False for a missing or broken image), ``error`` (why not, else ""),
    ``signal_px`` and ``edge_px`` (predicted pixels at the particle's box), ``ets`` (edge /
    signal, 0 without signal), ``signal_fraction`` (signal pixels / box pixels) and
    ``calibrated`` (:func:`calibrated_scores`). Unreadable rows have NaN/NA values.

    ``on_bad``: "skip" counts unreadable rows (logged); "stop" raises :class:`MrcError`
    naming the STAR file, the row and the image. An image with a NaN or infinite pixel is
    unreadable. Images are normalised with
    :func:`~particleseg_model.model.predict.normalise_for_model` first; a model whose manifest
    says ``edge_from_signal`` derives the edge from its signal. When most readable particles
    have no signal (:data:`OOD_NO_SIGNAL_SHARE`), ``log`` gets one :func:`no_signal_line`.
    """
    scored = _score(
        star,
        model=model,
        models_root=models_root,
        particles_dir=particles_dir,
        batch=batch,
        on_bad=on_bad,
        progress=progress,
        log=log,
    )
    if scored.out_of_distribution and log is not None:
        readable = int(scored.scores["readable"].sum())
        log(
            no_signal_line(
                scored.version.version,
                scored.no_signal,
                readable,
                "the ranking is not meaningful",
            )
        )
    return scored.star, scored.scores


# ---------------------------------------------------------------------------------- selecting


def _check_options(
    *,
    batch: int | None = None,
    on_bad: str | None = None,
    score: str | None = None,
    drop: float | None = None,
    keep_above: float | None = None,
    selecting: bool = False,
) -> None:
    if batch is not None and (not isinstance(batch, int | np.integer) or batch < 1):
        raise ValueError(f"batch must be a positive number of particles, got {batch!r}")
    if on_bad is not None and on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {', '.join(ON_BAD)}, got {on_bad!r}")
    if score is not None and score not in SCORES:
        raise ValueError(f"unknown score {score!r} (known: {', '.join(SCORES)})")
    if selecting:
        if drop is not None and keep_above is not None:
            raise ValueError(f"give either drop ({drop}) or keep_above ({keep_above}), not both")
        if drop is not None and not 0 <= drop < 1:
            raise ValueError(f"drop must be a fraction in [0, 1), got {drop}")
        if keep_above is not None and math.isnan(keep_above):
            raise ValueError("keep_above must be a number, got nan")


def select_particles(
    scores: pd.DataFrame,
    *,
    score: str = DEFAULT_SCORE,
    drop: float | None = None,
    keep_above: float | None = None,
) -> np.ndarray:
    """Boolean keep mask over the rows of ``scores`` (a :func:`score_particles` table).

    ``drop``: drop the ``floor(drop * n)`` lowest-scored of the ``n`` readable particles (the
    paper: 339,043 -> 237,331 kept with 0.3). Ties at the cut (many particles share an ETS,
    0 without signal) are broken by :func:`tie_order`: a hash of the image name, so the kept
    set is the same whatever the order of the rows (a file sorted by micrograph or defocus
    does not lose its first micrographs) and on every run; a table without ``image_name``
    breaks them by row.
    ``keep_above``: keep the readable particles whose score is > ``keep_above``. At most one of
    the two; neither means ``drop`` = :data:`DEFAULT_DROP`. Unreadable particles are always
    dropped. Raises ValueError for a drop outside [0, 1) or an unknown score.
    """
    _check_options(score=score, drop=drop, keep_above=keep_above, selecting=True)
    if score not in scores:
        raise ValueError(f"the score table has no column {score!r}")
    readable = scores["readable"].to_numpy(dtype=bool)
    values = scores[score].to_numpy(dtype=np.float64, na_value=np.nan)
    values = np.where(np.isnan(values), -np.inf, values)
    keep = np.zeros(len(scores), bool)
    if keep_above is not None:
        keep[readable] = values[readable] > keep_above
        return keep
    fraction = DEFAULT_DROP if drop is None else float(drop)
    candidates = np.flatnonzero(readable)
    # the 1e-9 keeps 0.3 * 10 (2.9999...) from dropping one particle too few
    n_drop = int(math.floor(fraction * len(candidates) + 1e-9))
    # lexsort: last key first: the score, then the tie order, then the row
    ties = tie_order(scores)
    order = candidates[np.lexsort((candidates, ties[candidates], values[candidates]))]
    keep[order[n_drop:]] = True
    return keep


def tie_order(scores: pd.DataFrame) -> np.ndarray:
    """The rank among equal scores (lower goes first): CRC-32 of each ``image_name``
    (``"N@stack"`` as in the STAR file), independent of the row order; zeros (row order)
    for a table without names.

    Parameters
    ----------
    scores
        A :func:`score_particles` table.

    Returns
    -------
    numpy.ndarray
        uint32, one per row.
    """
    if "image_name" not in scores:
        return np.zeros(len(scores), np.uint32)
    return np.fromiter(
        (zlib.crc32(str(name).encode()) for name in scores["image_name"]),
        dtype=np.uint32,
        count=len(scores),
    )


def _cut(scores: pd.DataFrame, keep: np.ndarray, score: str, keep_above: float | None) -> float:
    if keep_above is not None:
        return float(keep_above)
    kept = scores[score].to_numpy(dtype=np.float64, na_value=np.nan)[keep]
    return float(kept.min()) if len(kept) else float("nan")


# ----------------------------------------------------------------------------------- cleaning


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where a folder made for it would go)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _refuse_keeping_none(
    star: Path, scores: pd.DataFrame, keep: np.ndarray, score: str, keep_above: float | None
) -> None:
    """A rule that keeps none of the readable particles is a mistake, not a cleaning: refuse
    it (nothing is written) with the range of the scores, so the user picks a cut in it."""
    readable = scores["readable"].to_numpy(dtype=bool)
    if keep.any() or not readable.any():
        return
    values = scores[score].to_numpy(dtype=np.float64, na_value=np.nan)[readable]
    finite = values[np.isfinite(values)]
    span = (
        f"their {score} scores run from {finite.min():.4g} to {finite.max():.4g}"
        if len(finite)
        else f"none has a finite {score} score"
    )
    rule = (
        f"keeping the particles scoring above {keep_above:g}"
        if keep_above is not None
        else "the rule"
    )
    raise ValueError(
        f"{star}: {rule} keeps none of the {int(readable.sum())} readable particles ({span}); "
        "nothing written: choose a lower cut"
    )


def default_scores_path(out: str | os.PathLike) -> Path:
    """``<out stem>_scores.parquet`` beside ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_scores.parquet")


def _write_scores(path: Path, scores: pd.DataFrame, as_csv: bool) -> None:
    if as_csv:
        scores.to_csv(path, index=False)
    else:
        scores.to_parquet(path, index=False)


def clean_star(
    star: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    models_root: str | os.PathLike | None = None,
    drop: float | None = None,
    keep_above: float | None = None,
    score: str = DEFAULT_SCORE,
    particles_dir: str | os.PathLike | None = None,
    report_dir: str | os.PathLike | None = None,
    scores_out: str | os.PathLike | None = None,
    on_bad: str = "skip",
    batch: int = 256,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Log | None = None,
) -> CleanResult:
    """Write ``out``: the particles of ``star`` that ``score`` keeps, in the input's flavour.

    Selection as :func:`select_particles` (``drop`` fraction of the lowest, default
    :data:`DEFAULT_DROP`, or ``keep_above``); scoring as :func:`score_particles`. The cleaned
    STAR keeps every block, column and value of the input and the kept rows in their order
    (RELION 3.0 stays 3.0, 3.1 stays 3.1, 5.0 keeps its 50001 stamp). The scores of all
    particles, with a ``keep`` column, go to ``scores_out`` (default
    :func:`default_scores_path`; CSV for a ``.csv`` name, else Parquet). ``report_dir`` gets
    ``score_histogram.png``, ``gallery.png`` and ``report.json`` (replacing those files).

    Refused before any work: ``out`` (or ``scores_out``) being the input STAR, whatever
    ``overwrite`` says; an existing ``out`` or ``scores_out`` unless ``overwrite``. Every output
    is written under a temporary name and renamed only once all are written, the STAR last:
    a failure leaves no partial output.

    Out of distribution (more than :data:`OOD_NO_SIGNAL_SHARE` of the readable particles
    without predicted signal: the model sees almost nothing): every readable particle is kept
    whatever ``drop`` or ``keep_above`` say, the cut is NaN, ``log`` gets one
    :func:`no_signal_line` and the report records ``out_of_distribution`` and
    ``no_signal_share``. More than :data:`NO_SIGNAL_WARN_SHARE` without signal but not out of
    distribution (a set that is mostly junk): ``log`` gets one :func:`no_signal_line`, the
    report has the ``no_signal_share``, and the cleaning goes on.
    """
    started = time.perf_counter()
    star_path, out_path = Path(star), Path(out)
    scores_path = Path(scores_out) if scores_out is not None else default_scores_path(out_path)
    _check_options(
        batch=batch, on_bad=on_bad, score=score, drop=drop, keep_above=keep_above, selecting=True
    )
    outputs = {"--out": out_path, "--scores": scores_path}
    if report_dir is not None:
        outputs.update(
            {
                f"--report {name}": Path(report_dir) / name
                for name in ("score_histogram.png", "gallery.png", "report.json")
            }
        )
    files = {what: path for what, path in outputs.items() if what in ("--out", "--scores")}

    def guard(reads: dict[Path, str], *, existing: bool = True) -> None:
        # inputs first (an existing stack is refused as an input, not as an existing file);
        # the report's files are replaced (documented); --out and --scores only with overwrite
        check_outputs(outputs, reads, overwrite=True, folders=False)
        check_outputs(files, reads, overwrite=overwrite or not existing)
        if report_dir is not None:
            check_writable(_existing_ancestor(Path(report_dir)), "--report")
        if existing and star_path.is_file():
            # the cleaned STAR is at most the input's size, the score table less than that again
            check_space(out_path, 2 * star_path.stat().st_size, "--out and --scores")

    # before any work: the input STAR and the outputs' folders; once the STAR is read (its
    # stacks known) and the model found, every input and the existing outputs (_score)
    guard({star_path: INPUT_STAR}, existing=False)
    for path in outputs.values():
        remove_stale_temporaries(path)  # what a killed run of this command left

    scored = _score(
        star_path,
        model=model,
        models_root=models_root,
        particles_dir=particles_dir,
        batch=batch,
        on_bad=on_bad,
        progress=progress,
        log=log,
        guard=guard,
    )
    scores = scored.scores
    if scored.out_of_distribution:
        # Keep them all rather than refuse: the ranking would drop particles by row order (ties
        # at ETS 0), losing real data for nothing, while a refusal would fail the platform's
        # cleaning job over what one line and the report say; the output is the input's set.
        keep = scores["readable"].to_numpy(dtype=bool).copy()
        cut = float("nan")
        if log is not None:
            log(
                no_signal_line(
                    scored.version.version,
                    scored.no_signal,
                    int(keep.sum()),
                    f"the ranking is not meaningful: every readable particle is kept (none "
                    f"dropped by {score})",
                )
            )
    else:
        keep = select_particles(scores, score=score, drop=drop, keep_above=keep_above)
        cut = _cut(scores, keep, score, keep_above)
        _refuse_keeping_none(scored.star.source, scores, keep, score, keep_above)
        readable_n = int(scores["readable"].sum())
        if log is not None and is_mostly_without_signal(scored.no_signal, readable_n):
            # a mostly-junk set (the paper's case) looks like this too: clean, but say it
            log(
                no_signal_line(
                    scored.version.version,
                    scored.no_signal,
                    readable_n,
                    f"the cleaning goes on ({readable_n - int(keep.sum()):,} dropped by "
                    f"{score}; every particle is kept only when signal is found in fewer than "
                    f"{1 - OOD_NO_SIGNAL_SHARE:.0%})",
                )
            )
    scores["keep"] = keep
    total = len(scores)
    readable = scores["readable"].to_numpy(dtype=bool)
    kept, skipped = int(keep.sum()), int((~readable).sum())

    report: dict[str, Path] = {}
    # every output through the one atomic write; the ExitStack renames them all only once all
    # are written (in reverse order of staging) and removes every temporary file on a failure
    with contextlib.ExitStack() as staging:

        def stage(final: Path) -> Path:
            return staging.enter_context(atomic_path(final, mkdir=False))

        # staged first, so renamed last: the STAR appears only when everything else is in place
        star_tmp = stage(out_path)
        _write_scores(stage(scores_path), scores, scores_path.suffix.lower() == ".csv")
        if report_dir is not None:
            folder = Path(report_dir)
            folder.mkdir(parents=True, exist_ok=True)
            report = {
                name: folder / name
                for name in ("score_histogram.png", "gallery.png", "report.json")
            }
            _histogram_png(stage(report["score_histogram.png"]), scores, score, keep, cut)
            _gallery_png(stage(report["gallery.png"]), scored, score)
        write_star_as_read(star_tmp, scored.star, keep)
        seconds = time.perf_counter() - started
        result = CleanResult(
            source=scored.star.source,
            out=out_path,
            scores_path=scores_path,
            score=score,
            total=total,
            kept=kept,
            dropped=total - kept - skipped,
            skipped=skipped,
            cut=cut,
            version=scored.star.version,
            model_version=scored.version.version,
            model_input_size=scored.version.input_size,
            box=scored.box,
            seconds=seconds,
            report=report,
            no_signal=scored.no_signal,
            out_of_distribution=scored.out_of_distribution,
        )
        if report_dir is not None:
            stage(report["report.json"]).write_text(
                json.dumps(_report_json(result, drop, keep_above), indent=2, default=str)
            )
    return result


def _report_json(result: CleanResult, drop: float | None, keep_above: float | None) -> dict:
    return {
        "source_star": str(result.source.resolve()),
        "relion_version": result.version,
        "cleaned_star": str(result.out.resolve()),
        "scores": str(result.scores_path.resolve()),
        "score": result.score,
        "rule": (
            {"keep_above": keep_above}
            if keep_above is not None
            else {"drop": DEFAULT_DROP if drop is None else drop}
        ),
        # JSON has no infinities: -inf (a kept particle without signal) or nan as text
        "cut": result.cut if math.isfinite(result.cut) else str(result.cut),
        "particles": result.total,
        "kept": result.kept,
        "dropped": result.dropped,
        "skipped_unreadable": result.skipped,
        "no_signal": result.no_signal,
        "no_signal_share": round(result.no_signal_share, 4),
        # most particles without signal: nothing was dropped (see OOD_NO_SIGNAL_SHARE)
        "out_of_distribution": result.out_of_distribution,
        "model_version": result.model_version,
        "model_input_size": result.model_input_size,
        "box": result.box,
        "seconds": round(result.seconds, 3),
        "particles_per_s": round(result.particles_per_s, 1),
        "figures": {k: str(v.resolve()) for k, v in result.report.items() if k != "report.json"},
    }


# ------------------------------------------------------------------------------------- report


def _histogram_png(
    path: Path, scores: pd.DataFrame, score: str, keep: np.ndarray, cut: float
) -> None:
    """Histogram of the finite scores of the readable particles, the cut as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    values = scores[score].to_numpy(dtype=np.float64, na_value=np.nan)
    readable = scores["readable"].to_numpy(dtype=bool)
    finite = readable & np.isfinite(values)
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.subplots()
    shown = values[finite]
    outside = 0
    if len(shown):
        # far outliers (log-likelihoods of -1000, ETS of 100) would squash the bulk into one
        # bin: show the range around it, the outliers piled at its edges
        q1, q3 = np.percentile(shown, [25, 75])
        spread = max(q3 - q1, 1e-9)
        low, high = q1 - 4 * spread, q3 + 4 * spread
        if shown.min() >= 0:  # ETS: the axis starts at 0, where particles without signal are
            low = 0.0
        if np.isfinite(cut):
            low, high = min(low, cut), max(high, cut)
        outside = int(((shown < low) | (shown > high)).sum())
        shown = np.clip(shown, low, high)
    bins = np.histogram_bin_edges(shown, bins=40) if len(shown) else 10
    # matplotlib takes an array of bin edges
    axes.hist(shown[keep[finite]], bins=bins, color="tab:blue", label="kept")  # pyright: ignore[reportArgumentType]
    axes.hist(shown[~keep[finite]], bins=bins, color="tab:red", alpha=0.7, label="dropped")  # pyright: ignore[reportArgumentType]
    if np.isfinite(cut):
        axes.axvline(cut, color="black", linestyle="--", label=f"cut {cut:.3g}")
    title = f"{score}: {int(keep.sum())} kept, {int((readable & ~keep).sum())} dropped"
    hidden = int((readable & ~np.isfinite(values)).sum())
    if hidden:
        title += f"; {hidden} without signal not shown"
    if outside:
        title += f"; {outside} far outliers at the edges"
    if (~readable).any():
        title += f", {int((~readable).sum())} unreadable"
    axes.set_title(title, fontsize=9)
    axes.set_xlabel(f"{score} score (higher = better particle)")
    axes.set_ylabel("particles")
    axes.legend(fontsize=8)
    figure.tight_layout()
    with open(path, "xb") as fh:
        figure.savefig(fh, format="png")


def _gallery_png(path: Path, scored: _Scored, score: str) -> None:
    """Lowest-, median- and highest-scored readable particles (one band each, in that order),
    each above its predicted mask; the few images are read and segmented again."""
    from particleseg_model.figures import particles_with_masks, write_png
    from particleseg_model.model.predict import predict_labels

    scores = scored.scores
    readable = np.flatnonzero(scores["readable"].to_numpy(dtype=bool))
    values = scores[score].to_numpy(dtype=np.float64, na_value=np.nan)[readable]
    ranked = readable[np.lexsort((readable, np.where(np.isnan(values), -np.inf, values)))]
    k = min(GALLERY_PER_GROUP, max(1, len(ranked) // 3))
    middle = max(0, len(ranked) // 2 - k // 2)
    groups = [ranked[:k], ranked[middle : middle + k], ranked[len(ranked) - k :]]
    rows = np.concatenate(groups)
    images = read_particles_table(scored.star.particles.iloc[rows], base_dir=scored.base_dir)
    labels = predict_labels(
        scored.network,
        images,
        scale=scored.scale,
        edge_from_signal=scored.edge_from_signal,
    )
    grid = particles_with_masks(images, labels, columns=k)
    zoom = max(1, 64 // scored.box)  # small boxes are enlarged to be seen (nearest)
    grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
    text = {
        "Title": f"particleSeg clean: {score} lowest, median, highest (one band each)",
        "Rows": " | ".join(",".join(str(int(r)) for r in g) for g in groups),
    }
    write_png(path, grid, text)


def clean_to_folder(
    star: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_version: str | None = None,
    models_root: str | os.PathLike | None = None,
    drop: float = DEFAULT_DROP,
    keep_above: float | None = None,
    score: str = DEFAULT_SCORE,
    particles_dir: str | os.PathLike | None = None,
    on_bad: str = "skip",
    run_id: str | None = None,
    log: Log | None = None,
) -> CleanResult:
    """Clean ``star`` into a folder of its own (the platform's ``cleaned/<name>``), replacing
    what an earlier run left there.

    Writes, in ``out_dir`` (created): ``<star stem>_cleaned.star``, ``scores.parquet``, the
    ``report/`` folder of :func:`clean_star` and ``manifest.json`` (the source and cleaned
    STAR, the score table, ``model_version``, ``score``, ``kept``, ``total``, ``cut``,
    ``dagster_run_id``), each written atomically.

    Parameters
    ----------
    star
        The particle STAR file (never modified; ``~`` expanded).
    out_dir
        The output folder.
    model_version
        A version registered under ``models_root`` (``"v0002"`` or ``"2"``; it needs
        ``models_root``); None: the latest.
    models_root
        The model registry (a local path or a URL); None: :func:`resolve_model`'s default.
    drop, keep_above
        Drop this fraction of the readable particles, the lowest scores first; or, when
        ``keep_above`` is given, keep the particles scoring above it (``drop`` ignored).
    score, particles_dir, on_bad, log
        As :func:`clean_star`.
    run_id
        Recorded as the manifest's ``dagster_run_id``.

    Returns
    -------
    CleanResult

    Raises
    ------
    ModelError
        ``model_version`` is not registered (or given without ``models_root``).
    ValueError, MrcError, StarError
        As :func:`clean_star`.
    """
    from particleseg_model.atomic import atomic_write_json
    from particleseg_model.model.registry import ModelError, get_model

    star, out = Path(star).expanduser(), Path(out_dir)
    if model_version and models_root is None:
        raise ModelError(f"model {model_version!r}: give the models_root it is registered in")
    out.mkdir(parents=True, exist_ok=True)
    # models_root is checked above whenever model_version is given
    model = get_model(models_root, model_version).address if model_version else None  # pyright: ignore[reportArgumentType]
    # our own folder: outputs are replaced (each written to a temporary name, then renamed)
    result = clean_star(
        star,
        out / f"{star.stem}_cleaned.star",
        model=model,
        models_root=models_root,
        drop=None if keep_above is not None else drop,
        keep_above=keep_above,
        score=score,
        particles_dir=particles_dir,
        report_dir=out / "report",
        scores_out=out / "scores.parquet",
        on_bad=on_bad,
        overwrite=True,
        progress=False,
        log=log,
    )
    if log is not None:
        log(
            f"{star}: kept {result.kept} of {result.total} particles "
            f"({result.dropped} dropped by {result.score}, {result.skipped} unreadable) "
            f"with model {result.model_version} at {result.particles_per_s:.0f} "
            f"particles/s: {result.out}"
        )
    atomic_write_json(
        out / "manifest.json",
        {
            "source_star": str(star.resolve()),
            "cleaned_star": str(result.out),
            "scores": str(result.scores_path),
            "model_version": result.model_version,
            "score": result.score,
            "kept": result.kept,
            "total": result.total,
            "cut": result.cut,
            "dagster_run_id": run_id,
        },
    )
    return result
