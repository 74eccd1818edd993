"""The corpus build of one EMPIAR entry (one partition), step by step, as plain Python calls.

    particle stacks -> refined poses -> mask volume -> labelled partition (Zarr)

A micrograph entry also gives *negatives* (:mod:`particleseg_model.corpus.negatives`): boxes
cut by ``relion_preprocess`` exactly as the particles, from regions at least a particle
diameter from every pick. They travel beside the particles (their own STAR file and stacks,
recorded in the stacks manifest), never enter refinement or the mask projection, and join the
partition with all-background labels, marked ``negative`` in its table.

Each step takes the manifests of the steps before it, an options dataclass (the Dagster
launchpad config of the matching asset has exactly these fields and defaults), writes its output
and its manifest (:mod:`particleseg_model.corpus.manifests`) into its own folder, and returns a
result: the manifest plus the figures a caller may want to report (counts, seconds, the gallery
PNG, the check values). Nothing here knows about Dagster; the assets of
``particleseg_assets.assets.corpus`` read their config, call one of these functions and turn the
result into asset metadata and check results::

    from particleseg_model.access import EmdbClient, EmpiarClient, archive_url
    from particleseg_model.corpus import build

    work, entry = Path("work"), EmpiarClient().entry("10028")  # EBI, or PARTICLESEG_EMPIAR_URL
    resolution = build.best_map_resolution_a(entry, emdb=EmdbClient())
    stacks = build.fetch_stacks(entry, archive_url(), work / "downloads",
                                work / "particle_stacks", map_resolution_a=resolution,
                                emdb=EmdbClient(), map_cache=work / "emdb").manifest
    refined = build.refine_poses(stacks, work / "refined_particles").manifest
    mask = build.make_mask_volume(stacks, refined, work / "mask_volume").manifest
    labels = build.label_partition(stacks, refined, mask, work / "corpus",
                                   work / "particle_masks")

Conventions: pixel sizes and resolutions in Angstrom, boxes in pixels, STAR rows 1-based in
messages. ``log`` callables receive one progress line at a time (no trailing newline).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from particleseg_model.access.dataset import EntryFiles, fetch_entry_files
from particleseg_model.access.empiar import EmdbClient, Entry, partition_key
from particleseg_model.access.http import HttpClient
from particleseg_model.atomic import atomic_path
from particleseg_model.corpus.labels import labels_from_projection
from particleseg_model.corpus.manifests import (
    LabelsManifest,
    MaskManifest,
    RefinedManifest,
    StacksManifest,
)
from particleseg_model.corpus.negatives import negative_chooser, negative_rule
from particleseg_model.corpus.projection import project_masks
from particleseg_model.corpus.reference import reference_map
from particleseg_model.corpus.store import (
    NEGATIVE_COLUMN,
    CorpusDataset,
    CorpusWriter,
    list_corpus,
    open_corpus,
)
from particleseg_model.em import maps
from particleseg_model.em.cryosparc import read_cs
from particleseg_model.em.mrc import MrcError, open_stack, read_particles_table
from particleseg_model.em.particles import (
    ParticleTableError,
    complete_from_stacks,
    particle_groups,
)
from particleseg_model.em.star import ParticleStar, has_poses, read_star, write_star
from particleseg_model.figures import particles_with_masks, write_png
from particleseg_model.relion import (
    Refinement,
    auto_refine,
    extract_particles,
    summarise_pose_errors,
)
from particleseg_model.relion import pose_errors as relion_pose_errors

__all__ = [
    "MAX_EMPTY_SHARE",
    "POSE_COLUMNS",
    "SIGNAL_FRACTION_RANGE",
    "LabelOptions",
    "LabelResult",
    "LocalRelion",
    "MaskOptions",
    "MaskResult",
    "MasksCheck",
    "PosesCheck",
    "RefineOptions",
    "RefineResult",
    "RelionHost",
    "ResolutionCheck",
    "RowsCheck",
    "StacksOptions",
    "StacksResult",
    "best_map_resolution_a",
    "check_rows",
    "extracted_truth",
    "fetch_stacks",
    "label_partition",
    "make_mask_volume",
    "masks_check",
    "poses_check",
    "refine_poses",
    "row_ranges",
    "rows_check",
]

Log = Callable[[str], None]


def _quiet(line: str) -> None:
    """The default ``log``: progress lines go nowhere."""


def _prefixed(log: Log, prefix: str) -> Log:
    def write(line: str) -> None:
        log(f"{prefix}: {line}")

    return write


class RelionHost(Protocol):
    """Where and how RELION runs: MPI ranks and threads per rank for ``relion_refine_mpi``, and
    a context entered around every RELION call (e.g. one that puts a RELION build first on
    PATH). ``particleseg_assets.resources.RelionResource`` is one."""

    def ranks(self) -> int: ...

    def threads_per_rank(self) -> int: ...

    def on_path(self) -> AbstractContextManager[Any]: ...


@dataclass(frozen=True)
class LocalRelion:
    """RELION's programs as found on PATH, with ``mpi_ranks`` ranks (a leader and one rank per
    half-set by default) of ``threads`` threads each."""

    mpi_ranks: int = 3
    threads: int = 1

    def ranks(self) -> int:
        return self.mpi_ranks

    def threads_per_rank(self) -> int:
        return self.threads

    def on_path(self) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()


# ------------------------------------------------------------------------------ particle stacks


@dataclass(frozen=True)
class StacksOptions:
    """How :func:`fetch_stacks` gets the particle images (the ``particle_stacks`` config)."""

    box_px: int = 0
    """Extraction box (micrograph entries only); 0: the entry's own (simulation.json) or twice
    the particle diameter of its map."""
    rescale_px: int = 0
    """Rescale extracted particles to this box; 0: keep the extraction box."""
    invert_contrast: bool = True
    """Deposited micrographs show particles dark; the corpus wants them bright."""
    negatives_per_micrograph: int = 20
    """Micrograph entries: also cut up to this many negatives per micrograph with picks (boxes
    centred at least one particle diameter from every pick, extracted by relion_preprocess
    exactly as the particles, labelled all background in the corpus: real "no particle here"
    examples); 0: none."""


@dataclass(frozen=True)
class StacksResult:
    """What :func:`fetch_stacks` made: the manifest (written), the gallery of the first
    particles (PNG), the wall time of the step in seconds, and (with negatives) a gallery of
    the first particles above the first negatives (PNG)."""

    manifest: StacksManifest
    gallery: Path
    seconds: float
    negatives_gallery: Path | None = None

    def summary(self) -> dict[str, Any]:
        """The step's figures, flat and rounded as reported (the asset's metadata keys)."""
        stacks = self.manifest
        reference = stacks.reference.summary() if stacks.reference else {}
        negatives = stacks.negatives or {}
        out: dict[str, Any] = {
            "particles": stacks.n_particles,
            "negatives": stacks.n_negatives,
            "box_px": stacks.box_px,
            "pixel_size_a": stacks.pixel_size_a,
            "source": stacks.kind,
            "poses_deposited": stacks.has_poses,
            "particles_star": stacks.particles_star,
            "downloaded_mb": round(stacks.downloaded_bytes / 1e6, 1),
            "extraction": stacks.extraction or {},
            "ground_truth": str(stacks.ground_truth) if stacks.ground_truth else "none",
            **reference,
            "reference_map": stacks.reference.to_json() if stacks.reference else {},
            "seconds": round(self.seconds, 1),
            "particles_png": self.gallery,
        }
        if negatives:
            out["negatives_from_micrographs"] = negatives["micrographs"]
            out["negatives_rule"] = negatives["rule"]
        if self.negatives_gallery is not None:
            out["particles_and_negatives_png"] = self.negatives_gallery
        return out


def extracted_truth(particles: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Ground truth per coordinate (micrograph entries) keyed by the extracted image names.

    Parameters
    ----------
    particles
        The extracted particles (canonical table): ``image_name``, ``micrograph_name`` and the
        pick coordinates in pixels.
    truth
        The simulator's truth, one row per pick (micrograph name and coordinates).

    Returns
    -------
    pandas.DataFrame
        The truth columns with ``image_name``, one row per extracted particle that matches a
        pick (micrograph file name and rounded coordinates).
    """
    left = pd.DataFrame(
        {
            "image_name": particles["image_name"].to_numpy(),
            "mic": particles["micrograph_name"].map(lambda s: Path(str(s)).name).to_numpy(),
            "x": particles["coordinate_x_px"].round().astype("int64").to_numpy(),
            "y": particles["coordinate_y_px"].round().astype("int64").to_numpy(),
        }
    )
    right = truth.assign(
        mic=truth["micrograph_name"].map(lambda s: Path(str(s)).name),
        x=truth["coordinate_x_px"].round().astype("int64"),
        y=truth["coordinate_y_px"].round().astype("int64"),
    )
    right = right.drop(columns=["micrograph_name", "coordinate_x_px", "coordinate_y_px"])
    return left.merge(right, on=["mic", "x", "y"], how="inner").drop(columns=["mic", "x", "y"])


def best_map_resolution_a(
    entry: Entry, *, eligible_path: Path | None = None, emdb: EmdbClient | None = None
) -> float | None:
    """The entry's best EMDB map resolution in Angstrom.

    Parameters
    ----------
    entry
        The EMPIAR entry (its ``emdb_ids``).
    eligible_path
        The catalog's eligible-entries Parquet file: its ``best_resolution_a`` is used when it
        has a row for the entry.
    emdb
        Asked for each linked map otherwise (a map that cannot be resolved is skipped: the
        catalog reports those).

    Returns
    -------
    float or None
        None when no linked map states a resolution (or neither source is given).
    """
    if eligible_path is not None and eligible_path.exists():
        eligible = pd.read_parquet(eligible_path, columns=["empiar_id", "best_resolution_a"])
        row = eligible[eligible["empiar_id"] == entry.empiar_id]
        if len(row) and not pd.isna(row["best_resolution_a"].iloc[0]):
            return float(row["best_resolution_a"].iloc[0])
    if emdb is None:
        return None
    from particleseg_model.access.http import HttpError

    found = []
    for emd_id in entry.emdb_ids:
        try:
            found.append(emdb.resolution_a(emd_id))
        except (HttpError, ValueError):
            continue  # an unresolvable map is reported by the catalog, not fatal here
    found = [r for r in found if r is not None]
    return min(found) if found else None


def _extraction_box(files: EntryFiles, options: StacksOptions, density_path: Path) -> int:
    if options.box_px:
        return options.box_px
    simulation = files.side_files.get("simulation.json")
    if simulation is not None:
        return int(json.loads(Path(simulation).read_text())["box"])
    return int(np.ceil(_particle_diameter_px(files, density_path)) * 2)


def _particle_diameter_px(files: EntryFiles, density_path: Path) -> float:
    """The particle's diameter in micrograph pixels: the simulator's (``simulation.json``,
    simulated at the micrographs' pixel size), else that of the reference map's mask
    (``maps.particle_diameter_px``) at the micrographs' pixel size (the imageset's; 1 A when
    unknown, as for the box)."""
    simulation = files.side_files.get("simulation.json")
    if simulation is not None:
        info = json.loads(Path(simulation).read_text())
        if info.get("particle_diameter_px"):
            return float(info["particle_diameter_px"])
    reference = maps.load_map(density_path)
    mask, _ = maps.make_mask(reference)
    diameter_a = maps.particle_diameter_px(mask) * reference.pixel_size_a
    return float(diameter_a / (files.pixel_size_a or 1.0))


def _negatives_gallery(
    particles: pd.DataFrame, negatives: pd.DataFrame, base_dir: Path, out: Path
) -> Path:
    """``out``: a band of the first particles above a band of the first negatives (as many of
    each, at most 8), as extracted."""
    k = min(8, len(particles), len(negatives))
    images = np.concatenate(
        [
            read_particles_table(particles.head(k), base_dir=base_dir),
            read_particles_table(negatives.head(k), base_dir=base_dir),
        ]
    )
    return write_png(out, particles_with_masks(images, columns=k))


_CS_LABELS = {
    "image_name": "rlnImageName",
    "micrograph_name": "rlnMicrographName",
    "coordinate_x_px": "rlnCoordinateX",
    "coordinate_y_px": "rlnCoordinateY",
    "defocus_u_a": "rlnDefocusU",
    "defocus_v_a": "rlnDefocusV",
    "defocus_angle_deg": "rlnDefocusAngle",
    "class_number": "rlnClassNumber",
    "random_subset": "rlnRandomSubset",
}
"""Canonical columns of a cryoSPARC table written to the particle block of its STAR file
(the optics quantities go to the optics block, poses and origins are written by write_star)."""


def _star_from_table(particles: pd.DataFrame, source: Path) -> ParticleStar:
    """A RELION particle STAR (written as 3.1 by ``write_star``) holding a canonical table that
    came from elsewhere (a cryoSPARC ``.cs``); columns the table lacks everywhere are left out."""
    block = pd.DataFrame(index=particles.index)
    for column, label in _CS_LABELS.items():
        values = particles[column]
        if values.notna().all():
            block[label] = values.to_numpy()
    block["rlnOpticsGroup"] = particles["optics_group"].to_numpy(dtype=np.int64)
    return ParticleStar(
        particles=particles,
        optics=None,
        version="3.1",
        source=source,
        blocks={"particles": block},
        particles_block="particles",
    )


def pose_errors_line(errors: dict[str, float]) -> str:
    """A :func:`~particleseg_model.relion.refine.summarise_pose_errors` summary as a person
    reads it in a run log (not a Python dict).

    Parameters
    ----------
    errors
        The summary (angles in degrees, shifts in Angstrom).

    Returns
    -------
    str
        E.g. "500 particles: angle error median 1.2 deg (mean 2.3), 91.0% within 5 deg;
        shift error median 0.8 A (mean 1.1)".
    """
    return (
        f"{int(errors['n_particles'])} particles: angle error median "
        f"{errors['median_angle_error_deg']:.3g} deg (mean {errors['mean_angle_error_deg']:.3g}), "
        f"{100 * errors['fraction_within_deg']:.1f}% within {errors['within_deg']:g} deg; shift "
        f"error median {errors['median_shift_error_a']:.3g} A (mean "
        f"{errors['mean_shift_error_a']:.3g})"
    )


def _one_group(
    particles: pd.DataFrame, source: Path, log: Callable[[str], None] | None = None
) -> tuple[int, float]:
    """(box px, nominal pixel size A) of a table whose particles share one box.

    Optics groups at different pixel sizes in one box (sessions of one deposition, 1.24 and
    1.25 A say) are one partition: :func:`label_partition` projects each set at its own pixel
    size, and the nominal pixel size (the mask's sampling, the manifest's) is the largest
    set's; ``log`` says so. Different boxes raise ParticleTableError naming the file and the
    sets (the corpus stores one box per partition).
    """
    groups = particle_groups(particles)
    if any(g.pixel_size_a is None for g in groups) and all(g.box_px is not None for g in groups):
        raise ParticleTableError(
            f"{source}: no pixel size: neither the STAR file (rlnImagePixelSize, rlnPixelSize "
            "or rlnDetectorPixelSize with rlnMagnification) nor the stacks' MRC headers give one"
        )
    described = "; ".join(
        f"optics groups {', '.join(map(str, g.optics_groups)) or '?'}: {len(g)} particles of "
        f"{g.box_px} px at {g.pixel_size_a} A"
        for g in groups
    )
    boxes = {g.box_px for g in groups}
    if len(boxes) == 1 and None not in boxes:
        main = max(groups, key=len)
        if len(groups) > 1 and log is not None:
            log(
                f"{source.name}: {len(groups)} pixel sizes in one box ({described}): each set "
                f"is labelled at its own pixel size; the partition's nominal one is "
                f"{main.pixel_size_a} A (the largest set's)"
            )
        assert main.box_px is not None and main.pixel_size_a is not None
        return main.box_px, main.pixel_size_a
    raise ParticleTableError(
        f"{source}: {len(groups)} sets of particles with different boxes ({described}); a "
        "partition holds one box: deposit or select one set"
    )


def fetch_stacks(
    entry: Entry,
    archive: str,
    downloads: Path,
    out_dir: Path,
    options: StacksOptions = StacksOptions(),
    *,
    map_resolution_a: float | Callable[[], float | None] | None = None,
    emdb_files_url: str | None = None,
    emdb: EmdbClient | None = None,
    map_cache: Path | None = None,
    http: HttpClient | None = None,
    relion: RelionHost | None = None,
    log: Log | None = None,
) -> StacksResult:
    """The entry's particle images, their STAR file and the reference map (step 1 of the build).

    The deposited stacks when the entry ships them (a particle STAR file of any RELION
    flavour, or a cryoSPARC ``.cs`` file), else particles extracted from its micrographs and
    coordinate files with ``relion_preprocess`` (into ``out_dir/extract``), with up to
    ``options.negatives_per_micrograph`` negatives per micrograph: boxes centred at least one
    particle diameter (the simulator's, else the reference map's mask's, in micrograph pixels)
    from every pick, cut by a second ``relion_preprocess`` run with the same settings into the
    same project (``Negatives/``, ``negatives.star``) and recorded in the manifest's
    ``negatives``. Only what the entry needs is downloaded, resumably, into ``downloads``.
    The reference map is the one deposited in the archive, else the linked EMDB map chosen
    by :mod:`particleseg_model.corpus.reference`, fetched once per EMDB id into
    ``map_cache``.

    A particle table without a box (RELION 3.0) or pixel size is completed from the stacks'
    MRC headers (``complete_from_stacks``) and written as a RELION 3.1 STAR file
    ``out_dir/particles.star`` (image names still relative to the deposited folder,
    ``base_dir``), as is a cryoSPARC table; a complete deposited STAR file is used as it is.
    Everything is checked before anything is written into ``out_dir``; the manifest comes last
    (atomically), so a failure leaves the previous manifest as it was.

    Parameters
    ----------
    entry
        The EMPIAR entry (``EmpiarClient.entry``).
    archive
        The archive's base URL (``.../world_availability``) or a local mirror path.
    downloads
        Where the entry's files go (archive-relative paths).
    out_dir
        The step's folder: the manifest, the gallery, extracted particles, the extracted
        ground truth, the converted STAR file.
    options
        See :class:`StacksOptions`.
    map_resolution_a
        The resolution of the entry's best map (Angstrom), or a callable giving it (called
        once the stacks are ready, so a failed download asks nobody), recorded when the
        reference map's own resolution is unknown; see :func:`best_map_resolution_a`.
    emdb_files_url
        The root of EMDB's file tree (default ``PARTICLESEG_EMDB_FILES_URL``, else EBI's).
    emdb
        The EMDB API client (map resolutions: the choice among several linked maps).
    map_cache
        The EMDB map cache (default ``downloads/../emdb``: beside the per-entry downloads).
    http
        The polite client for the EMDB map download (default: one made for it).
    relion
        How RELION runs (default: as found on PATH).
    log
        Receives progress lines (RELION's prefixed ``relion_preprocess: ``).

    Returns
    -------
    StacksResult
        The manifest, already written to ``out_dir/manifest.json``.

    Raises
    ------
    particleseg_model.access.dataset.NothingToFetch
        The entry has neither particle stacks nor micrographs with coordinates, or no
        reference map (none in the archive, none linked).
    particleseg_model.access.emdb_files.EmdbFileError
        The EMDB map cannot be fetched or used (404, corrupt ``.map.gz``, ...).
    particleseg_model.em.particles.ParticleTableError
        A particle table that disagrees with its stacks, or several boxes or pixel sizes.
    particleseg_model.em.cryosparc.CryosparcError
        A ``.cs`` file without the fields needed.
    ValueError
        No extraction box is known (see :attr:`StacksOptions.box_px`), or a negative
        ``negatives_per_micrograph``.
    """
    log = log or _quiet
    relion = relion or LocalRelion()
    started = time.perf_counter()
    log(f"fetching what {entry.empiar_id} needs from {archive}")
    files = fetch_entry_files(entry, archive, downloads, progress=False)
    log(f"{files.kind}: {files.nbytes / 1e6:.1f} MB in {downloads}")
    reference = reference_map(
        entry,
        files,
        map_cache or Path(downloads).parent / "emdb",
        emdb_files_url=emdb_files_url,
        emdb=emdb,
        http=http,
        log=log,
    )
    extraction: dict[str, Any] | None = None
    negatives: dict[str, Any] | None = None
    negative_table: pd.DataFrame | None = None
    truth_path = files.side_files.get("ground_truth.csv")
    truth: pd.DataFrame | None = None
    rewrite = False
    if files.kind == "particles":
        if files.particles_star is not None:
            star_path, base_dir = files.particles_star, files.particles_star.parent
            star = read_star(star_path)
        else:
            assert files.particles_cs is not None  # fetch_entry_files found the particles
            star_path, base_dir = files.particles_cs, files.particles_cs.parent
            star = _star_from_table(read_cs(star_path).particles, star_path)
            rewrite = True  # RELION reads STAR files only
    else:
        box = _extraction_box(files, options, reference.path)
        chooser, diameter = None, 0.0
        if options.negatives_per_micrograph < 0:
            raise ValueError(
                f"negatives_per_micrograph must be 0 (none) or more, got "
                f"{options.negatives_per_micrograph}"
            )
        if options.negatives_per_micrograph:
            diameter = _particle_diameter_px(files, reference.path)
            chooser = negative_chooser(
                partition_key(entry.empiar_id),
                box=box,
                diameter_px=diameter,
                n_max=options.negatives_per_micrograph,
            )
        with relion.on_path():
            result = extract_particles(
                files.micrographs,
                files.coordinates,
                out_dir / "extract",
                box_px=box,
                rescale_px=options.rescale_px or None,
                invert_contrast=options.invert_contrast,
                pixel_size_a=files.pixel_size_a,
                overwrite=True,
                progress=False,
                log=_prefixed(log, "relion_preprocess"),
                negatives=chooser,
            )
        star_path, base_dir = result.particles_star, result.project_dir
        star = read_star(star_path)
        if chooser is not None:
            negatives = {
                "star": str(result.negatives_star) if result.negatives_star else None,
                "count": result.n_negatives,
                "micrographs": result.negative_micrographs,
                "micrographs_with_picks": result.n_micrographs,
                "per_micrograph_max": options.negatives_per_micrograph,
                "diameter_px": round(diameter, 2),
                "min_distance_px": round(diameter, 2),
                "rule": negative_rule(box, diameter, diameter, options.negatives_per_micrograph),
            }
            log(
                f"negatives: {result.n_negatives} boxes from {result.negative_micrographs} of "
                f"{result.n_micrographs} micrographs, at least {diameter:.1f} px from every pick"
            )
            if result.negatives_star is not None:
                negative_table = read_star(result.negatives_star).particles
        extraction = {
            "box_px": result.box_px,
            "rescale_px": result.rescale_px,
            "image_size_px": result.image_size_px,
            "normalise": result.normalise,
            "invert_contrast": result.invert_contrast,
            "bg_radius_px": result.bg_radius_px,
            "micrographs": result.n_micrographs,
            "skipped_micrographs": list(result.skipped_micrographs),
            "command": " ".join(result.command),
        }
        if truth_path is not None:
            truth = extracted_truth(star.particles, pd.read_csv(truth_path))
            truth_path = out_dir / "ground_truth.csv"
    incomplete = bool(
        star.particles["image_size_px"].isna().any() or star.particles["pixel_size_a"].isna().any()
    )
    particles = complete_from_stacks(star.particles, base_dir, source=star_path)
    box, pixel = _one_group(particles, Path(star_path), log)
    if incomplete or rewrite:
        log(
            f"{Path(star_path).name}: RELION {star.version if not rewrite else 'cryoSPARC'} "
            f"particles completed from the stacks ({box} px at {pixel:g} A), written as "
            f"RELION 3.1 {out_dir / 'particles.star'}"
        )
        star.particles = particles
        if star.optics is not None and "rlnImageSize" not in star.optics:
            star.optics = star.optics.assign(rlnImageSize=box)
        out_dir.mkdir(parents=True, exist_ok=True)
        star_path = write_star(out_dir / "particles.star", star)
    if truth is not None:
        with atomic_path(out_dir / "ground_truth.csv") as tmp:
            truth.to_csv(tmp, index=False)
    images = read_particles_table(particles.head(8), base_dir=base_dir)
    gallery = write_png(out_dir / "particles.png", particles_with_masks(images))
    negatives_gallery = None
    if negative_table is not None and len(negative_table):
        negatives_gallery = _negatives_gallery(
            particles, negative_table, Path(base_dir), out_dir / "particles_and_negatives.png"
        )
    resolution = reference.resolution_a
    if resolution is None:
        resolution = map_resolution_a() if callable(map_resolution_a) else map_resolution_a
    manifest = StacksManifest(
        empiar_id=entry.empiar_id,
        kind=files.kind,
        particles_star=Path(star_path),
        base_dir=Path(base_dir),
        n_particles=len(particles),
        box_px=box,
        pixel_size_a=pixel,
        has_poses=bool(has_poses(particles)),
        maps=tuple(files.maps),
        ground_truth=Path(truth_path) if truth_path else None,
        extraction=extraction,
        map_resolution_a=resolution,
        downloaded_bytes=files.nbytes,  # the archive's files; the map's are in reference
        reference=reference,
        negatives=negatives,
    )
    manifest.write(out_dir)
    return StacksResult(manifest, gallery, time.perf_counter() - started, negatives_gallery)


# ------------------------------------------------------------------------------ refined poses


@dataclass(frozen=True)
class RefineOptions:
    """Where :func:`refine_poses` takes the poses from (the ``refined_particles`` config)."""

    source: str = "auto"
    """"auto": the depositors' poses when the STAR file has them, else RELION auto-refine;
    "deposited" or "refine" to force one."""
    max_particles: int = 0
    """Refine at most this many particles (the first ones); 0: all."""
    max_iterations: int = 0
    """Stop auto-refine after this many iterations; 0: until it converges."""
    ini_lowpass_a: float = 0.0
    """Low-pass of the initial model in Angstrom; 0: the wrapper's default."""
    mpi_ranks: int = 0
    """MPI ranks of relion_refine_mpi; 0: the relion resource's (PARTICLESEG_RELION_MPI_RANKS,
    default 3)."""


POSE_COLUMNS = ("rot_deg", "tilt_deg", "psi_deg", "origin_x_a", "origin_y_a")
"""The canonical columns a particle needs for its label: Euler angles (degrees) and origins
(Angstrom)."""


@dataclass(frozen=True)
class PosesCheck:
    """Whether every particle has a pose: ``missing_columns`` of :data:`POSE_COLUMNS` absent
    from the table, else ``rows`` (1-based) with a value that is not a finite number."""

    particles: int
    missing_columns: tuple[str, ...] = ()
    rows: tuple[int, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.missing_columns and not self.rows

    @property
    def first_rows(self) -> str:
        """The rows without a pose as ranges (``"17-19, 25"``; empty when there are none)."""
        return row_ranges(list(self.rows)) if self.rows else ""

    def summary(self) -> dict[str, Any]:
        """The missing columns (comma-separated), else the counts and :attr:`first_rows`."""
        if self.missing_columns:
            return {"missing_columns": ", ".join(self.missing_columns)}
        return {
            "particles": self.particles,
            "without_pose": len(self.rows),
            "first_rows": self.first_rows,
        }


def poses_check(particles: pd.DataFrame) -> PosesCheck:
    """Check that every particle has rot, tilt, psi and origins as finite numbers.

    Parameters
    ----------
    particles
        Canonical particle table (``read_star(...).particles``).

    Returns
    -------
    PosesCheck
        The missing columns, or the 1-based rows without a full pose.
    """
    missing = tuple(c for c in POSE_COLUMNS if c not in particles.columns)
    if missing:
        return PosesCheck(len(particles), missing_columns=missing)
    finite = np.isfinite(particles[list(POSE_COLUMNS)].to_numpy(dtype=np.float64)).all(axis=1)
    rows = (np.flatnonzero(~finite) + 1).tolist()
    return PosesCheck(len(particles), rows=tuple(rows))


@dataclass(frozen=True)
class ResolutionCheck:
    """The resolution (Angstrom) of the map behind the poses, None when unknown, and where it
    comes from (``"relion_refine"`` or ``"EMDB map of the entry"``)."""

    resolution_a: float | None
    source: str

    @property
    def passed(self) -> bool:
        return self.resolution_a is not None

    def summary(self) -> dict[str, Any]:
        """``resolution_a`` (NaN when unknown) and ``from``."""
        return {"resolution_a": float(self.resolution_a or float("nan")), "from": self.source}


@dataclass(frozen=True)
class RefineResult:
    """What :func:`refine_poses` made: the manifest (written); the resolution of the map behind
    the poses (RELION's final one, or the deposited EMDB map's; None when unknown); RELION's
    :class:`~particleseg_model.relion.Refinement` when it refined; the pose errors against the
    simulator's ground truth (``summarise_pose_errors``) when there is one; the poses check;
    the wall time in seconds."""

    manifest: RefinedManifest
    resolution_a: float | None
    refinement: Refinement | None
    pose_errors: dict[str, float] | None
    poses: PosesCheck
    seconds: float

    @property
    def resolution(self) -> ResolutionCheck:
        """Whether a resolution is known for the map behind the poses."""
        source = "relion_refine" if self.manifest.source == "refine" else "EMDB map of the entry"
        return ResolutionCheck(self.resolution_a, source)

    def summary(self) -> dict[str, Any]:
        """The step's figures, flat and rounded as reported (the asset's metadata keys):
        RELION's resolution, iterations, settings and command when it refined, else the
        deposited map's resolution (when known); the pose errors (``pose_<figure>``)."""
        out: dict[str, Any] = {"source": self.manifest.source}
        refinement = self.refinement
        if refinement is not None:
            out["resolution_a"] = round(refinement.resolution_a, 2)
            out["iterations"] = refinement.iterations
            out["refine_settings"] = refinement.settings
            out["command"] = " ".join(refinement.command)
        elif self.resolution_a is not None:
            out["resolution_a"] = round(float(self.resolution_a), 2)
        for name, value in (self.pose_errors or {}).items():
            out[f"pose_{name}"] = round(float(value), 3)
        out["particles"] = self.manifest.n_particles
        out["particles_star"] = self.manifest.particles_star
        out["seconds"] = round(self.seconds, 1)
        return out


def _remove_old_refinements(out: Path, keep: Path | None) -> None:
    """After the manifest names the new version: the folders of earlier (or killed)
    refinements, and the single ``refine/`` folder of the layout before per-run folders."""
    for folder in out.glob("refine*"):
        if folder.is_dir() and (keep is None or folder.resolve() != keep.resolve()):
            shutil.rmtree(folder, ignore_errors=True)
    (out / "input_particles.star").unlink(missing_ok=True)


def refine_poses(
    stacks: StacksManifest,
    out_dir: Path,
    options: RefineOptions = RefineOptions(),
    *,
    run_id: str | None = None,
    relion: RelionHost | None = None,
    log: Log | None = None,
) -> RefineResult:
    """Particle poses (step 2): the depositors' STAR file when it has poses, otherwise RELION
    3D auto-refine (``relion_refine_mpi`` under ``mpirun``) from the entry's reference map
    (:meth:`StacksManifest.density_map`; resampled to the particles' pixel size and box by
    ``auto_refine``), low-pass filtered.

    A refinement runs in a fresh folder ``out_dir/refine-<run_id[:8]>``: the manifest names the
    one in use, so a killed or failed refinement never touches the files readers see; once the
    new manifest is written, the other ``refine*`` folders are removed.

    Parameters
    ----------
    stacks
        The manifest of :func:`fetch_stacks`.
    out_dir
        The step's folder.
    options
        See :class:`RefineOptions`.
    run_id
        Names the refinement folder (default: a fresh random id).
    relion
        How RELION runs (default: as found on PATH, 3 ranks of 1 thread);
        ``options.mpi_ranks`` overrides its ranks.
    log
        Receives progress lines (RELION's prefixed ``relion_refine: ``).

    Returns
    -------
    RefineResult
        The manifest, already written to ``out_dir/manifest.json``.

    Raises
    ------
    ValueError
        An unknown ``source``, or "deposited" for a STAR file without poses.
    FileNotFoundError
        A refinement without a deposited map to start from.
    particleseg_model.relion.RelionError
        RELION failed (its message names the program and the log).
    """
    log = log or _quiet
    relion = relion or LocalRelion()
    source = options.source
    if source not in ("auto", "deposited", "refine"):
        raise ValueError(f"source must be auto, deposited or refine, got {source!r}")
    if source == "auto":
        source = "deposited" if stacks.has_poses else "refine"
    if source == "deposited" and not stacks.has_poses:
        raise ValueError(
            f"{stacks.particles_star} has no poses (rlnAngleRot/Tilt/Psi): use source 'refine'"
        )
    started = time.perf_counter()
    refinement = None
    if source == "deposited":
        star_path = stacks.particles_star
    else:
        # the reference at any sampling: auto_refine resamples it to the particles' pixel
        # size and box (relion.refine._match_reference)
        density = stacks.density_map()
        if density is None:
            raise FileNotFoundError(
                f"{stacks.empiar_id}: no deposited map to start refinement from"
            )
        work = out_dir / f"refine-{(run_id or uuid.uuid4().hex)[:8]}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        star_in = stacks.particles_star
        if options.max_particles:
            star = read_star(star_in)
            star_in = work / "input_particles.star"
            write_star(star_in, star, particles=star.particles.head(options.max_particles))
        settings: dict[str, Any] = {
            "mpi_ranks": options.mpi_ranks or relion.ranks(),
            "threads": relion.threads_per_rank(),
        }
        if options.ini_lowpass_a:
            settings["ini_lowpass_a"] = options.ini_lowpass_a
        if options.max_iterations:
            settings["max_iterations"] = options.max_iterations
        with relion.on_path():
            refinement = auto_refine(
                star_in,
                density,
                work,
                project_dir=stacks.base_dir,
                log=_prefixed(log, "relion_refine"),
                **settings,
            )
        star_path = refinement.data_star
    particles = read_star(star_path).particles
    resolution_a = refinement.resolution_a if refinement else stacks.map_resolution_a
    errors = None
    if stacks.ground_truth:
        truth = pd.read_csv(stacks.ground_truth)
        truth = truth[truth["is_good"].astype(bool)]  # junk has no pose worth scoring
        errors = summarise_pose_errors(relion_pose_errors(particles, truth))
        log(f"poses against the ground truth: {pose_errors_line(errors)}")
    manifest = RefinedManifest(
        empiar_id=stacks.empiar_id,
        source=source,
        particles_star=Path(star_path),
        base_dir=stacks.base_dir,
        refined_map=refinement.map_path if refinement else None,
        n_particles=len(particles),
        box_px=stacks.box_px,
        pixel_size_a=stacks.pixel_size_a,
    )
    manifest.write(out_dir)
    _remove_old_refinements(out_dir, keep=Path(star_path).parent if refinement else None)
    return RefineResult(
        manifest,
        resolution_a,
        refinement,
        errors,
        poses_check(particles),
        time.perf_counter() - started,
    )


# ------------------------------------------------------------------------------ mask volume


@dataclass(frozen=True)
class MaskOptions:
    """How :func:`make_mask_volume` makes the mask (the ``mask_volume`` config)."""

    lowpass_a: float = 15.0
    """Low-pass the map before thresholding (Angstrom; 0: none)."""
    extend_px: float = 3.0
    """Grow the binary mask by this many voxels (relion_mask_create --extend_inimask)."""
    soft_edge_px: float = 6.0
    """Cosine soft edge width in voxels (--width_soft_edge)."""
    threshold: float = 0.0
    """Initial binarisation threshold; 0: chosen from the map (see maps.map_threshold)."""
    use_deposited_mask: bool = False
    """Take a mask the entry deposited instead of making one."""


@dataclass(frozen=True)
class MaskResult:
    """What :func:`make_mask_volume` made: the manifest (written) and the share of voxels at
    or above 0.5 in the mask."""

    manifest: MaskManifest
    volume_fraction: float

    def summary(self) -> dict[str, Any]:
        """The step's figures, flat and rounded as reported (the asset's metadata keys)."""
        mask = self.manifest
        return {
            "mask": mask.mask,
            "map": mask.map,
            "threshold": round(float(mask.threshold), 4),
            "lowpass_a": mask.lowpass_a,
            "extend_px": mask.extend_px,
            "soft_edge_px": mask.soft_edge_px,
            "volume_fraction": round(self.volume_fraction, 4),
        }


def make_mask_volume(
    stacks: StacksManifest,
    refined: RefinedManifest,
    out_dir: Path,
    options: MaskOptions = MaskOptions(),
    *,
    log: Log | None = None,
) -> MaskResult:
    """The MaskCreate-style mask (threshold, extend, soft edge) of the refined map (or of the
    reference map, :attr:`StacksManifest.reference`, when the poses are the depositors'), at
    the particles' box and pixel size (step 3), as ``out_dir/mask.mrc``. A map at another voxel
    size or box (EMDB's maps usually are) is Fourier-resampled and padded or cropped first, and
    the log says so with both voxel sizes.

    Parameters
    ----------
    stacks, refined
        The manifests of :func:`fetch_stacks` and :func:`refine_poses`.
    out_dir
        The step's folder.
    options
        See :class:`MaskOptions`.
    log
        Receives a line when the map is resampled to the particles' sampling.

    Returns
    -------
    MaskResult
        The manifest, already written to ``out_dir/manifest.json``.

    Raises
    ------
    FileNotFoundError
        Neither a refined nor a deposited map.
    """
    log = log or _quiet
    deposited_mask = stacks.deposited_maps()[1]
    source = refined.refined_map or stacks.density_map()
    if options.use_deposited_mask and deposited_mask is not None:
        source = deposited_mask
    if source is None:
        raise FileNotFoundError(f"{stacks.empiar_id}: no map to make a mask from")
    density = maps.load_map(source)
    box, pixel = stacks.box_px, stacks.pixel_size_a
    # bring the map to the particles' sampling first: the mask is projected at their box
    if abs(density.pixel_size_a - pixel) > 1e-3 * pixel or density.box != box:
        size = int(round(density.box * density.pixel_size_a / pixel / 2) * 2)
        data = maps.pad_or_crop(maps.fourier_resample(density.data, size), box)
        log(
            f"map {Path(str(source)).name} resampled from voxel size "
            f"{density.pixel_size_a:.4f} A ({density.box} px) to the particles' "
            f"{pixel:.4f} A ({box} px)"
        )
        density = maps.DensityMap(data.astype(np.float32), pixel, density.source)
    if options.use_deposited_mask and deposited_mask is not None:
        mask, threshold = np.clip(density.data, 0, 1), float("nan")
    elif options.threshold:
        data = (
            maps.lowpass(density.data, pixel, options.lowpass_a)
            if options.lowpass_a
            else density.data
        )
        threshold = options.threshold
        mask = maps.create_mask(
            data, threshold, extend_px=options.extend_px, soft_edge_px=options.soft_edge_px
        )
    else:
        mask, threshold = maps.make_mask(
            density,
            lowpass_a=options.lowpass_a or None,
            extend_px=options.extend_px,
            soft_edge_px=options.soft_edge_px,
        )
    with atomic_path(out_dir / "mask.mrc") as tmp:
        maps.write_mrc(tmp, mask.astype(np.float32), pixel)
    manifest = MaskManifest(
        map=str(source),
        lowpass_a=options.lowpass_a,
        extend_px=options.extend_px,
        soft_edge_px=options.soft_edge_px,
        threshold=threshold,
        box_px=box,
        pixel_size_a=pixel,
        mask=out_dir / "mask.mrc",
    )
    manifest.write(out_dir)
    return MaskResult(manifest, float((mask >= 0.5).mean()))


# ------------------------------------------------------------------------------ labels


@dataclass(frozen=True)
class LabelOptions:
    """How :func:`label_partition` labels the particles (the ``particle_masks`` config)."""

    threshold: float = 10.0
    """Projected-mask value above which a pixel is signal (the original rule)."""
    edge_px: int = 11
    """Square structuring element of the edge band (11: a 5 px band outside the signal)."""
    batch: int = 256
    """Particles projected, labelled and written at a time."""
    skip_bad_rows: bool = False
    """Drop particles whose stack is missing or index out of range (counted), instead of
    failing on them."""
    append: bool = False
    """Add particles not yet in the corpus instead of writing a new version."""
    negatives: bool = True
    """Add the negatives particle_stacks cut (micrograph regions far from every pick) with
    all-background labels, marked negative in the particle table; False leaves them out."""


SIGNAL_FRACTION_RANGE = (0.01, 0.8)
"""Plausible share of signal pixels over a dataset: below, the mask or the poses are off (a
particle of ~half the box covers ~0.2); above, the threshold is below the solvent."""
MAX_EMPTY_SHARE = 0.05
"""At most this share of particles may have no signal pixel at all."""

_TABLE_COLUMNS = (
    "image_name",
    "rot_deg",
    "tilt_deg",
    "psi_deg",
    "origin_x_a",
    "origin_y_a",
    "defocus_u_a",
    "defocus_v_a",
    "defocus_angle_deg",
    "micrograph_name",
    "pixel_size_a",
)
"""The canonical columns copied into the corpus's particle table (those the STAR file has)."""


def row_ranges(rows: list[int]) -> str:
    """``[17, 18, 19, 25]`` -> ``"17-19, 25"`` (1-based STAR rows; the first 8 ranges, then
    ``", ..."``). ``rows`` must not be empty."""
    spans: list[str] = []
    start = prev = rows[0]
    for row in [*rows[1:], None]:
        if row is not None and row == prev + 1:
            prev = row
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if row is not None:
            start = prev = row
    return ", ".join(spans[:8]) + (", ..." if len(spans) > 8 else "")


def check_rows(particles: pd.DataFrame, base_dir: Path) -> tuple[np.ndarray, list[str]]:
    """Which particles can be read: their stack exists and holds their index.

    Parameters
    ----------
    particles
        Canonical particle table (``image_index`` 1-based, ``stack_path`` relative to
        ``base_dir``).
    base_dir
        The project folder the stack paths are relative to.

    Returns
    -------
    good : numpy.ndarray
        Boolean mask over the rows.
    problems : list of str
        What is wrong with the others, one line per stack and reason
        (``stack S, rows 17-32: reason``).
    """
    good = np.ones(len(particles), dtype=bool)
    lengths: dict[str, int | str] = {}
    bad: dict[tuple[str, str], list[int]] = {}
    for i, (index, stack) in enumerate(
        zip(particles["image_index"], particles["stack_path"], strict=True)
    ):
        if stack not in lengths:
            try:
                lengths[stack] = len(open_stack(base_dir / stack))
            except (MrcError, OSError) as exc:
                lengths[stack] = str(exc)
        length = lengths[stack]
        if isinstance(length, str):
            reason = length
        elif not 1 <= int(index) <= length:
            reason = f"index beyond the stack's {length} images"
        else:
            continue
        good[i] = False
        bad.setdefault((stack, reason), []).append(i + 1)
    problems = [
        f"stack {stack}, rows {row_ranges(rows)}: {reason}" for (stack, reason), rows in bad.items()
    ]
    return good, problems


@dataclass(frozen=True)
class MasksCheck:
    """Whether the labels look like particles: the signal share over every particle pixel
    written within :data:`SIGNAL_FRACTION_RANGE`, and at most :data:`MAX_EMPTY_SHARE` of the
    particles without a signal pixel. Negatives (all background by construction) are not
    particles: they count in neither figure."""

    passed: bool
    signal_fraction: float
    particles_without_signal: int
    particles_written: int

    def summary(self) -> dict[str, Any]:
        return {
            "signal_fraction": round(self.signal_fraction, 4),
            "particles_without_signal": self.particles_without_signal,
            "particles_written": self.particles_written,
        }


def masks_check(signal_fraction: float, without_signal: int, written: int) -> MasksCheck:
    """See :class:`MasksCheck`; ``signal_fraction`` is a share of pixels (0..1)."""
    low, high = SIGNAL_FRACTION_RANGE
    passed = low <= signal_fraction <= high and without_signal <= MAX_EMPTY_SHARE * max(written, 1)
    return MasksCheck(bool(passed), float(signal_fraction), without_signal, written)


@dataclass(frozen=True)
class RowsCheck:
    """The row counts of the Zarr images, the Zarr labels and the Parquet particle table."""

    images: int
    labels: int
    parquet: int

    @property
    def passed(self) -> bool:
        return self.images == self.labels == self.parquet

    def summary(self) -> dict[str, int]:
        return {"images": self.images, "labels": self.labels, "parquet": self.parquet}


def rows_check(corpus: CorpusDataset) -> RowsCheck:
    """The row counts of a committed partition (see :class:`RowsCheck`)."""
    return RowsCheck(int(corpus.images.shape[0]), int(corpus.labels.shape[0]), len(corpus.table))


@dataclass(frozen=True)
class LabelResult:
    """What :func:`label_partition` made: the manifest (written); the particles that were
    already in the corpus (append); the labelling loop's wall time in seconds and its split
    (``stage_seconds``: waiting for projections, reading images, labelling, writing); the
    partition's location and bytes stored; the gallery PNG (None when nothing was written);
    the two checks (the masks check over the particles only; the rows check over every row,
    negatives included)."""

    manifest: LabelsManifest
    already_in_corpus: int
    seconds: float
    location: str
    stored_bytes: int
    gallery: Path | None
    masks: MasksCheck
    rows: RowsCheck
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def particles_per_s(self) -> float:
        return self.manifest.n_particles / max(self.seconds, 1e-9)

    def summary(self) -> dict[str, Any]:
        """The step's figures, flat and rounded as reported (the asset's metadata keys); the
        label shares are of every particle pixel written (negatives apart: all background)."""
        labels = self.manifest
        done = labels.n_particles
        background, signal, edge = labels.label_fractions
        out: dict[str, Any] = {
            "particles": done,
            "negatives": labels.n_negatives,
            "skipped_bad_rows": labels.skipped,
            "already_in_corpus": self.already_in_corpus,
            "seconds": round(self.seconds, 1),
            "particles_per_s": round(self.particles_per_s, 1),
            "bytes_per_particle": round(self.stored_bytes / max(done + labels.n_negatives, 1)),
            "corpus": self.location,
            "background_fraction": round(background, 4),
            "signal_fraction": round(signal, 4),
            "edge_fraction": round(edge, 4),
            "threshold": labels.threshold,
            "edge_px": labels.edge_px,
        }
        if self.gallery is not None:
            out["particles_with_masks"] = self.gallery
        return out


def _timed(items: Iterable[Any], seconds: dict[str, float], stage: str) -> Iterator[Any]:
    """``items``, adding the time spent waiting for each to ``seconds[stage]``."""
    iterator = iter(items)
    while True:
        began = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            seconds[stage] += time.perf_counter() - began
        yield item


def _readable(
    particles: pd.DataFrame, base_dir: Path, source: Path, skip: bool, what: str, warn: Log
) -> tuple[pd.DataFrame, int]:
    """The rows of ``particles`` whose images can be read, and how many could not (a
    ValueError naming the stacks and rows unless ``skip``: see :func:`check_rows`)."""
    good, problems = check_rows(particles, base_dir)
    n_bad = int((~good).sum())
    if n_bad:
        listed = "; ".join(problems[:5]) + (
            f"; ... {len(problems) - 5} more stacks" if len(problems) > 5 else ""
        )
        if not skip:
            raise ValueError(
                f"{source}: {n_bad} {what} cannot be read: {listed} (set skip_bad_rows to "
                "drop them)"
            )
        warn(f"skipping {n_bad} {what} that cannot be read: {listed}")
        particles = particles[good].reset_index(drop=True)
    return particles, n_bad


def _negative_rows(negatives: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The corpus table rows of negatives: the canonical columns they have (poses empty) and
    ``negative`` True."""
    table = negatives[[c for c in columns if c in negatives.columns]].reset_index(drop=True)
    table[NEGATIVE_COLUMN] = True
    return table


def label_partition(  # noqa: C901 - to split (pyproject: mccabe)
    stacks: StacksManifest,
    refined: RefinedManifest,
    mask: MaskManifest,
    corpus_root: str | Path,
    out_dir: Path,
    options: LabelOptions = LabelOptions(),
    *,
    key: str | None = None,
    run_id: str | None = None,
    dtype: str | None = None,
    log: Log | None = None,
    warn: Log | None = None,
) -> LabelResult:
    """Every particle's image and its 3-class label mask (0 background, 1 signal, 2 edge) from
    the projection of the mask volume at the particle's pose, into the Zarr corpus (step 4);
    and the entry's negatives (:attr:`StacksManifest.negatives`), all background.

    One group per EMPIAR id under ``corpus_root``, chunked along particles, with the
    per-particle Parquet table and splits; written to a temporary version and swapped in, so
    a failed run leaves the last one intact (``options.append``: added to the committed one).

    Negatives (``options.negatives``, micrograph entries) are read from the stacks step's
    own STAR file (never refined, never projected), labelled 0 everywhere and written between
    the particle batches in proportion (so that a chunk-wise shuffling loader mixes them
    with the particles), marked ``negative`` True in the table (particles False); their image
    names are RELION's (``000001@Negatives/...``) and their splits the same hash as every
    particle's. The label shares, the masks check and the manifest's ``n_particles`` count the
    particles only; ``n_negatives`` counts the negatives.

    Parameters
    ----------
    stacks, refined, mask
        The manifests of the steps before.
    corpus_root
        The corpus: a local folder or an fsspec URL.
    out_dir
        The step's folder (the manifest and the gallery).
    options
        See :class:`LabelOptions`.
    key
        The partition's key in the corpus (default: the entry's number, ``"10028"``).
    run_id
        Recorded with the partition (``dagster_run_id`` in the attributes and the manifest).
    dtype
        The stored image dtype, ``"float16"`` or ``"float32"`` (default: the corpus's,
        float16; see :class:`~particleseg_model.corpus.store.CorpusWriter`).
    log
        Receives progress lines (``labels: 512/2048 particles (310/s)``).
    warn
        Receives the line about skipped particles (default: ``log``).

    Returns
    -------
    LabelResult
        The manifest, already written to ``out_dir/manifest.json``.

    Raises
    ------
    ValueError
        Particles (or negatives) that cannot be read (missing stack, index out of range),
        named by stack and rows, unless ``options.skip_bad_rows``.
    particleseg_model.corpus.ProjectionError
        Poses or mask that cannot be projected (see ``project_masks``).
    """
    log = log or _quiet
    warn = warn or log
    key = key or partition_key(stacks.empiar_id)
    particles = read_star(refined.particles_star).particles.reset_index(drop=True)
    base_dir = refined.base_dir
    skip = options.skip_bad_rows
    particles, n_bad = _readable(
        particles, base_dir, refined.particles_star, skip, "particles", warn
    )
    negatives = pd.DataFrame()
    negatives_star = stacks.negatives_star if options.negatives else None
    if negatives_star is not None:
        negatives = read_star(negatives_star).particles.reset_index(drop=True)
        # the negatives' stacks are in the extraction project, beside the particles'
        negatives, n_bad_negatives = _readable(
            negatives, stacks.base_dir, negatives_star, skip, "negatives", warn
        )
        n_bad += n_bad_negatives
    already = 0
    if options.append and key in list_corpus(corpus_root):
        present = set(open_corpus(corpus_root, key).table["image_name"])
        keep = ~particles["image_name"].isin(present).to_numpy()
        already = int((~keep).sum())
        particles = particles[keep].reset_index(drop=True)
        if len(negatives):
            negatives = negatives[~negatives["image_name"].isin(present)].reset_index(drop=True)
        log(
            f"append: {already} particles already in the corpus, {len(particles)} new"
            + (f", {len(negatives)} new negatives" if negatives_star is not None else "")
        )
    truth = None
    if stacks.ground_truth:
        truth = pd.read_csv(stacks.ground_truth)[["image_name", "is_good", "junk_kind"]]
    volume = maps.load_map(mask.mask)
    started = time.perf_counter()
    attrs = {
        "pixel_size_a": float(refined.pixel_size_a),
        "threshold": options.threshold,
        "edge_px": options.edge_px,
        "source_star": str(refined.particles_star),
        "pose_source": refined.source,
        "mask": str(mask.mask),
        "mask_params": mask.params(),
        "dagster_run_id": run_id,
    }
    if negatives_star is not None and stacks.negatives:
        attrs["negatives_star"] = str(negatives_star)
        attrs["negatives_rule"] = stacks.negatives["rule"]
    counts = np.zeros(3, dtype=np.float64)
    empty = 0
    shown: tuple[np.ndarray, np.ndarray] | None = None
    columns = [c for c in _TABLE_COLUMNS if c in particles.columns]
    stages: dict[str, float] = dict.fromkeys(("project", "read images", "labels", "write"), 0.0)
    began = time.perf_counter()  # the projector's set-up counts as projection
    # one projector per pixel size (optics groups of one box at different pixel sizes), the
    # particles ordered by it so that the projections come in table order
    subsets = [particles]
    if "pixel_size_a" in particles and particles["pixel_size_a"].nunique() > 1:
        pixel_sizes = particles["pixel_size_a"].astype(float)
        particles = particles.iloc[np.argsort(pixel_sizes.to_numpy(), kind="stable")]
        particles = particles.reset_index(drop=True)
        attrs["pixel_sizes_a"] = sorted(float(p) for p in pixel_sizes.unique())
        subsets = [
            subset.reset_index(drop=True)
            for _, subset in particles.groupby("pixel_size_a", sort=False)
        ]
    # made before the corpus is opened, so that poses that cannot be projected fail first
    streams = [
        project_masks(
            volume.data,
            subset,
            pixel_size_a=volume.pixel_size_a,
            batch=options.batch,
            threshold=options.threshold,
            edge_px=options.edge_px,
            rescale=True,
        )
        for subset in subsets
        if len(subset)
    ]
    projections = itertools.chain.from_iterable(streams)
    stages["project"] += time.perf_counter() - began
    done = negatives_done = 0
    mode = "a" if options.append else "w"

    def write_negatives(writer: CorpusWriter, upto: int) -> None:
        """Write the negatives up to row ``upto`` (all background)."""
        nonlocal negatives_done
        while negatives_done < upto:
            began = time.perf_counter()
            rows = negatives.iloc[negatives_done : min(upto, negatives_done + options.batch)]
            images = read_particles_table(rows, base_dir=stacks.base_dir)
            stages["read images"] += time.perf_counter() - began
            began = time.perf_counter()
            labels = np.zeros(images.shape, dtype=np.uint8)
            writer.append(images, labels, _negative_rows(rows, columns))
            stages["write"] += time.perf_counter() - began
            negatives_done += len(rows)

    began = time.perf_counter()
    with CorpusWriter(
        corpus_root, key, stacks.box_px, attrs=attrs, dtype=dtype, mode=mode
    ) as writer:
        stages["write"] += time.perf_counter() - began  # opening the new version
        for projected in _timed(projections, stages, "project"):
            began = time.perf_counter()
            rows = particles.iloc[done : done + len(projected)]
            images = read_particles_table(rows, base_dir=base_dir)
            stages["read images"] += time.perf_counter() - began
            began = time.perf_counter()
            labels = labels_from_projection(projected, options.threshold, options.edge_px)
            stages["labels"] += time.perf_counter() - began
            began = time.perf_counter()
            table = rows[columns].reset_index(drop=True)
            if truth is not None:
                table = table.merge(truth, on="image_name", how="left")
            if negatives_star is not None:
                table[NEGATIVE_COLUMN] = False
            writer.append(images, labels, table)
            stages["write"] += time.perf_counter() - began
            counts += np.bincount(labels.ravel(), minlength=3)[:3]
            empty += int((~(labels == 1).any(axis=(1, 2))).sum())
            if shown is None:
                shown = (images[:8], labels[:8])
            done += len(projected)
            # the negatives' share so far, so that they are spread over the chunks
            write_negatives(writer, (done * len(negatives)) // max(len(particles), 1))
            if done == len(particles) or (done // options.batch) % 10 == 0:
                rate = done / max(time.perf_counter() - started, 1e-9)
                log(f"labels: {done}/{len(particles)} particles ({rate:.0f}/s)")
        write_negatives(writer, len(negatives))
        if len(negatives):
            log(f"negatives: {negatives_done} written, all background")
        began = time.perf_counter()
    stages["write"] += time.perf_counter() - began  # the commit (swap-in) on leaving the block
    seconds = time.perf_counter() - started
    corpus = open_corpus(corpus_root, key)
    on_disk = corpus.stored_bytes()
    gallery = (
        write_png(out_dir / "particles_with_masks.png", particles_with_masks(*shown))
        if shown is not None
        else None
    )
    background, signal, edge = (float(f) for f in counts / max(counts.sum(), 1))
    manifest = LabelsManifest(
        corpus_root=str(corpus_root),
        empiar_id=key,
        n_particles=done,
        skipped=n_bad,
        label_fractions=(background, signal, edge),
        pixel_size_a=attrs["pixel_size_a"],
        threshold=options.threshold,
        edge_px=options.edge_px,
        source_star=attrs["source_star"],
        pose_source=refined.source,
        mask=attrs["mask"],
        mask_params=attrs["mask_params"],
        run_id=run_id,
        n_negatives=negatives_done,
    )
    manifest.write(out_dir)
    return LabelResult(
        manifest,
        already,
        seconds,
        corpus.location,
        on_disk,
        gallery,
        masks_check(signal, empty, done),
        rows_check(corpus),
        stages,
    )
