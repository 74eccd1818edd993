"""Per-dataset corpus assets, one ``empiar_id`` partition each:
particle stacks -> refined poses -> mask volume -> label corpus (Zarr).

Each asset writes under ``$PARTICLESEG_DATA/<asset>/<partition>/`` and records a small JSON
manifest there (paths, parameters, counts), which is what the next asset reads: Zarr stores and
RELION outputs are passed by path, never through an IO manager.
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)

from particleseg_assets.assets.catalog import eligible_entries
from particleseg_assets.partitions import empiar_partitions
from particleseg_assets.resources import EmpiarResource, RelionResource, StorageResource

MANIFEST = "manifest.json"
PER_DATASET_FOLDERS = (
    "downloads",
    "particle_stacks",
    "refined_particles",
    "mask_volume",
    "particle_masks",
)
"""The folders under the storage root holding one sub-folder per partition (plus the corpus
group ``corpus/<id>.zarr``)."""


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``folder/manifest.json`` atomically (temporary name, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest-", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(manifest, handle, indent=2, default=str)
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def read_manifest(folder: Path, asset_name: str) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: materialize {asset_name} for this partition first"
        )
    return json.loads(path.read_text())


def _gallery_md(path: Path) -> MetadataValue:
    from particleseg_model.figures import markdown_image

    return MetadataValue.md(markdown_image(path, path.stem))


def _log_lines(context: AssetExecutionContext, prefix: str):
    def log(line: str) -> None:
        context.log.info(f"{prefix}: {line}")

    return log


def _maps(manifest: dict[str, Any]) -> tuple[Path | None, Path | None]:
    """(the deposited density map, a deposited mask) among the entry's map files."""
    density = mask = None
    for name in manifest.get("maps", []):
        path = Path(name)
        if "mask" in path.name.lower():
            mask = mask or path
        else:
            density = density or path
    return density, mask


def _extracted_truth(particles: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Ground truth per coordinate (micrograph entries) keyed by the extracted image names."""
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


def _map_resolution_a(storage: StorageResource, empiar: EmpiarResource, entry) -> float | None:
    """The entry's best EMDB map resolution: as the catalog recorded it, else asked of EMDB
    (None when no linked map states one)."""
    path = storage.eligible_path()
    if path.exists():
        eligible = pd.read_parquet(path, columns=["empiar_id", "best_resolution_a"])
        row = eligible[eligible["empiar_id"] == entry.empiar_id]
        if len(row) and not pd.isna(row["best_resolution_a"].iloc[0]):
            return float(row["best_resolution_a"].iloc[0])
    from particleseg_model.access.http import HttpError

    emdb, found = empiar.emdb(), []
    for emd_id in entry.emdb_ids:
        try:
            found.append(emdb.resolution_a(emd_id))
        except (HttpError, ValueError):
            continue  # an unresolvable map is reported by the catalog, not fatal here
    found = [r for r in found if r is not None]
    return min(found) if found else None


# -------------------------------------------------------------------------- particle_stacks


class StacksConfig(Config):
    box_px: int = 0
    """Extraction box (micrograph entries only); 0: the entry's own (simulation.json) or twice
    the particle diameter of its map."""
    rescale_px: int = 0
    """Rescale extracted particles to this box; 0: keep the extraction box."""
    invert_contrast: bool = True
    """Deposited micrographs show particles dark; the corpus wants them bright."""


def _extraction_box(files, config: StacksConfig) -> int:
    if config.box_px:
        return config.box_px
    simulation = files.side_files.get("simulation.json")
    if simulation is not None:
        return int(json.loads(Path(simulation).read_text())["box"])
    from particleseg_model.em.maps import load_map, make_mask, particle_diameter_px

    density = [p for p in files.maps if "mask" not in p.name.lower()]
    if not density:
        raise ValueError(f"{files.empiar_id}: no box size known: set box_px in the config")
    reference = load_map(density[0])
    mask, _ = make_mask(reference)
    diameter_a = particle_diameter_px(mask) * reference.pixel_size_a
    box = int(np.ceil(2 * diameter_a / (files.pixel_size_a or 1.0) / 2) * 2)
    return box


@asset(
    partitions_def=empiar_partitions,
    group_name="corpus",
    deps=[eligible_entries],
    kinds={"relion", "mrc"},
    pool="relion",
)
def particle_stacks(
    context: AssetExecutionContext,
    config: StacksConfig,
    empiar: EmpiarResource,
    storage: StorageResource,
    relion: RelionResource,
) -> MaterializeResult:
    """The entry's particle images and their STAR file: the deposited stacks when the entry
    ships them, else particles extracted from its micrographs and coordinate files with
    ``relion_preprocess``. Only what the entry needs is downloaded (resumable)."""
    from particleseg_model.access.dataset import fetch_entry_files
    from particleseg_model.em.mrc import read_particles_table
    from particleseg_model.em.star import has_poses, read_star
    from particleseg_model.figures import particles_with_masks, write_png
    from particleseg_model.relion import extract_particles

    key = context.partition_key
    started = time.perf_counter()
    entry = empiar.empiar().entry(key)
    downloads = storage.path("downloads", key)
    context.log.info(f"fetching what {entry.empiar_id} needs from {empiar.archive()}")
    files = fetch_entry_files(entry, empiar.archive(), downloads, progress=False)
    context.log.info(f"{files.kind}: {files.nbytes / 1e6:.1f} MB in {downloads}")
    out = storage.path("particle_stacks", key)
    extraction: dict[str, Any] | None = None
    truth_path = files.side_files.get("ground_truth.csv")
    if files.kind == "particles":
        star_path, base_dir = files.particles_star, files.particles_star.parent
    else:
        box = _extraction_box(files, config)
        with relion.on_path():
            result = extract_particles(
                files.micrographs,
                files.coordinates,
                out / "extract",
                box_px=box,
                rescale_px=config.rescale_px or None,
                invert_contrast=config.invert_contrast,
                pixel_size_a=files.pixel_size_a,
                overwrite=True,
                progress=False,
                log=_log_lines(context, "relion_preprocess"),
            )
        star_path, base_dir = result.particles_star, result.project_dir
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
            truth = _extracted_truth(read_star(star_path).particles, pd.read_csv(truth_path))
            truth_path = out / "ground_truth.csv"
            truth.to_csv(truth_path, index=False)
    star = read_star(star_path)
    particles = star.particles
    box = int(particles["image_size_px"].dropna().iloc[0])
    sample = particles.head(8)
    images = read_particles_table(sample, base_dir=base_dir)
    gallery = write_png(out / "particles.png", particles_with_masks(images))
    manifest = {
        "empiar_id": entry.empiar_id,
        "kind": files.kind,
        "particles_star": str(star_path),
        "base_dir": str(base_dir),
        "n_particles": len(particles),
        "box_px": box,
        "pixel_size_a": float(particles["pixel_size_a"].iloc[0]),
        "has_poses": bool(has_poses(particles)),
        "maps": [str(p) for p in files.maps],
        "ground_truth": str(truth_path) if truth_path else None,
        "extraction": extraction,
        "map_resolution_a": _map_resolution_a(storage, empiar, entry),
        "downloaded_bytes": files.nbytes,
    }
    write_manifest(out, manifest)
    return MaterializeResult(
        metadata={
            "particles": len(particles),
            "box_px": box,
            "pixel_size_a": manifest["pixel_size_a"],
            "source": files.kind,
            "poses_deposited": manifest["has_poses"],
            "particles_star": MetadataValue.path(str(star_path)),
            "downloaded_mb": round(files.nbytes / 1e6, 1),
            "extraction": MetadataValue.json(extraction or {}),
            "ground_truth": manifest["ground_truth"] or "none",
            "seconds": round(time.perf_counter() - started, 1),
            "particles_png": _gallery_md(gallery),
        }
    )


# -------------------------------------------------------------------------- refined_particles


class RefineConfig(Config):
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


@asset(
    partitions_def=empiar_partitions,
    group_name="corpus",
    deps=[particle_stacks],
    kinds={"relion", "star"},
    pool="relion",
    check_specs=[
        AssetCheckSpec(
            "poses_for_every_particle",
            asset="refined_particles",
            description="Every particle of the STAR file has rot, tilt, psi and "
            "origins (finite numbers).",
        ),
        AssetCheckSpec(
            "resolution_reported",
            asset="refined_particles",
            description="A resolution is known for the map behind the poses: "
            "RELION's final one, or the deposited EMDB map's.",
        ),
    ],
)
def refined_particles(
    context: AssetExecutionContext,
    config: RefineConfig,
    storage: StorageResource,
    relion: RelionResource,
) -> MaterializeResult:
    """Particle poses: the depositors' refined STAR file when it has poses, otherwise RELION
    3D auto-refine (``relion_refine_mpi`` under ``mpirun``) from the entry's map, low-pass
    filtered. Angular and shift errors against the simulator's ground truth when there is one."""
    from particleseg_model.em.star import read_star, write_star
    from particleseg_model.relion import auto_refine, pose_errors, summarise_pose_errors

    key = context.partition_key
    stacks = read_manifest(storage.path("particle_stacks", key), "particle_stacks")
    out = storage.path("refined_particles", key)
    source = config.source
    if source not in ("auto", "deposited", "refine"):
        raise ValueError(f"source must be auto, deposited or refine, got {source!r}")
    if source == "auto":
        source = "deposited" if stacks["has_poses"] else "refine"
    if source == "deposited" and not stacks["has_poses"]:
        raise ValueError(
            f"{stacks['particles_star']} has no poses (rlnAngleRot/Tilt/Psi): use source 'refine'"
        )
    metadata: dict[str, Any] = {"source": source}
    started = time.perf_counter()
    refined_map = None
    if source == "deposited":
        star_path = Path(stacks["particles_star"])
        base_dir = stacks["base_dir"]
    else:
        density, _ = _maps(stacks)
        if density is None:
            raise FileNotFoundError(f"EMPIAR-{key}: no deposited map to start refinement from")
        # A fresh folder per run: the manifest names the one in use, so a killed or failed
        # refinement (RELION writes run_it000_* ... as it goes) never touches the files of the
        # version readers see; the next good run removes the other folders.
        work = out / f"refine-{context.run.run_id[:8]}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        star_in = Path(stacks["particles_star"])
        if config.max_particles:
            star = read_star(star_in)
            subset = star.particles.head(config.max_particles)
            star_in = work / "input_particles.star"
            write_star(star_in, star, particles=subset)
        options: dict[str, Any] = {
            "mpi_ranks": config.mpi_ranks or relion.ranks(),
            "threads": relion.threads_per_rank(),
        }
        if config.ini_lowpass_a:
            options["ini_lowpass_a"] = config.ini_lowpass_a
        if config.max_iterations:
            options["max_iterations"] = config.max_iterations
        with relion.on_path():
            refinement = auto_refine(
                star_in,
                density,
                work,
                project_dir=stacks["base_dir"],
                log=_log_lines(context, "relion_refine"),
                **options,
            )
        star_path, base_dir = refinement.data_star, stacks["base_dir"]
        refined_map = str(refinement.map_path)
        metadata.update(
            {
                "resolution_a": round(refinement.resolution_a, 2),
                "iterations": refinement.iterations,
                "refine_settings": MetadataValue.json(refinement.settings),
                "command": " ".join(refinement.command),
            }
        )
    particles = read_star(star_path).particles
    resolution_a = refinement.resolution_a if source == "refine" else stacks.get("map_resolution_a")
    if source == "deposited" and resolution_a is not None:
        metadata["resolution_a"] = round(float(resolution_a), 2)
    if stacks.get("ground_truth"):
        truth = pd.read_csv(stacks["ground_truth"])
        truth = truth[truth["is_good"].astype(bool)]  # junk has no pose worth scoring
        errors = pose_errors(particles, truth)
        summary = summarise_pose_errors(errors)
        metadata.update({f"pose_{name}": round(float(value), 3) for name, value in summary.items()})
        context.log.info(f"poses against the ground truth: {summary}")
    write_manifest(
        out,
        {
            "empiar_id": stacks["empiar_id"],
            "source": source,
            "particles_star": str(star_path),
            "base_dir": str(base_dir),
            "refined_map": refined_map,
            "n_particles": len(particles),
            "box_px": stacks["box_px"],
            "pixel_size_a": stacks["pixel_size_a"],
        },
    )
    _remove_old_refinements(out, keep=Path(star_path).parent if source == "refine" else None)
    metadata.update(
        {
            "particles": len(particles),
            "particles_star": MetadataValue.path(str(star_path)),
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    return MaterializeResult(
        metadata=metadata,
        check_results=[
            _poses_check(particles, star_path),
            AssetCheckResult(
                check_name="resolution_reported",
                passed=resolution_a is not None,
                severity=AssetCheckSeverity.WARN,
                metadata={
                    "resolution_a": float(resolution_a or float("nan")),
                    "from": "relion_refine" if source == "refine" else "EMDB map of the entry",
                },
            ),
        ],
    )


def _remove_old_refinements(out: Path, keep: Path | None) -> None:
    """After the manifest names the new version: the folders of earlier (or killed)
    refinements, and the single ``refine/`` folder of the layout before per-run folders."""
    for folder in out.glob("refine*"):
        if folder.is_dir() and (keep is None or folder.resolve() != keep.resolve()):
            shutil.rmtree(folder, ignore_errors=True)
    (out / "input_particles.star").unlink(missing_ok=True)


def _poses_check(particles: pd.DataFrame, star_path: Path) -> AssetCheckResult:
    columns = ["rot_deg", "tilt_deg", "psi_deg", "origin_x_a", "origin_y_a"]
    missing = [c for c in columns if c not in particles.columns]
    if missing:
        return AssetCheckResult(
            check_name="poses_for_every_particle",
            passed=False,
            metadata={"star": str(star_path), "missing_columns": ", ".join(missing)},
        )
    finite = np.isfinite(particles[columns].to_numpy(dtype=np.float64)).all(axis=1)
    rows = (np.flatnonzero(~finite) + 1).tolist()
    return AssetCheckResult(
        check_name="poses_for_every_particle",
        passed=not rows,
        metadata={
            "star": str(star_path),
            "particles": len(particles),
            "without_pose": len(rows),
            "first_rows": _row_ranges(rows) if rows else "",
        },
    )


# -------------------------------------------------------------------------- mask_volume


class MaskConfig(Config):
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


@asset(
    partitions_def=empiar_partitions, group_name="corpus", deps=[refined_particles], kinds={"mrc"}
)
def mask_volume(
    context: AssetExecutionContext, config: MaskConfig, storage: StorageResource
) -> MaterializeResult:
    """The MaskCreate-style mask (threshold, extend, soft edge) of the refined map (or of the
    deposited map when the poses are the depositors'), at the particles' box and pixel size."""
    from particleseg_model.em.maps import (
        DensityMap,
        create_mask,
        fourier_resample,
        load_map,
        lowpass,
        make_mask,
        pad_or_crop,
        write_mrc,
    )

    key = context.partition_key
    stacks = read_manifest(storage.path("particle_stacks", key), "particle_stacks")
    refined = read_manifest(storage.path("refined_particles", key), "refined_particles")
    density_path, deposited_mask = _maps(stacks)
    source = refined.get("refined_map") or (str(density_path) if density_path else None)
    if config.use_deposited_mask and deposited_mask is not None:
        source = str(deposited_mask)
    if source is None:
        raise FileNotFoundError(f"EMPIAR-{key}: no map to make a mask from")
    density = load_map(source)
    box, pixel = int(stacks["box_px"]), float(stacks["pixel_size_a"])
    # bring the map to the particles' sampling first: the mask is projected at their box
    if abs(density.pixel_size_a - pixel) > 1e-3 * pixel or density.box != box:
        size = int(round(density.box * density.pixel_size_a / pixel / 2) * 2)
        data = pad_or_crop(fourier_resample(density.data, size), box)
        context.log.info(
            f"map resampled from {density.box} px at {density.pixel_size_a:.4f} A "
            f"to {box} px at {pixel:.4f} A"
        )
        density = DensityMap(data.astype(np.float32), pixel, density.source)
    if config.use_deposited_mask and deposited_mask is not None:
        mask, threshold = np.clip(density.data, 0, 1), float("nan")
    elif config.threshold:
        data = lowpass(density.data, pixel, config.lowpass_a) if config.lowpass_a else density.data
        threshold = config.threshold
        mask = create_mask(
            data, threshold, extend_px=config.extend_px, soft_edge_px=config.soft_edge_px
        )
    else:
        mask, threshold = make_mask(
            density,
            lowpass_a=config.lowpass_a or None,
            extend_px=config.extend_px,
            soft_edge_px=config.soft_edge_px,
        )
    out = storage.path("mask_volume", key)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".mask.mrc.tmp"
    write_mrc(tmp, mask.astype(np.float32), pixel)
    os.replace(tmp, out / "mask.mrc")
    params = {
        "map": source,
        "lowpass_a": config.lowpass_a,
        "extend_px": config.extend_px,
        "soft_edge_px": config.soft_edge_px,
        "threshold": threshold,
        "box_px": box,
        "pixel_size_a": pixel,
    }
    write_manifest(out, {**params, "mask": str(out / "mask.mrc")})
    return MaterializeResult(
        metadata={
            "mask": MetadataValue.path(str(out / "mask.mrc")),
            "map": source,
            "threshold": round(float(threshold), 4),
            "lowpass_a": config.lowpass_a,
            "extend_px": config.extend_px,
            "soft_edge_px": config.soft_edge_px,
            "volume_fraction": round(float((mask >= 0.5).mean()), 4),
        }
    )


# -------------------------------------------------------------------------- particle_masks


class LabelConfig(Config):
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


def _row_ranges(rows: list[int]) -> str:
    """``[17, 18, 19, 25]`` -> ``"17-19, 25"`` (1-based STAR rows)."""
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


def _check_rows(particles: pd.DataFrame, base_dir: Path) -> tuple[np.ndarray, list[str]]:
    """A mask of the rows whose stack exists and holds their index, and what is wrong with
    the others, one line per stack (``stack S, rows 17-32: reason``)."""
    from particleseg_model.em.mrc import MrcError, open_stack

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
        f"stack {stack}, rows {_row_ranges(rows)}: {reason}"
        for (stack, reason), rows in bad.items()
    ]
    return good, problems


SIGNAL_FRACTION_RANGE = (0.01, 0.8)
"""Plausible share of signal pixels over a dataset: below, the mask or the poses are off (a
particle of ~half the box covers ~0.2); above, the threshold is below the solvent."""
MAX_EMPTY_SHARE = 0.05
"""At most this share of particles may have no signal pixel at all."""


@asset(
    partitions_def=empiar_partitions,
    group_name="corpus",
    deps=[refined_particles, mask_volume],
    kinds={"zarr", "parquet"},
    check_specs=[
        AssetCheckSpec(
            "masks_not_empty",
            asset="particle_masks",
            description=f"Signal fraction over the dataset within "
            f"{SIGNAL_FRACTION_RANGE}, and at most "
            f"{MAX_EMPTY_SHARE:.0%} of the particles without signal.",
        ),
        AssetCheckSpec(
            "zarr_parquet_rows_agree",
            asset="particle_masks",
            description="The Zarr images, labels and the Parquet particle table "
            "have one row per particle each.",
        ),
    ],
)
def particle_masks(
    context: AssetExecutionContext, config: LabelConfig, storage: StorageResource
) -> MaterializeResult:
    """Every particle's image and its 3-class label mask (0 background, 1 signal, 2 edge) from
    the projection of the mask volume at the particle's pose, in the Zarr corpus (one group per
    EMPIAR id, chunked along particles) with the per-particle Parquet table and splits.
    Written to a temporary version and swapped in: a failed run leaves the last one intact."""
    from particleseg_model.corpus.labels import labels_from_projection
    from particleseg_model.corpus.projection import project_masks
    from particleseg_model.corpus.store import CorpusWriter, list_corpus, open_corpus
    from particleseg_model.em.maps import load_map
    from particleseg_model.em.mrc import read_particles_table
    from particleseg_model.em.star import read_star
    from particleseg_model.figures import particles_with_masks, write_png

    key = context.partition_key
    refined = read_manifest(storage.path("refined_particles", key), "refined_particles")
    mask_info = read_manifest(storage.path("mask_volume", key), "mask_volume")
    stacks = read_manifest(storage.path("particle_stacks", key), "particle_stacks")
    particles = read_star(refined["particles_star"]).particles.reset_index(drop=True)
    base_dir = Path(refined["base_dir"])
    good, problems = _check_rows(particles, base_dir)
    n_bad = int((~good).sum())
    if n_bad:
        listed = "; ".join(problems[:5]) + (
            f"; ... {len(problems) - 5} more stacks" if len(problems) > 5 else ""
        )
        if not config.skip_bad_rows:
            raise ValueError(
                f"{refined['particles_star']}: {n_bad} particles cannot be read: "
                f"{listed} (set skip_bad_rows to drop them)"
            )
        context.log.warning(f"skipping {n_bad} particles that cannot be read: {listed}")
        particles = particles[good].reset_index(drop=True)
    already = 0
    if config.append and key in list_corpus(storage.corpus_root()):
        present = set(open_corpus(storage.corpus_root(), key).table["image_name"])
        keep = ~particles["image_name"].isin(present).to_numpy()
        already = int((~keep).sum())
        particles = particles[keep].reset_index(drop=True)
        context.log.info(f"append: {already} particles already in the corpus, {len(particles)} new")
    truth = None
    if stacks.get("ground_truth"):
        truth = pd.read_csv(stacks["ground_truth"])[["image_name", "is_good", "junk_kind"]]
    mask = load_map(mask_info["mask"])
    started = time.perf_counter()
    root = storage.corpus_root()  # a local path or a URL (object storage)
    attrs = {
        "pixel_size_a": float(refined["pixel_size_a"]),
        "threshold": config.threshold,
        "edge_px": config.edge_px,
        "source_star": refined["particles_star"],
        "pose_source": refined["source"],
        "mask": mask_info["mask"],
        "mask_params": {
            k: mask_info[k] for k in ("lowpass_a", "extend_px", "soft_edge_px", "threshold")
        },
        "dagster_run_id": context.run.run_id,
    }
    counts = np.zeros(3, dtype=np.float64)
    empty = 0
    shown: tuple[np.ndarray, np.ndarray] | None = None
    columns = [
        c
        for c in (
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
        if c in particles.columns
    ]
    projections = project_masks(
        mask.data,
        particles,
        pixel_size_a=mask.pixel_size_a,
        batch=config.batch,
        threshold=config.threshold,
        edge_px=config.edge_px,
        rescale=True,
    )
    done = 0
    with CorpusWriter(
        root, key, int(stacks["box_px"]), attrs=attrs, mode="a" if config.append else "w"
    ) as writer:
        for projected in projections:
            rows = particles.iloc[done : done + len(projected)]
            images = read_particles_table(rows, base_dir=base_dir)
            labels = labels_from_projection(projected, config.threshold, config.edge_px)
            table = rows[columns].reset_index(drop=True)
            if truth is not None:
                table = table.merge(truth, on="image_name", how="left")
            writer.append(images, labels, table)
            counts += np.bincount(labels.ravel(), minlength=3)[:3]
            empty += int((~(labels == 1).any(axis=(1, 2))).sum())
            if shown is None:
                shown = (images[:8], labels[:8])
            done += len(projected)
            if done == len(particles) or (done // config.batch) % 10 == 0:
                rate = done / max(time.perf_counter() - started, 1e-9)
                context.log.info(f"labels: {done}/{len(particles)} particles ({rate:.0f}/s)")
    seconds = time.perf_counter() - started
    corpus = open_corpus(root, key)
    on_disk = corpus.stored_bytes()
    out = storage.path("particle_masks", key)
    gallery = (
        write_png(out / "particles_with_masks.png", particles_with_masks(*shown))
        if shown is not None
        else None
    )
    fractions = counts / max(counts.sum(), 1)
    write_manifest(
        out,
        {
            "corpus_root": str(root),
            "empiar_id": key,
            "n_particles": done,
            "skipped": n_bad,
            "label_fractions": fractions.tolist(),
            **attrs,
        },
    )
    metadata: dict[str, Any] = {
        "particles": done,
        "skipped_bad_rows": n_bad,
        "already_in_corpus": already,
        "seconds": round(seconds, 1),
        "particles_per_s": round(done / max(seconds, 1e-9), 1),
        "bytes_per_particle": round(on_disk / max(done, 1)),
        "corpus": MetadataValue.path(corpus.location),
        "background_fraction": round(float(fractions[0]), 4),
        "signal_fraction": round(float(fractions[1]), 4),
        "edge_fraction": round(float(fractions[2]), 4),
        "threshold": config.threshold,
        "edge_px": config.edge_px,
    }
    if gallery is not None:
        metadata["particles_with_masks"] = _gallery_md(gallery)
    low, high = SIGNAL_FRACTION_RANGE
    rows = {
        "images": int(corpus.images.shape[0]),
        "labels": int(corpus.labels.shape[0]),
        "parquet": len(corpus.table),
    }
    return MaterializeResult(
        metadata=metadata,
        check_results=[
            AssetCheckResult(
                check_name="masks_not_empty",
                passed=bool(
                    low <= fractions[1] <= high and empty <= MAX_EMPTY_SHARE * max(done, 1)
                ),
                metadata={
                    "signal_fraction": round(float(fractions[1]), 4),
                    "particles_without_signal": empty,
                    "particles_written": done,
                },
            ),
            AssetCheckResult(
                check_name="zarr_parquet_rows_agree",
                passed=len(set(rows.values())) == 1,
                metadata=rows,
            ),
        ],
    )
