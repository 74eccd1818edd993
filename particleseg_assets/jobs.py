"""Jobs runnable from the web UI and from ``dagster job execute``."""

from dagster import AssetSelection, define_asset_job

from particleseg_assets.assets.catalog import eligible_entries, empiar_entries
from particleseg_assets.assets.corpus import (
    label_corpus,
    mask_volume,
    particle_stacks,
    refined_particles,
)
from particleseg_assets.partitions import empiar_partitions

catalog_job = define_asset_job(
    "catalog_job",
    selection=AssetSelection.assets(empiar_entries, eligible_entries),
    description="Refresh the EMPIAR catalog (incrementally) and select the eligible entries.",
)

corpus_job = define_asset_job(
    "corpus_job",
    selection=AssetSelection.assets(particle_stacks, refined_particles, mask_volume, label_corpus),
    partitions_def=empiar_partitions,
    description="One EMPIAR entry into the corpus: stacks, poses, mask, labels (Zarr). Run it "
                "with --tags '{\"dagster/partition\": \"10028\"}'.",
)
