"""The corpus checks are per partition (Dagster 1.13: ``AssetCheckSpec(partitions_def=...)``):
one partition's failure leaves the other's checks green, and the checks test what the label
step cannot see: the corpus against the catalog's announced count, the label shares against
the other partitions'."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetCheckKey, AssetKey, DagsterInstance, materialize

from particleseg_assets.assets.catalog import eligible_entries, empiar_entries
from particleseg_assets.assets.corpus import (
    mask_volume,
    particle_masks,
    particle_stacks,
    refined_particles,
)
from particleseg_assets.partitions import empiar_partitions
from particleseg_assets.resources import EmpiarResource, RelionResource, StorageResource
from particleseg_model.access.server import serve
from particleseg_model.simulation.demo_archive import write_demo_archive

ASSETS = [particle_stacks, refined_particles, mask_volume, particle_masks]
N = 32


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "archive"
    write_demo_archive(
        out,
        maps=["generated:globular", "generated:ring"],
        n_particles=N,
        box=48,
        micrograph_entries=0,
        seed=7,
        snr=2.0,
        progress=False,
    )
    return out


def latest_by_partition(instance: DagsterInstance, asset: str, check: str) -> dict[str, str]:
    """The latest evaluation of a check in each partition: partition -> status name."""
    key = AssetCheckKey(AssetKey(asset), check)
    out: dict[str, str] = {}
    for record in instance.event_log_storage.get_asset_check_execution_history(key, limit=50):
        # newest first: keep the first seen per partition
        out.setdefault(record.partition, record.status.value)
    return out


def test_checks_are_per_partition_and_test_what_the_producer_cannot(
    archive: Path, tmp_path: Path, monkeypatch
) -> None:
    for spec in (*refined_particles.check_specs, *particle_masks.check_specs):
        assert spec.partitions_def == empiar_partitions, spec.name
    storage = StorageResource(root=str(tmp_path / "data"))
    resources = {
        "empiar": EmpiarResource(retries=1),
        "storage": storage,
        "relion": RelionResource(),
    }
    instance = DagsterInstance.ephemeral()
    with serve(archive) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        assert materialize(
            [empiar_entries, eligible_entries], instance=instance, resources=resources
        ).success
        instance.add_dynamic_partitions("empiar_id", ["30001", "30002"])
        assert materialize(
            ASSETS, partition_key="30001", instance=instance, resources=resources
        ).success
        # 30002 labelled with a threshold above every projected value: no signal anywhere
        bad = materialize(
            ASSETS,
            partition_key="30002",
            instance=instance,
            resources=resources,
            run_config={"ops": {"particle_masks": {"config": {"threshold": 1e9}}}},
        )
    assert bad.success  # checks report, they do not fail the run
    masks = latest_by_partition(instance, "particle_masks", "masks_not_empty")
    assert masks == {"30001": "SUCCEEDED", "30002": "FAILED"}
    shares = latest_by_partition(instance, "particle_masks", "label_shares_like_the_others")
    assert shares == {"30001": "SUCCEEDED", "30002": "FAILED"}
    poses = latest_by_partition(instance, "refined_particles", "poses_for_every_particle")
    assert poses == {"30001": "SUCCEEDED", "30002": "SUCCEEDED"}
    complete = latest_by_partition(instance, "particle_masks", "corpus_complete")
    assert complete == {"30001": "SUCCEEDED", "30002": "SUCCEEDED"}
    evaluation = next(
        e
        for e in bad.get_asset_check_evaluations()
        if e.check_name == "label_shares_like_the_others"
    )
    assert evaluation.metadata["signal_share"].value == 0
    assert evaluation.metadata["other_partitions"].value == 1
    announced = (
        next(e for e in bad.get_asset_check_evaluations() if e.check_name == "corpus_complete")
        .metadata["announced_by_catalog"]
        .value
    )

    # the catalog now announces ten times the particles of 30001: its corpus is incomplete
    catalog_path = storage.catalog_path()
    catalog = pd.read_parquet(catalog_path)
    catalog.loc[catalog["partition_key"] == "30001", "particle_images"] = 10 * N
    catalog.to_parquet(catalog_path, index=False)
    with serve(archive) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        again = materialize(
            ASSETS,
            partition_key="30001",
            selection=[particle_masks],
            instance=instance,
            resources=resources,
        )
    complete = latest_by_partition(instance, "particle_masks", "corpus_complete")
    assert complete == {"30001": "FAILED", "30002": "SUCCEEDED"}
    metadata = next(
        e for e in again.get_asset_check_evaluations() if e.check_name == "corpus_complete"
    ).metadata
    assert metadata["announced_by_catalog"].value == 10 * N
    assert metadata["share_of_announced"].value == pytest.approx(
        metadata["particles_in_corpus"].value / (10 * N), abs=1e-4
    )
    assert announced == N  # as the simulated deposit announced it
