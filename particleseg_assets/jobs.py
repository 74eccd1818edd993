"""Jobs runnable from the web UI and from ``dagster job execute``."""

import json
import shutil
from datetime import UTC, datetime

from dagster import AssetSelection, OpExecutionContext, define_asset_job, job, op

from particleseg_assets.assets.catalog import eligible_entries, empiar_entries
from particleseg_assets.assets.cleaning import cleaned_particles
from particleseg_assets.assets.corpus import (
    PER_DATASET_FOLDERS,
    mask_volume,
    particle_masks,
    particle_stacks,
    refined_particles,
)
from particleseg_assets.assets.model import iou_reports, segmentation_model
from particleseg_assets.bridge import LaunchpadConfig
from particleseg_assets.partitions import EMPIAR_PARTITIONS_NAME
from particleseg_assets.resources import StorageResource

catalog_job = define_asset_job(
    "catalog_job",
    selection=AssetSelection.assets(empiar_entries, eligible_entries),
    description="Refresh the EMPIAR catalog (incrementally) and select the eligible entries.",
)

DATASET_ASSETS = (particle_stacks, refined_particles, mask_volume, particle_masks)

dataset_job = define_asset_job(
    "dataset_job",
    selection=AssetSelection.assets(*DATASET_ASSETS),
    description="One EMPIAR entry into the corpus: fetch its particles, refine (or take the "
    "deposited poses), mask, label (Zarr). Run it with "
    '--tags \'{"dagster/partition": "10028"}\'.',
)

train_job = define_asset_job(
    "train_job",
    selection=AssetSelection.assets(segmentation_model),
    description="Train the segmentation model on every corpus partition (incrementally when "
    "partitions were added) and register a new version.",
)

report_job = define_asset_job(
    "report_job",
    selection=AssetSelection.assets(iou_reports),
    description="The latest model's IoU report for one partition: --tags "
    '\'{"dagster/partition": "10028"}\'.',
)

clean_job = define_asset_job(
    "clean_job",
    selection=AssetSelection.assets(cleaned_particles),
    description="Clean a RELION particle STAR file with the registered model: --config FILE "
    'with {"ops": {"cleaned_particles": {"config": {"star": '
    '"/path/particles.star", "drop": 0.3}}}}.',
)


class RemoveDatasetConfig(LaunchpadConfig):
    empiar_id: str = ""
    """The partition to remove ("10028" or "EMPIAR-10028"). Required: a run without it stops
    at once, saying so."""
    keep_downloads: bool = False
    """Keep the downloaded files (a later re-add then fetches nothing)."""


REMOVED_FILE = ("catalog", "removed_partitions.json")
"""Under the storage root: the partitions remove_dataset_job removed (id -> when, run), which
the partition sensor never adds back; delete an id there to let it return."""

REPORT_FOLDERS = ("iou_reports",)
"""Per-partition folders of the model's assets (removed with the dataset too)."""


def removed_partitions(storage: StorageResource) -> dict[str, dict]:
    """The partitions removed by remove_dataset_job: id -> {"removed_at", "run_id"}."""
    path = storage.path(*REMOVED_FILE)
    return json.loads(path.read_text()) if path.exists() else {}


def remember_removal(storage: StorageResource, key: str, run_id: str) -> None:
    """Record ``key`` as removed (atomically), so that the sensor does not re-add it."""
    from particleseg_model.atomic import atomic_write_json

    removed = removed_partitions(storage)
    removed[key] = {"removed_at": datetime.now(UTC).isoformat(timespec="seconds"), "run_id": run_id}
    atomic_write_json(storage.path(*REMOVED_FILE), dict(sorted(removed.items())))


@op(
    description="Delete one empiar_id partition: its materialization history, its files under "
    "the storage root (downloads, corpus steps, IoU reports) and its corpus group, and "
    "remember it, so that the partition sensor does not add it back. The other partitions "
    "are untouched."
)
def remove_dataset(
    context: OpExecutionContext, config: RemoveDatasetConfig, storage: StorageResource
) -> None:
    from particleseg_model.access.empiar import partition_key
    from particleseg_model.corpus.store import remove_corpus

    if not config.empiar_id.strip():
        raise ValueError(
            "remove_dataset_job needs the dataset to remove: set "
            'ops.remove_dataset.config.empiar_id ("10028" or "EMPIAR-10028")'
        )
    key = partition_key(config.empiar_id)
    instance = context.instance
    if not instance.has_dynamic_partition(EMPIAR_PARTITIONS_NAME, key):
        raise ValueError(
            f"EMPIAR-{key} is not an {EMPIAR_PARTITIONS_NAME} partition "
            f"(known: {len(instance.get_dynamic_partitions(EMPIAR_PARTITIONS_NAME))})"
        )
    folders = [
        f
        for f in (*PER_DATASET_FOLDERS, *REPORT_FOLDERS)
        if not (config.keep_downloads and f == "downloads")
    ]
    removed = []
    for folder in folders:
        path = storage.path(folder, key)
        if path.exists():
            shutil.rmtree(path)
            removed.append(str(path))
    if remove_corpus(storage.corpus_root(), key):
        removed.append(storage.url("corpus", f"{key}.zarr"))
    history = "wiped"
    try:
        for asset in (*DATASET_ASSETS, iou_reports):
            instance.wipe_asset_partitions(asset.key, [key])
    except NotImplementedError:
        # SQLite event logs cannot wipe single partitions (PostgreSQL can): the events stay
        # as history, and the UI stops listing them once the partition is gone
        history = "kept as history (this event log cannot wipe partitions)"
    instance.delete_dynamic_partition(EMPIAR_PARTITIONS_NAME, key)
    remember_removal(storage, key, context.run_id)
    context.log.info(
        f"EMPIAR-{key} removed: partition deleted, materializations {history}, "
        f"{len(removed)} folders ({', '.join(removed) or 'none on disk'})"
    )


@job(
    description="Remove one dataset (an obsoleted or unwanted entry) without touching the "
    'others: --config FILE with {"ops": {"remove_dataset": {"config": '
    '{"empiar_id": "10028"}}}} (JSON is YAML).'
)
def remove_dataset_job() -> None:
    remove_dataset()
