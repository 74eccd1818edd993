"""Sensors: find new EMPIAR entries, and keep one partition per eligible entry."""

from __future__ import annotations

import hashlib
import os

import pandas as pd
from dagster import (
    AssetKey,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from particleseg_assets.jobs import (
    REMOVED_FILE,
    catalog_job,
    dataset_job,
    removed_partitions,
    report_job,
)
from particleseg_assets.partitions import EMPIAR_PARTITIONS_NAME, empiar_partitions
from particleseg_assets.resources import EmpiarResource, StorageResource
from particleseg_model.access.catalog import UpdateCursor, find_updates, read_catalog
from particleseg_model.access.http import HttpError


@sensor(
    job=catalog_job,
    minimum_interval_seconds=6 * 3600,
    default_status=DefaultSensorStatus.STOPPED,
    description="Asks the EMPIAR search API for entries updated since the last tick and "
    "requests a catalog refresh when there are any.",
)
def empiar_updates_sensor(
    context: SensorEvaluationContext, empiar: EmpiarResource, storage: StorageResource
) -> SensorResult | SkipReason:
    cursor = UpdateCursor.from_json(context.cursor)
    if cursor is None:
        # First tick: start from the stored catalog rather than list the whole archive again.
        cursor = UpdateCursor.from_catalog(read_catalog(storage.catalog_path()))
    try:
        changed, new_cursor = find_updates(empiar.empiar(), cursor)
    except HttpError as exc:
        # The cursor stays where it was, so the next tick asks for the same window again.
        return SkipReason(f"EMPIAR API unavailable, retrying next tick: {exc}")
    if not changed:
        since = cursor.update_date if cursor else "the beginning"
        return SkipReason(f"no EMPIAR entry updated since {since}")
    digest = hashlib.sha1(",".join(changed).encode()).hexdigest()[:12]
    assert new_cursor is not None
    context.log.info(f"{len(changed)} EMPIAR entries new or updated up to {new_cursor.update_date}")
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key=f"catalog-{new_cursor.update_date}-{digest}",
                tags={"particleseg/changed_entries": str(len(changed))},
            )
        ],
        cursor=new_cursor.to_json(),
    )


AUTO_RUN_ENV = "PARTICLESEG_AUTO_RUN"
"""``new`` (default): request a dataset_job run for each partition the sensor adds; ``off``:
only add partitions (a person launches the runs)."""


def dataset_run_key(key: str) -> str:
    """One run request per dataset, ever: Dagster drops a second request with this key."""
    return f"dataset-{key}"


@sensor(
    job=dataset_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="After each eligible_entries materialization, adds one empiar_id partition "
    "per new eligible entry (never one remove_dataset_job removed) and requests a dataset_job "
    "run for it (run key dataset-<id>; PARTICLESEG_AUTO_RUN=off only adds the partitions).",
)
def eligible_partitions_sensor(
    context: SensorEvaluationContext, storage: StorageResource
) -> SensorResult | SkipReason:
    records = context.instance.fetch_materializations(AssetKey("eligible_entries"), limit=1)
    event = records.records[0] if records.records else None
    if event is None:
        return SkipReason("eligible_entries has not been materialized yet")
    if context.cursor == str(event.storage_id):
        return SkipReason("no new eligible_entries materialization")
    path = storage.eligible_path()
    if not path.exists():
        return SkipReason(f"{path} is missing; re-materialize eligible_entries")
    eligible = pd.read_parquet(path, columns=["partition_key"])
    existing = set(context.instance.get_dynamic_partitions(EMPIAR_PARTITIONS_NAME))
    removed = removed_partitions(storage)
    kept_out = sorted(set(eligible["partition_key"].astype(str)) & set(removed) - existing)
    if kept_out:
        context.log.info(
            f"{len(kept_out)} eligible partitions were removed by remove_dataset_job and are "
            f"not added back: {', '.join(kept_out[:20])} (to let one return, delete it from "
            f"{storage.path(*REMOVED_FILE)})"
        )
    new_keys = [
        k for k in eligible["partition_key"].astype(str) if k not in existing and k not in removed
    ]
    gone = sorted(existing - set(eligible["partition_key"].astype(str)))
    if gone:
        # Removing a dataset deletes its lineage: leave that to a person (UI or CLI).
        context.log.info(f"{len(gone)} partitions are no longer eligible: {', '.join(gone[:20])}")
    if new_keys:
        context.log.info(f"adding {len(new_keys)} partitions: {', '.join(new_keys[:20])}")
    auto = os.environ.get(AUTO_RUN_ENV, "new").strip().lower()
    if auto not in ("new", "off"):
        raise ValueError(f"{AUTO_RUN_ENV}={auto!r}: use 'new' or 'off'")
    runs = (
        [
            RunRequest(
                partition_key=key,
                run_key=dataset_run_key(key),
                tags={"particleseg/requested_by": "eligible_partitions_sensor"},
            )
            for key in new_keys
        ]
        if auto == "new"
        else []
    )
    return SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[empiar_partitions.build_add_request(new_keys)]
        if new_keys
        else [],
        cursor=str(event.storage_id),
    )


@sensor(
    job=report_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="After each new segmentation_model version, requests the IoU report of "
    "every partition that has a corpus (run key iou-<version>-<id>).",
)
def model_reports_sensor(context: SensorEvaluationContext) -> SensorResult | SkipReason:
    records = context.instance.fetch_materializations(AssetKey("segmentation_model"), limit=1)
    event = records.records[0] if records.records else None
    if event is None:
        return SkipReason("segmentation_model has not been materialized yet")
    if context.cursor == str(event.storage_id):
        return SkipReason("no new model version")
    version = event.asset_materialization.metadata["version"].value
    keys = sorted(context.instance.get_materialized_partitions(AssetKey("particle_masks")))
    existing = set(context.instance.get_dynamic_partitions(EMPIAR_PARTITIONS_NAME))
    return SensorResult(
        run_requests=[
            RunRequest(partition_key=key, run_key=f"iou-{version}-{key}")
            for key in keys
            if key in existing
        ],
        cursor=str(event.storage_id),
    )
