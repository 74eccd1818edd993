"""Jobs runnable from the web UI and from ``dagster job execute``."""

from dagster import AssetSelection, define_asset_job

from particleseg_assets.assets.catalog import eligible_entries, empiar_entries

catalog_job = define_asset_job(
    "catalog_job",
    selection=AssetSelection.assets(empiar_entries, eligible_entries),
    description="Refresh the EMPIAR catalog (incrementally) and select the eligible entries.",
)
