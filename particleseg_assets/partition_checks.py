"""Checks of one ``empiar_id`` partition against what its producer cannot see.

The label step writes a partition and checks its own rows as it commits (``CorpusWriter``); a
check of those rows again cannot fail. These look outside the step:

- :func:`corpus_complete`: the corpus group, read back from storage, against the particle
  count the EMPIAR catalog announces for the entry (a deposit the fetch or the label step
  only partly took shows here), and the Zarr group against its Parquet table.
- :func:`label_shares_like_the_others`: this partition's background / signal / edge shares
  against the other partitions' (a mask threshold or a pixel size gone wrong for one entry
  makes its shares unlike every other's, while each partition alone looks plausible).

Both are per partition (their specs carry the partitions definition), so one partition's
failure never turns another's red. Both judge the *particles*: a partition's negatives (boxes
from micrograph regions far from every pick, all background by construction, marked
``negative`` in its table) are neither announced by the catalog nor part of the label shares;
they are counted apart in the checks' metadata.
"""

from __future__ import annotations

import statistics

import pandas as pd
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec

from particleseg_assets.partitions import empiar_partitions
from particleseg_assets.resources import StorageResource
from particleseg_model.access.catalog import read_catalog
from particleseg_model.corpus.manifests import LabelsManifest

__all__ = [
    "COMPLETE_SHARE",
    "SHARE_FACTOR",
    "corpus_complete",
    "label_shares_like_the_others",
    "partition_check",
]

COMPLETE_SHARE = 0.95
"""A partition is complete with at least this share of the particles the catalog announces
(a few unreadable images are dropped and counted)."""
SHARE_FACTOR = 3.0
"""A partition's signal share, and its edge-to-signal ratio, must lie within this factor of the
median of the other partitions'."""


def partition_check(name: str, asset: str, description: str) -> AssetCheckSpec:
    """The spec of a check evaluated per ``empiar_id`` partition."""
    return AssetCheckSpec(
        name, asset=asset, description=description, partitions_def=empiar_partitions
    )


def corpus_complete(
    storage: StorageResource, key: str, labels: LabelsManifest, name: str = "corpus_complete"
) -> AssetCheckResult:
    """The partition read back from the corpus: as many particles as the catalog announces
    (at least :data:`COMPLETE_SHARE`; negatives not counted), and its Zarr rows equal to its
    Parquet rows (negatives included)."""
    from particleseg_model.corpus.store import open_corpus

    corpus = open_corpus(storage.corpus_root(), key)
    rows, table = int(corpus.n_particles), len(corpus.table)
    negatives = corpus.n_negatives
    stored = rows - negatives
    catalog = read_catalog(storage.catalog_path())
    announced = None
    if catalog is not None:
        row = catalog.loc[catalog["partition_key"].astype(str) == key, "particle_images"]
        if len(row) and not pd.isna(row.iloc[0]) and int(row.iloc[0]) > 0:
            announced = int(row.iloc[0])
    share = stored / announced if announced else None
    passed = rows == table and stored > 0 and (share is None or share >= COMPLETE_SHARE)
    return AssetCheckResult(
        check_name=name,
        passed=passed,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "particles_in_corpus": stored,
            "negatives_in_corpus": negatives,
            "zarr_rows": rows,
            "parquet_rows": table,
            "announced_by_catalog": announced if announced is not None else "not given",
            "share_of_announced": round(share, 4) if share is not None else "n/a",
            "skipped_unreadable": labels.skipped,
        },
    )


def label_shares_like_the_others(
    storage: StorageResource,
    key: str,
    labels: LabelsManifest,
    others: list[str],
    name: str = "label_shares_like_the_others",
) -> AssetCheckResult:
    """This partition's signal share and edge/signal ratio within :data:`SHARE_FACTOR` of the
    median of the other labelled partitions' (their ``particle_masks`` manifests, whose label
    shares are over the particles' pixels only: a partition's negatives dilute none of them);
    passed with a note when there is no other partition yet."""
    mine = tuple(float(v) for v in labels.label_fractions)
    shares = []
    for other in others:
        if other == key:
            continue
        folder = storage.path("particle_masks", other)
        if not (folder / "manifest.json").exists():
            continue
        shares.append(
            tuple(float(v) for v in LabelsManifest.read(folder, "particle_masks").label_fractions)
        )
    metadata = {
        "background_signal_edge": [round(v, 4) for v in mine],
        "particles": labels.n_particles,
        "negatives_not_counted": labels.n_negatives,
        "other_partitions": len(shares),
    }
    if not shares:
        return AssetCheckResult(
            check_name=name,
            passed=True,
            severity=AssetCheckSeverity.WARN,
            metadata={**metadata, "note": "no other labelled partition to compare with"},
        )
    signal = statistics.median(s[1] for s in shares)
    ratio = statistics.median(s[2] / s[1] for s in shares if s[1] > 0) if signal > 0 else 0.0
    my_ratio = mine[2] / mine[1] if mine[1] > 0 else float("inf")

    def within(value: float, median: float) -> bool:
        return median > 0 and median / SHARE_FACTOR <= value <= median * SHARE_FACTOR

    passed = within(mine[1], signal) and within(my_ratio, ratio)
    return AssetCheckResult(
        check_name=name,
        passed=passed,
        severity=AssetCheckSeverity.WARN,
        metadata={
            **metadata,
            "signal_share": round(mine[1], 4),
            "others_median_signal_share": round(signal, 4),
            "edge_to_signal": round(my_ratio, 4),
            "others_median_edge_to_signal": round(ratio, 4),
        },
    )
