"""Per-dataset corpus assets, one ``empiar_id`` partition each:
particle stacks -> refined poses -> mask volume -> label corpus (Zarr).

Each asset reads its launchpad config, calls one step of :mod:`particleseg_model.corpus.build`
and reports the result as metadata and check results. A step writes under
``$PARTICLESEG_DATA/<asset>/<partition>/`` and records its manifest there (paths, parameters,
counts; :mod:`particleseg_model.corpus.manifests`), which is what the next asset reads: Zarr
stores and RELION outputs are passed by path, never through an IO manager.
"""

import functools
import time
from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    asset,
)

from particleseg_assets.assets.catalog import eligible_entries
from particleseg_assets.bridge import check_result, launchpad_config, metadata, options_from
from particleseg_assets.partition_checks import (
    COMPLETE_SHARE,
    SHARE_FACTOR,
    corpus_complete,
    label_shares_like_the_others,
    partition_check,
)
from particleseg_assets.partitions import empiar_partitions
from particleseg_assets.resources import EmpiarResource, RelionResource, StorageResource
from particleseg_model.corpus import build
from particleseg_model.corpus.manifests import (
    MaskManifest,
    RefinedManifest,
    StacksManifest,
    read_manifest,  # kept importable from here for tests/test_faults.py
)

__all__ = ["PER_DATASET_FOLDERS", "read_manifest"]

PER_DATASET_FOLDERS = (
    "downloads",
    "particle_stacks",
    "refined_particles",
    "mask_volume",
    "particle_masks",
)
"""The folders under the storage root holding one sub-folder per partition (plus the corpus
group ``corpus/<id>.zarr``)."""


StacksConfig = launchpad_config(build.StacksOptions, __name__)
RefineConfig = launchpad_config(build.RefineOptions, __name__)
MaskConfig = launchpad_config(build.MaskOptions, __name__)
LabelConfig = launchpad_config(build.LabelOptions, __name__)


def _check(name: str, asset: str, description: str) -> AssetCheckSpec:
    """A check per empiar_id partition (one partition's failure leaves the others green)."""
    return partition_check(name, asset, description)


_corpus_asset = functools.partial(asset, partitions_def=empiar_partitions, group_name="corpus")


@_corpus_asset(deps=[eligible_entries], kinds={"relion", "mrc"}, pool="relion")
def particle_stacks(
    context: AssetExecutionContext,
    config: StacksConfig,
    empiar: EmpiarResource,
    storage: StorageResource,
    relion: RelionResource,
) -> MaterializeResult:
    """The entry's particle images and their STAR file: the deposited stacks when the entry
    ships them (any RELION STAR flavour, or cryoSPARC .cs), else particles extracted from its
    micrographs and coordinate files with ``relion_preprocess``, with negatives beside them
    (boxes at least a particle diameter from every pick, cut the same way; their count, rule
    and a gallery of particles above negatives are in the metadata); and the reference map,
    from EMDB's file tree unless the archive holds it (its EMDB id, resolution, voxel size,
    sha256 and how it was chosen are in the metadata). Only what the entry needs is
    downloaded (resumable)."""
    key = context.partition_key
    started = time.perf_counter()  # the EMPIAR lookup counts too
    entry = empiar.empiar().entry(key)
    result = build.fetch_stacks(
        entry,
        empiar.archive(),
        storage.path("downloads", key),
        storage.path("particle_stacks", key),
        options_from(build.StacksOptions, config),
        map_resolution_a=lambda: build.best_map_resolution_a(
            entry, eligible_path=storage.eligible_path(), emdb=empiar.emdb()
        ),
        emdb_files_url=empiar.emdb_files(),
        emdb=empiar.emdb(),
        map_cache=storage.path("emdb"),  # one copy of each EMDB map for every partition
        relion=relion,
        log=context.log.info,
    )
    summary = {**result.summary(), "seconds": round(time.perf_counter() - started, 1)}
    return MaterializeResult(metadata=metadata(summary))


@_corpus_asset(
    deps=[particle_stacks],
    kinds={"relion", "star"},
    pool="relion",
    check_specs=[
        _check(
            "poses_for_every_particle",
            "refined_particles",
            "Every particle of the STAR file has rot, tilt, psi and origins (finite numbers).",
        ),
        _check(
            "resolution_reported",
            "refined_particles",
            "A resolution is known for the map behind the poses: "
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
    key = context.partition_key
    result = build.refine_poses(
        StacksManifest.read(storage.path("particle_stacks", key), "particle_stacks"),
        storage.path("refined_particles", key),
        options_from(build.RefineOptions, config),
        run_id=context.run.run_id,
        relion=relion,
        log=context.log.info,
    )
    checks = [
        _poses_check(result.poses, result.manifest.particles_star),
        check_result("resolution_reported", result.resolution, AssetCheckSeverity.WARN),
    ]
    return MaterializeResult(metadata=metadata(result.summary()), check_results=checks)


def _poses_check(check: build.PosesCheck, star: Path) -> AssetCheckResult:
    return check_result("poses_for_every_particle", check, star=str(star))


@_corpus_asset(deps=[refined_particles], kinds={"mrc"})
def mask_volume(
    context: AssetExecutionContext, config: MaskConfig, storage: StorageResource
) -> MaterializeResult:
    """The MaskCreate-style mask (threshold, extend, soft edge) of the refined map (or of the
    deposited map when the poses are the depositors'), at the particles' box and pixel size."""
    key = context.partition_key
    result = build.make_mask_volume(
        StacksManifest.read(storage.path("particle_stacks", key), "particle_stacks"),
        RefinedManifest.read(storage.path("refined_particles", key), "refined_particles"),
        storage.path("mask_volume", key),
        options_from(build.MaskOptions, config),
        log=context.log.info,
    )
    return MaterializeResult(metadata=metadata(result.summary()))


@_corpus_asset(
    deps=[refined_particles, mask_volume],
    kinds={"zarr", "parquet"},
    check_specs=[
        _check(
            "masks_not_empty",
            "particle_masks",
            f"Signal fraction over the dataset's particles within "
            f"{build.SIGNAL_FRACTION_RANGE}, and at most {build.MAX_EMPTY_SHARE:.0%} of the "
            "particles without signal (negatives, all background by construction, apart).",
        ),
        _check(
            "corpus_complete",
            "particle_masks",
            f"The partition read back from the corpus holds at least {COMPLETE_SHARE:.0%} of "
            "the particles the EMPIAR catalog announces for the entry, and as many Zarr rows as "
            "Parquet rows.",
        ),
        _check(
            "label_shares_like_the_others",
            "particle_masks",
            f"The signal share and the edge-to-signal ratio of this partition's particles "
            f"within a factor {SHARE_FACTOR:g} of the other partitions' medians (negatives "
            "apart).",
        ),
    ],
)
def particle_masks(
    context: AssetExecutionContext, config: LabelConfig, storage: StorageResource
) -> MaterializeResult:
    """Every particle's image and its 3-class label mask (0 background, 1 signal, 2 edge) from
    the projection of the mask volume at the particle's pose, in the Zarr corpus (one group per
    EMPIAR id, chunked along particles) with the per-particle Parquet table and splits; and
    the entry's negatives (micrograph regions far from every pick) labelled all background,
    marked ``negative`` in the table, counted apart in the metadata and the checks.
    Written to a temporary version and swapped in: a failed run leaves the last one intact."""
    key = context.partition_key
    refined = RefinedManifest.read(storage.path("refined_particles", key), "refined_particles")
    mask = MaskManifest.read(storage.path("mask_volume", key), "mask_volume")
    stacks = StacksManifest.read(storage.path("particle_stacks", key), "particle_stacks")
    result = build.label_partition(
        stacks,
        refined,
        mask,
        storage.corpus_root(),  # a local path or a URL (object storage)
        storage.path("particle_masks", key),
        options_from(build.LabelOptions, config),
        key=key,
        run_id=context.run.run_id,
        log=context.log.info,
        warn=context.log.warning,
    )
    others = sorted(context.instance.get_dynamic_partitions(empiar_partitions.name or ""))
    checks = [
        check_result(
            "masks_not_empty", result.masks, negatives_not_counted=result.manifest.n_negatives
        ),
        corpus_complete(storage, key, result.manifest),
        label_shares_like_the_others(storage, key, result.manifest, others),
    ]
    return MaterializeResult(metadata=metadata(result.summary()), check_results=checks)
