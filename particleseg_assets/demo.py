"""``make demo``: the embedded default run, end to end on this machine.

Builds the simulated demo archive once (three EMPIAR-shaped entries with ground truth, see
:mod:`particleseg_model.demo_archive`; deterministic, so a later demo reuses it), adds the
embedded EMPIAR fixture catalog to the same mirror, serves it on a free loopback port, points the
clients at it, runs ``catalog_job`` with ``dagster job execute`` on the instance in
``$DAGSTER_HOME``, lets the partition sensor add one partition per eligible entry, and prints
the eligible entries and where everything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from dagster import (
    AddDynamicPartitionsRequest,
    AssetKey,
    DagsterInstance,
    SensorResult,
    build_sensor_context,
)

from particleseg_assets.definitions import defs
from particleseg_assets.partitions import EMPIAR_PARTITIONS_NAME
from particleseg_assets.resources import EmpiarResource, StorageResource
from particleseg_assets.sensors import eligible_partitions_sensor, empiar_updates_sensor
from particleseg_model.catalog import read_catalog
from particleseg_model.cli import print_eligible
from particleseg_model.corpus import open_corpus
from particleseg_model.demo_archive import write_demo_archive
from particleseg_model.fixtures import write_fixture_mirror
from particleseg_model.mirror import Mirror
from particleseg_model.server import serve


def apply_sensor(instance: DagsterInstance, result) -> None:
    """Do what the daemon does with a sensor's dynamic-partition requests."""
    if not isinstance(result, SensorResult):
        return
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)


DEMO_ENTRIES = ("EMPIAR-30001", "EMPIAR-30002", "EMPIAR-30003")
DATASET_DEMO_KEYS = ("30001", "30002")


def demo_mirror(mirror_dir: Path) -> tuple[Mirror, str]:
    """The simulated archive (built when missing, else reused) plus the fixture catalog."""
    if set(DEMO_ENTRIES) <= set(Mirror(mirror_dir).entry_ids()):
        how = "reused"
    else:
        if mirror_dir.exists() and not any(mirror_dir.iterdir()):
            mirror_dir.rmdir()
        begun = time.perf_counter()
        write_demo_archive(mirror_dir)
        how = f"simulated in {time.perf_counter() - begun:.1f} s"
    return write_fixture_mirror(mirror_dir), how


def main() -> int:
    if not os.environ.get("DAGSTER_HOME"):
        print("DAGSTER_HOME is not set: run through `make demo`", file=sys.stderr)
        return 2
    storage = StorageResource()
    mirror_dir = storage.path("demo", "archive")
    started = time.perf_counter()
    mirror, how = demo_mirror(mirror_dir)
    print(f"[1/5] demo mirror: {len(mirror.entry_ids())} EMPIAR entries in {mirror_dir} "
          f"({', '.join(DEMO_ENTRIES)} {how}, with ground truth and galleries; "
          f"the rest is the embedded catalog fixture)")

    with serve(mirror_dir) as server:
        env = {**os.environ, **server.env(), "PARTICLESEG_DATA": str(storage.base())}
        os.environ.update(server.env())
        print(f"[2/5] local EMPIAR/EMDB server at {server.url}")
        log_path = storage.path("demo", "catalog_job.log")
        command = [sys.executable, "-m", "dagster", "job", "execute",
                   "-m", "particleseg_assets.definitions", "-j", "catalog_job"]
        print(f"[3/5] {' '.join(command[2:])}  (log: {log_path})")
        with open(log_path, "w") as log:
            code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            print(Path(log_path).read_text()[-4000:], file=sys.stderr)
            print(f"catalog_job failed (exit {code}); log: {log_path}", file=sys.stderr)
            return code

        instance = DagsterInstance.get()
        resources = {"storage": storage, "empiar": EmpiarResource()}
        with build_sensor_context(instance=instance, resources=resources,
                                  definitions=defs) as context:
            result = eligible_partitions_sensor(context)
            apply_sensor(instance, result)
        requested = [r.partition_key for r in getattr(result, "run_requests", None) or []]
        with build_sensor_context(instance=instance, resources=resources,
                                  definitions=defs) as context:
            tick = empiar_updates_sensor(context)
        partitions = instance.get_dynamic_partitions(EMPIAR_PARTITIONS_NAME)
        print(f"[4/5] partition sensor: {len(partitions)} empiar_id partitions, "
              f"{len(requested)} dataset_job runs requested (run keys dataset-<id>; "
              f"{'this instance had them all already' if not requested else 'new partitions'})"
              f"; updates sensor: "
              f"{getattr(tick, 'skip_message', None) or 'new entries found'}")

        # The two simulated particle entries go into the corpus here (their poses are
        # deposited). The micrograph entry needs a RELION refinement (over an hour on two
        # cores) and the fixture entries are real EMPIAR ids whose files the demo mirror lacks:
        # their partitions exist, their runs are one command away (printed below).
        for key in DATASET_DEMO_KEYS:
            log_path = storage.path("demo", f"dataset_job_{key}.log")
            command = [sys.executable, "-m", "dagster", "job", "execute", "-m",
                       "particleseg_assets.definitions", "-j", "dataset_job", "--tags",
                       json.dumps({"dagster/partition": key})]
            print(f"[5/5] {' '.join(command[2:])}  (log: {log_path})")
            with open(log_path, "w") as log:
                code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            if code != 0:
                print(Path(log_path).read_text()[-4000:], file=sys.stderr)
                print(f"dataset_job for {key} failed (exit {code}); log: {log_path}",
                      file=sys.stderr)
                return code

    catalog = read_catalog(storage.catalog_path())
    eligible = read_catalog(storage.eligible_path())
    errors = catalog[catalog["error"].fillna("") != ""]
    print(f"\n{len(eligible)} eligible of {len(catalog)} EMPIAR entries "
          f"(best EMDB map better than 3.5 A, particles or coordinates deposited):\n")
    print_eligible(eligible)
    if len(errors):
        print(f"\n{len(errors)} entries carry an error (kept, not eligible):")
        for row in errors.itertuples(index=False):
            print(f"  {row.error}")
    last = instance.fetch_materializations(AssetKey("empiar_entries"), limit=1).records
    if last:
        reported = last[0].asset_materialization.metadata["error_list"].value
        print(f"\nproblems the last catalog run reported (the rest refreshed):\n{reported}")
    print("\ncorpus (labels from the projected mask at each particle's pose):")
    for key in DATASET_DEMO_KEYS:
        corpus = open_corpus(storage.path("corpus"), key)
        labels = corpus.labels[:]
        share = np.bincount(labels.ravel(), minlength=3) / labels.size
        splits = corpus.table["split"].value_counts().to_dict()
        print(f"  EMPIAR-{key}: {corpus.n_particles} particles at {corpus.box} px, "
              f"background/signal/edge {share[0]:.2f}/{share[1]:.2f}/{share[2]:.2f}, "
              f"splits {splits}\n    {corpus.location}\n    "
              f"{storage.path('particle_masks', key, 'particles_with_masks.png')}")
    print("\nany partition from the command line (30003, the micrograph entry, runs RELION "
          "extraction and\n3D auto-refine: over an hour on 2 cores), with the demo archive "
          "served in another shell by `make serve`:\n"
          "  eval \"$(make -s env)\"\n"
          "  .venv/bin/dagster job execute -m particleseg_assets.definitions -j dataset_job "
          "--tags '{\"dagster/partition\": \"30001\"}'")
    print(f"\ncatalog:   {storage.catalog_path()}\neligible:  {storage.eligible_path()}"
          f"\ninstance:  {os.environ['DAGSTER_HOME']} (see it with `make dev`)"
          f"\ndone in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
