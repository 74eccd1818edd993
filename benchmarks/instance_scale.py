"""The Dagster instance at 500 dynamic partitions: SQLite against PostgreSQL, side by side.

Each backend gets the same history: ``--partitions`` empiar_id partitions, one materialization
of each per-entry asset (particle_stacks, refined_particles, mask_volume, particle_masks) per
partition, recorded as runless asset events (the same rows a run writes), the catalog assets
and one model version. Then, timed on each (median of ``--repeat``, first call separately):

- sensor ticks: ``eligible_partitions_sensor`` with 3 new eligible entries (it lists every
  partition), the same sensor with nothing new, ``model_reports_sensor`` after a new model
  version (one run request per materialized partition);
- listing: the partition keys, the materialized partitions of particle_masks, the latest
  materialization of every partition;
- parallel writers: ``--writers`` processes recording materializations at once (as parallel
  runs do): events/s in all and the writes that failed (SQLite's "database is locked");
- the UI: dagster-webserver on loopback, timed through its GraphQL API with the queries of the
  asset page of particle_masks (definition and partition statuses, the events tab) and of the
  asset catalog (every asset with its partition counts).

PostgreSQL is a throwaway server from the Debian binaries on loopback (fsync off): a network
server adds round trips, a tuned one is faster at scale. Ratios are PostgreSQL / SQLite.

    .venv/bin/python benchmarks/instance_scale.py [--partitions 500] [--repeat 7] [--writers 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    build_sensor_context,
)

from particleseg_assets.definitions import defs
from particleseg_assets.jobs import DATASET_ASSETS
from particleseg_assets.postgres import local_postgres
from particleseg_assets.resources import StorageResource
from particleseg_assets.sensors import eligible_partitions_sensor, model_reports_sensor

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PER_ENTRY = [a.key.path[-1] for a in DATASET_ASSETS]

ASSET_PAGE = """
query AssetPage($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) { ... on AssetNode {
    id description opName groupName
    partitionKeysByDimension { name partitionKeys }
    partitionStats { numMaterialized numMaterializing numPartitions numFailed }
    assetPartitionStatuses { ... on DefaultPartitionStatuses {
      materializedPartitions failedPartitions unmaterializedPartitions materializingPartitions } }
    dependencyKeys { path } dependedByKeys { path } } }
}"""

ASSET_EVENTS = """
query AssetEvents($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) { ... on Asset {
    assetMaterializations(limit: 100) { runId partition timestamp
      metadataEntries { label } } } }
}"""

ASSET_CATALOG = """
query AssetCatalog {
  assetNodes { assetKey { path } groupName
    partitionStats { numMaterialized numPartitions numFailed } }
}"""


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(first call, median of the next ``repeat``) in milliseconds."""
    started = time.perf_counter()
    fn()
    first = (time.perf_counter() - started) * 1000
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return first, statistics.median(times)


def populate(instance: DagsterInstance, storage: StorageResource, keys: list[str]) -> float:
    """The history of ``keys`` fully built; returns events written per second."""
    started = time.perf_counter()
    instance.add_dynamic_partitions("empiar_id", keys)
    events = 0
    for asset in ("empiar_entries", "eligible_entries"):
        instance.report_runless_asset_event(AssetMaterialization(asset, metadata={"rows": 500}))
        events += 1
    for key in keys:
        for asset in PER_ENTRY:
            instance.report_runless_asset_event(
                AssetMaterialization(asset, partition=key, metadata={"particles": 1000, "box": 128})
            )
            events += 1
    instance.report_runless_asset_event(
        AssetMaterialization("segmentation_model", metadata={"version": "v0001"})
    )
    events += 1
    # the eligible table the partition sensor reads: every partition plus 3 new entries
    eligible = storage.eligible_path()
    Path(eligible).parent.mkdir(parents=True, exist_ok=True)
    new = [str(int(keys[-1]) + i) for i in (1, 2, 3)]
    pd.DataFrame({"partition_key": keys + new}).to_parquet(eligible)
    return events / (time.perf_counter() - started)


def _writer(args: tuple[dict[str, str], int, int, float]) -> tuple[int, int, str, float, bool]:
    """One process recording ``count`` materializations from wall-clock time ``start_at`` on
    (so that process start-up is not timed): (written, failed, first error, end time, whether
    it was ready before the start)."""
    env, first_key, count, start_at = args
    os.environ.update(env)
    written, failed, error = 0, 0, ""
    with DagsterInstance.get() as instance:
        instance.get_dynamic_partitions("empiar_id")  # connected before the start
        ready = time.time() < start_at
        time.sleep(max(0.0, start_at - time.time()))
        for i in range(count):
            try:
                instance.report_runless_asset_event(
                    AssetMaterialization(
                        "iou_reports", partition=str(first_key + i), metadata={"mean_iou": 0.6}
                    )
                )
                written += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported, not hidden
                failed += 1
                error = error or f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return written, failed, error, time.time(), ready


def parallel_writes(env: dict[str, str], writers: int, keys: list[str]) -> tuple[float, int, str]:
    """``writers`` processes writing one event per partition each, all starting at the same
    moment: (events/s in all, failed writes, the first error)."""
    share = len(keys) // writers
    start_at = time.time() + 8 + 4 * writers  # time for every process to start and connect
    jobs = [(env, int(keys[0]) + w * share, share, start_at) for w in range(writers)]
    with multiprocessing.get_context("spawn").Pool(writers) as pool:
        results = pool.map(_writer, jobs)
    if not all(r[4] for r in results):
        print("  (a writer started late: the rate below is a lower bound)")
    written = sum(r[0] for r in results)
    errors = [r[2] for r in results if r[2]]
    seconds = max(r[3] for r in results) - start_at
    return written / seconds, sum(r[1] for r in results), errors[0] if errors else ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    if "errors" in answer:
        raise RuntimeError(answer["errors"])
    return answer["data"]


def measure(label: str, env: dict[str, str], data: Path, n: int, repeat: int, writers: int) -> dict:
    os.environ.update(env)
    keys = [str(20000 + i) for i in range(n)]
    storage = StorageResource(root=str(data))
    figures: dict[str, tuple[float, float]] = {}
    with DagsterInstance.get() as instance:
        rate = populate(instance, storage, keys)
        print(
            f"{label}: history of {n} partitions written at {rate:.0f} events/s by one process",
            flush=True,
        )
    together, failed, error = parallel_writes(env, writers, keys)
    print(
        f"{label}: {writers} writers at once: {together:.0f} events/s in all, {failed} writes "
        f"failed{': ' + error if error else ''}",
        flush=True,
    )
    with DagsterInstance.get() as instance:

        def partition_tick() -> None:
            result = eligible_partitions_sensor(
                build_sensor_context(
                    instance=instance, resources={"storage": storage}, definitions=defs
                )
            )
            assert len(result.run_requests) == 3, result

        latest = instance.fetch_materializations(AssetKey("eligible_entries"), limit=1)
        cursor = str(latest.records[0].storage_id)

        def idle_tick() -> None:
            result = eligible_partitions_sensor(
                build_sensor_context(
                    instance=instance,
                    resources={"storage": storage},
                    cursor=cursor,
                    definitions=defs,
                )
            )
            assert not hasattr(result, "run_requests") or not result.run_requests

        def report_tick() -> None:
            result = model_reports_sensor(build_sensor_context(instance=instance, definitions=defs))
            assert len(result.run_requests) == n, len(result.run_requests)

        figures["sensor tick: 3 new entries"] = timed(partition_tick, repeat)
        figures["sensor tick: nothing new"] = timed(idle_tick, repeat)
        figures["sensor tick: new model, n reports"] = timed(report_tick, repeat)
        figures["list partition keys"] = timed(
            lambda: instance.get_dynamic_partitions("empiar_id"), repeat
        )
        figures["materialized partitions"] = timed(
            lambda: instance.get_materialized_partitions(AssetKey("particle_masks")), repeat
        )
        figures["latest event per partition"] = timed(
            lambda: (
                instance.get_latest_materialization_event(AssetKey("particle_masks"))
                and instance.fetch_materializations(AssetKey("particle_masks"), limit=n)
            ),
            repeat,
        )

    port = _free_port()
    log = data / f"webserver-{label}.log"
    with open(log, "wb") as handle:
        web = subprocess.Popen(
            [
                str(BIN / "dagster-webserver"),
                "-m",
                "particleseg_assets.definitions",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=REPO,
            env=os.environ.copy(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                graphql(port, "{ version }")
                break
            except OSError:
                if web.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text()[-3000:]) from None
                time.sleep(0.5)
        key = {"path": ["particle_masks"]}
        page = graphql(port, ASSET_PAGE, {"key": key})["assetNodeOrError"]
        assert page["partitionStats"]["numMaterialized"] == n, page["partitionStats"]
        figures["UI asset page: definition + partitions"] = timed(
            lambda: graphql(port, ASSET_PAGE, {"key": key}), repeat
        )
        figures["UI asset page: events tab (100)"] = timed(
            lambda: graphql(port, ASSET_EVENTS, {"key": key}), repeat
        )
        figures["UI asset catalog"] = timed(lambda: graphql(port, ASSET_CATALOG), repeat)
    finally:
        web.terminate()
        web.wait(timeout=30)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--writers", type=int, default=4, help="parallel writer processes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="instance-scale-"))
    base_env = {k: v for k, v in os.environ.items()}
    try:
        sqlite_home = work / "sqlite" / "home"
        sqlite_home.mkdir(parents=True)
        shutil.copy(REPO / "dagster_home" / "dagster.yaml", sqlite_home)
        sqlite = measure(
            "SQLite",
            {"DAGSTER_HOME": str(sqlite_home)},
            work / "sqlite",
            args.partitions,
            args.repeat,
            args.writers,
        )
        os.environ.clear()
        os.environ.update(base_env)
        with local_postgres(work / "pg" / "server") as server:
            server.create_database("dagster")
            pg_home = work / "pg" / "home"
            pg_home.mkdir(parents=True)
            shutil.copy(REPO / "dagster_home" / "postgres" / "dagster.yaml", pg_home)
            postgres = measure(
                "PostgreSQL",
                {"DAGSTER_HOME": str(pg_home), **server.env("dagster")},
                work / "pg",
                args.partitions,
                args.repeat,
                args.writers,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{args.partitions} dynamic partitions, milliseconds: first call / median of "
        f"{args.repeat} (PostgreSQL / SQLite on the median)"
    )
    print(f"{'':42s} {'SQLite':>17s} {'PostgreSQL':>17s} {'ratio':>7s}")
    for name, (first, median) in sqlite.items():
        pg_first, pg_median = postgres[name]
        print(
            f"{name.replace('n reports', f'{args.partitions} reports'):42s} "
            f"{first:8.1f} /{median:7.1f} {pg_first:8.1f} /{pg_median:7.1f} "
            f"{pg_median / median:6.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
