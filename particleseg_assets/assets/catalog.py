"""Catalog assets: every EMPIAR entry (incrementally refreshed) and the entries worth using."""

import pandas as pd
from dagster import (
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from particleseg_assets.bridge import LaunchpadConfig
from particleseg_assets.resources import EmpiarResource, StorageResource
from particleseg_model.access.catalog import (
    DEFAULT_MAX_RESOLUTION_A,
    read_catalog,
    refresh_catalog,
    select_eligible,
    write_parquet,
)

PREVIEW_COLUMNS = [
    "empiar_id",
    "best_resolution_a",
    "best_emdb_id",
    "dataset_size_bytes",
    "ships_particles",
    "ships_coordinates",
    "title",
]


class CatalogConfig(LaunchpadConfig):
    full_refresh: bool = False
    """Ignore the stored catalog and fetch every entry again."""


class EligibilityConfig(LaunchpadConfig):
    max_resolution_a: float = DEFAULT_MAX_RESOLUTION_A
    """Best EMDB map must be better (lower) than this, in Angstrom."""
    inclusive: bool = False
    """Accept a map at exactly ``max_resolution_a`` (the original particleSeg list did)."""
    require_particles: bool = True
    """Require deposited particles or particle coordinates."""


def _markdown(frame: pd.DataFrame, limit: int = 60) -> str:
    shown = frame[PREVIEW_COLUMNS].head(limit).copy()
    shown["dataset_size_bytes"] = (shown["dataset_size_bytes"].astype("Float64") / 1e9).round(1)
    shown = shown.rename(columns={"dataset_size_bytes": "size_gb"})
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    for row in shown.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "/")[:70] for v in row) + " |")
    if len(frame) > limit:
        lines.append(f"\n... and {len(frame) - limit} more")
    return "\n".join(lines)


@asset(group_name="catalog", kinds={"parquet"})
def empiar_entries(
    context: AssetExecutionContext,
    config: CatalogConfig,
    empiar: EmpiarResource,
    storage: StorageResource,
) -> MaterializeResult:
    """Metadata of every EMPIAR entry, one row each, refreshed incrementally by update date.

    A bad entry payload or an unreadable EMDB resolution is reported and skipped; the rest of
    the catalog still refreshes and the entry's previous row is kept."""
    path = storage.catalog_path()
    previous = None if config.full_refresh else read_catalog(path)
    context.log.info(
        f"refreshing the EMPIAR catalog from {empiar.empiar().base_url} "
        f"({'full' if previous is None else f'{len(previous)} entries stored'})"
    )

    def progress(done: int, total: int) -> None:
        if done == total or done % 250 == 0:
            context.log.info(f"EMDB resolutions: {done}/{total}")

    refresh = refresh_catalog(empiar.empiar(), empiar.emdb(), previous, on_progress=progress)
    for error in refresh.errors:
        context.log.warning(error)
    write_parquet(refresh.table, path)
    context.log.info(
        f"{len(refresh.table)} entries ({len(refresh.new_ids)} new, "
        f"{len(refresh.updated_ids)} updated) in {refresh.seconds:.1f} s"
    )
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "entries": len(refresh.table),
            "new_entries": len(refresh.new_ids),
            "updated_entries": len(refresh.updated_ids),
            "since_update_date": refresh.since or "(full refresh)",
            "errors": len(refresh.errors),
            "error_list": MetadataValue.md("\n".join(f"- {e}" for e in refresh.errors) or "none"),
            "seconds": round(refresh.seconds, 2),
            "newest_update_date": str(refresh.table["update_date"].max())
            if len(refresh.table)
            else "",
        }
    )


@asset(group_name="catalog", kinds={"parquet"}, deps=[empiar_entries])
def eligible_entries(
    context: AssetExecutionContext, config: EligibilityConfig, storage: StorageResource
) -> MaterializeResult:
    """Entries worth using: not obsolete, best EMDB map better than 3.5 A (configurable),
    with particles or particle coordinates deposited."""
    catalog = read_catalog(storage.catalog_path())
    if catalog is None:
        raise FileNotFoundError(
            f"{storage.catalog_path()} does not exist: materialize empiar_entries first"
        )
    eligible = select_eligible(
        catalog,
        config.max_resolution_a,
        inclusive=config.inclusive,
        require_particles=config.require_particles,
    )
    path = write_parquet(eligible, storage.eligible_path())
    context.log.info(f"{len(eligible)} of {len(catalog)} entries are eligible")
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "eligible": len(eligible),
            "catalog_entries": len(catalog),
            "max_resolution_a": config.max_resolution_a,
            "inclusive": config.inclusive,
            "total_size_tb": round(float(eligible["dataset_size_bytes"].fillna(0).sum()) / 1e12, 2),
            "partition_keys": MetadataValue.json(eligible["partition_key"].tolist()),
            "preview": MetadataValue.md(_markdown(eligible)),
        }
    )
