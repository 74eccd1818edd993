"""Catalog refresh at scale: N synthetic entries served on loopback by the local EMPIAR server.

Prints, side by side in one process:
- the full refresh (paged search, 100 entries a page, then one EMDB lookup per map): entries/s;
- the reference, the original approach: one GET per entry, then one EMDB lookup per map;
- an incremental sensor tick with nothing new (one search query) and one with 3 new entries;
- an incremental catalog refresh after 3 new entries.

Loopback has no latency, which flatters the one-GET-per-entry reference; ``--latency-ms`` adds a
delay to every reply (a "slow" fault on every path) to model the public services, where each
request costs a round trip (tens of ms to EBI).

The catalog keeps every linked map's resolution (``emdb_resolutions``): the full refresh asks
the EMDB API once per distinct map. The figures go to ``--json`` (default
``docs/results/catalog_refresh.json``, or ``catalog_refresh_<N>ms.json`` with a latency).

    .venv/bin/python benchmarks/catalog_refresh.py [--entries 3000] [--latency-ms 30] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from dagster import DagsterInstance, build_sensor_context

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import RESULTS_DIR, write_results  # noqa: E402

from particleseg_assets.definitions import defs  # noqa: E402
from particleseg_assets.resources import EmpiarResource, StorageResource  # noqa: E402
from particleseg_assets.sensors import empiar_updates_sensor  # noqa: E402
from particleseg_model.access.catalog import UpdateCursor, refresh_catalog, write_parquet  # noqa: E402
from particleseg_model.access.empiar import EmdbClient, EmpiarClient, parse_entry  # noqa: E402
from particleseg_model.access.fixtures import emdb_record, fixture_records, write_synthetic_mirror  # noqa: E402
from particleseg_model.access.server import Fault, serve  # noqa: E402


def reference_refresh(empiar: EmpiarClient, emdb: EmdbClient, ids: list[str]) -> int:
    """The original approach: one GET per entry, then every map's resolution."""
    resolved = 0
    for empiar_id in ids:
        entry = parse_entry(empiar_id, empiar.entry_record(empiar_id))
        for emd in entry.emdb_ids:
            emdb.resolution_a(emd)
            resolved += 1
    return resolved


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=3000)
    parser.add_argument(
        "--reference-sample",
        type=int,
        default=500,
        help="entries fetched the original way (extrapolated to all)",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="delay added to every reply, to model a real network",
    )
    parser.add_argument("--map-workers", type=int, default=4, help="concurrent EMDB lookups")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where the figures go (default docs/results/catalog_refresh[_<N>ms].json)",
    )
    args = parser.parse_args()
    if args.json is None:
        suffix = f"_{args.latency_ms:g}ms" if args.latency_ms else ""
        args.json = RESULTS_DIR / f"catalog_refresh{suffix}.json"
    figures: dict = {}

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        built, build_s = timed(write_synthetic_mirror, tmp_path / "mirror", args.entries)
        print(f"mirror: {args.entries} synthetic entries written in {build_s:.1f} s")
        os.environ["DAGSTER_HOME"] = str(tmp_path / "home")
        (tmp_path / "home").mkdir()
        with serve(built.root) as server:
            if args.latency_ms:
                server.faults.append(Fault(".", "slow", delay_s=args.latency_ms / 1000, times=-1))
                print(f"every reply delayed by {args.latency_ms:g} ms")
            os.environ.update(server.env())
            options = {"polite_delay_s": 0.0}
            empiar = EmpiarClient(server.empiar_url, server.emdb_url, **options)
            emdb = EmdbClient(server.emdb_url, **options)

            refresh, full_s = timed(refresh_catalog, empiar, emdb, map_workers=args.map_workers)
            n = len(refresh.table)
            requests_full = len(server.requests)
            maps = sum(len(x.split(",")) for x in refresh.table["emdb_ids"] if x)
            kept = [json.loads(x) for x in refresh.table["emdb_resolutions"] if x]
            resolved = sum(1 for d in kept for v in d.values() if v is not None)
            print(
                f"full refresh: {n} entries, {maps} maps ({resolved} resolutions kept), "
                f"{requests_full} requests, {full_s:.2f} s = {n / full_s:.0f} entries/s"
            )
            figures["full"] = {
                "entries": n,
                "maps": maps,
                "map_resolutions_kept": resolved,
                "requests": requests_full,
                "wall_s": full_s,
                "entries_per_s": n / full_s,
            }

            sample = sorted(refresh.table["empiar_id"])[: args.reference_sample]
            before = len(server.requests)
            _, ref_s = timed(reference_refresh, empiar, emdb, sample)
            ref_requests = len(server.requests) - before
            ref_total = ref_s * n / len(sample)
            print(
                f"reference (one GET per entry, {len(sample)} sampled): "
                f"{len(sample) / ref_s:.0f} entries/s, {ref_total:.1f} s projected for {n}; "
                f"speed-up of the full refresh over the reference: {ref_total / full_s:.2f}x"
            )
            figures["reference"] = {
                "sampled": len(sample),
                "requests_sampled": ref_requests,
                "wall_s_sampled": ref_s,
                "entries_per_s": len(sample) / ref_s,
                "projected_s": ref_total,
                "speedup_full_over_reference": ref_total / full_s,
            }

            storage = StorageResource(root=str(tmp_path / "data"))
            write_parquet(refresh.table, storage.catalog_path())
            instance = DagsterInstance.get()
            resources = {"empiar": EmpiarResource(polite_delay_s=0.0), "storage": storage}
            cursor = UpdateCursor.from_catalog(refresh.table).to_json()
            ticks = []
            for _ in range(5):
                with build_sensor_context(
                    instance=instance, cursor=cursor, definitions=defs, resources=resources
                ) as context:
                    result, tick_s = timed(empiar_updates_sensor, context)
                ticks.append(tick_s)
            assert result.__class__.__name__ == "SkipReason", result
            print(
                f"sensor tick, nothing new: median {sorted(ticks)[2] * 1000:.0f} ms "
                f"over 5 ticks ({result.skip_message})"
            )
            figures["sensor_tick_nothing_new_ms"] = sorted(ticks)[2] * 1000

            template = fixture_records()["entries"]["EMPIAR-10028"]
            for i in range(3):
                record = dict(
                    template,
                    update_date="2026-11-20",
                    release_date="2026-11-20",
                    cross_references=[{"name": f"EMD-5999{i}"}],
                )
                built.put_entry(f"EMPIAR-{90000 + i}", record)
                built.put_emdb(f"EMD-5999{i}", emdb_record("2.5"))
            with build_sensor_context(
                instance=instance, cursor=cursor, definitions=defs, resources=resources
            ) as context:
                result, tick_s = timed(empiar_updates_sensor, context)
            print(
                f"sensor tick, 3 new entries: {tick_s * 1000:.0f} ms "
                f"({len(result.run_requests)} run requested)"
            )
            figures["sensor_tick_new"] = {
                "new_entries": 3,
                "ms": tick_s * 1000,
                "runs_requested": len(result.run_requests),
            }
            before = len(server.requests)
            incremental, inc_s = timed(
                refresh_catalog, empiar, emdb, refresh.table, map_workers=args.map_workers
            )
            figures["incremental"] = {
                "new": len(incremental.new_ids),
                "entries": len(incremental.table),
                "requests": len(server.requests) - before,
                "ms": inc_s * 1000,
                "full_over_incremental": full_s / inc_s,
            }
            print(
                f"incremental refresh after 3 new entries: {inc_s * 1000:.0f} ms, "
                f"{len(incremental.new_ids)} new, {len(incremental.table)} entries; "
                f"ratio full / incremental: {full_s / inc_s:.0f}x"
            )
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"written {write_results(args.json, 'catalog_refresh', arguments, figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
