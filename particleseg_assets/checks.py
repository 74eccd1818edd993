"""Asset checks on the catalog."""

from __future__ import annotations

import pandas as pd
from dagster import AssetCheckResult, AssetCheckSeverity, AssetKey, DagsterInstance, asset_check

from particleseg_assets.assets.catalog import eligible_entries, empiar_entries
from particleseg_assets.resources import StorageResource
from particleseg_model.access.catalog import DEFAULT_MAX_RESOLUTION_A, read_catalog


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


def _eligibility_config(instance: DagsterInstance) -> tuple[float, bool]:
    event = instance.get_latest_materialization_event(AssetKey("eligible_entries"))
    metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
    limit = metadata.get("max_resolution_a")
    inclusive = metadata.get("inclusive")
    return (
        float(limit.value) if limit is not None else DEFAULT_MAX_RESOLUTION_A,
        bool(inclusive.value) if inclusive is not None else False,
    )


@asset_check(
    asset=eligible_entries,
    description="Every eligible entry meets the rule: not obsolete, map better than the "
    "limit, particles or coordinates deposited, one partition key each.",
)
def eligible_rule_holds(context, storage: StorageResource) -> AssetCheckResult:
    path = storage.eligible_path()
    if not path.exists():
        return AssetCheckResult(passed=False, metadata={"missing": str(path)})
    eligible = pd.read_parquet(path)
    limit, inclusive = _eligibility_config(context.instance)
    resolution = eligible["best_resolution_a"]
    too_coarse = resolution.isna() | ((resolution > limit) if inclusive else (resolution >= limit))
    bad = eligible[
        too_coarse
        | ~(eligible["ships_particles"] | eligible["ships_coordinates"])
        | eligible["status"].str.upper().str.startswith("OBS")
    ]
    duplicated = int(eligible["partition_key"].duplicated().sum())
    return AssetCheckResult(
        passed=bad.empty and duplicated == 0 and len(eligible) > 0,
        metadata={
            "eligible": len(eligible),
            "violations": len(bad),
            "duplicate_keys": duplicated,
            "max_resolution_a": limit,
            "best_resolution_a_max": float(resolution.max()) if len(eligible) else 0.0,
        },
    )
