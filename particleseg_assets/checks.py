"""Asset checks on the catalog."""

from __future__ import annotations

import pandas as pd
from dagster import AssetCheckResult, AssetCheckSeverity, asset_check

from particleseg_assets.assets.catalog import eligible_entries, empiar_entries
from particleseg_assets.resources import StorageResource
from particleseg_model.access.catalog import read_catalog


@asset_check(asset=empiar_entries, description="Every EMPIAR id appears once.")
def entry_ids_unique(storage: StorageResource) -> AssetCheckResult:
    catalog = read_catalog(storage.catalog_path())
    duplicates = (
        []
        if catalog is None
        else sorted(catalog.loc[catalog["empiar_id"].duplicated(), "empiar_id"].unique())
    )
    return AssetCheckResult(
        passed=catalog is not None and not duplicates,
        metadata={"duplicates": len(duplicates), "first": ", ".join(duplicates[:10])},
    )


@asset_check(
    asset=empiar_entries,
    description="Fewer than 5% of the entries carry an error (bad payload or map).",
)
def few_catalog_errors(storage: StorageResource) -> AssetCheckResult:
    catalog = read_catalog(storage.catalog_path())
    total = 0 if catalog is None else len(catalog)
    errors = 0 if catalog is None else int((catalog["error"].fillna("") != "").sum())
    return AssetCheckResult(
        passed=total > 0 and errors < 0.05 * total,
        severity=AssetCheckSeverity.WARN,
        metadata={"entries": total, "entries_with_errors": errors},
    )


@asset_check(
    asset=eligible_entries,
    description="The eligible table is current with the catalog: every eligible entry is in "
    "the stored catalog, not obsolete there, with the update date it was selected at (a "
    "catalog refreshed without re-selecting fails), and each has one partition key.",
)
def eligible_current(storage: StorageResource) -> AssetCheckResult:
    path = storage.eligible_path()
    catalog = read_catalog(storage.catalog_path())
    if not path.exists() or catalog is None:
        missing = path if not path.exists() else storage.catalog_path()
        return AssetCheckResult(passed=False, metadata={"missing": str(missing)})
    eligible = pd.read_parquet(path, columns=["empiar_id", "update_date", "partition_key"])
    now = catalog.set_index("empiar_id")
    ids = eligible["empiar_id"].astype(str)
    absent = sorted(set(ids) - set(now.index.astype(str)))
    present = eligible[ids.isin(now.index)]
    changed = sorted(
        present.loc[
            present["update_date"].astype(str).to_numpy()
            != now.loc[present["empiar_id"], "update_date"].astype(str).to_numpy(),
            "empiar_id",
        ]
    )
    status = now.loc[present["empiar_id"], "status"].fillna("").str.upper()
    obsolete = sorted(present.loc[status.str.startswith("OBS").to_numpy(), "empiar_id"])
    duplicated = int(eligible["partition_key"].duplicated().sum())
    stale = absent + changed + obsolete
    return AssetCheckResult(
        passed=not stale and duplicated == 0 and len(eligible) > 0,
        metadata={
            "eligible": len(eligible),
            "not_in_catalog": len(absent),
            "updated_since_selection": len(changed),
            "obsolete_now": len(obsolete),
            "duplicate_keys": duplicated,
            "first": ", ".join(stale[:10]) or "none",
        },
    )
