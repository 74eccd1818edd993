"""The code location: ``dagster dev -w workspace.yaml`` or ``-m particleseg_assets.definitions``.

``PARTICLESEG_EXECUTOR`` (``multiprocess``, ``in_process``, ``dask``, ``celery``, ``k8s``;
unset: Dagster's default) picks the executor of every job: see ``particleseg_assets.executors``
and the run configs under ``deploy/``."""

from dagster import Definitions

from particleseg_assets.assets.catalog import eligible_entries, empiar_entries
from particleseg_assets.assets.cleaning import cleaned_particles
from particleseg_assets.assets.corpus import (
    mask_volume,
    particle_masks,
    particle_stacks,
    refined_particles,
)
from particleseg_assets.assets.model import iou_reports, segmentation_model
from particleseg_assets.checks import eligible_current, entry_ids_unique, few_catalog_errors
from particleseg_assets.executors import executor_from_env
from particleseg_assets.jobs import (
    catalog_job,
    clean_job,
    dataset_job,
    remove_dataset_job,
    report_job,
    train_job,
)
from particleseg_assets.resources import EmpiarResource, RelionResource, StorageResource
from particleseg_assets.schedules import daily_catalog_refresh
from particleseg_assets.sensors import (
    eligible_partitions_sensor,
    empiar_updates_sensor,
    model_reports_sensor,
)

defs = Definitions(
    assets=[
        empiar_entries,
        eligible_entries,
        particle_stacks,
        refined_particles,
        mask_volume,
        particle_masks,
        segmentation_model,
        iou_reports,
        cleaned_particles,
    ],
    asset_checks=[entry_ids_unique, few_catalog_errors, eligible_current],
    jobs=[catalog_job, dataset_job, train_job, report_job, clean_job, remove_dataset_job],
    schedules=[daily_catalog_refresh],
    sensors=[empiar_updates_sensor, eligible_partitions_sensor, model_reports_sensor],
    resources={
        "empiar": EmpiarResource(),
        "storage": StorageResource(),
        "relion": RelionResource(),
    },
    executor=executor_from_env(),
)
