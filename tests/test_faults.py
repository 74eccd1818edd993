"""Faults: a run killed (SIGKILL, as the OOM killer or a lost node does) in each heavy step,
a catalog refresh while the API fails for some entries, a sensor tick while the API is down.

Each kill test hashes every stored file first, kills a real ``dagster`` CLI run once the step
is in flight, then checks that no byte of the previous versions changed, that what the killed
run left is invisible to the readers (manifests, ``open_corpus``, the model registry), that
Dagster's latest materialization is still the previous one, and that running again completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    DagsterRunStatus,
    RunsFilter,
    SensorResult,
    SkipReason,
)
from helpers import N_PARTICLES, REPO, run_catalog, sensor_tick

from particleseg_assets.assets.corpus import read_manifest
from particleseg_assets.sensors import empiar_updates_sensor
from particleseg_model.access.fixtures import fixture_records
from particleseg_model.access.server import ArchiveServer, Fault, serve
from particleseg_model.corpus.store import open_corpus
from particleseg_model.em.star import read_star
from particleseg_model.model.registry import list_models, load_model, resolve_model

pytestmark = pytest.mark.slow

TARGET = ["-m", "particleseg_assets.definitions"]


@dataclass
class Platform:
    data: Path
    archive: Path
    work: Path
    server: ArchiveServer
    env: dict[str, str]


@pytest.fixture(scope="module")
def platform(
    particle_archive: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Platform]:
    """One deployment for the kill tests: a DAGSTER_HOME, a storage root, the loopback
    archive, and a first good dataset_job run of 30001 (the version the kills must keep)."""
    import shutil

    work = tmp_path_factory.mktemp("faults")
    home = work / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    data = work / "data"
    with pytest.MonkeyPatch.context() as patch, serve(particle_archive) as server:
        patch.setenv("DAGSTER_HOME", str(home))
        patch.setenv("PARTICLESEG_DATA", str(data))
        for name, value in server.env().items():
            patch.setenv(name, value)
        DagsterInstance.get().add_dynamic_partitions("empiar_id", ["30001", "30002"])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        _ok(
            _dagster(
                "job",
                "execute",
                *TARGET,
                "-j",
                "dataset_job",
                "--tags",
                json.dumps({"dagster/partition": "30001"}),
                env=env,
            )
        )
        yield Platform(data, particle_archive, work, server, env)


def _dagster(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dagster", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _config(platform: Platform, name: str, op: str, config: dict) -> str:
    path = platform.work / f"{name}.json"
    path.write_text(json.dumps({"ops": {op: {"config": config}}}))
    return str(path)


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _unchanged(before: dict[str, str], root: Path) -> dict[str, str]:
    """Asserts every file of ``before`` is still there, byte for byte; returns the new hashes."""
    after = _hashes(root)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"files of the previous version changed or vanished: {changed[:10]}"
    return after


def _kill_when(
    platform: Platform,
    args: list[str],
    ready: Callable[[], bool],
    what: str,
    timeout_s: float = 180,
) -> None:
    """Start ``dagster *args`` in its own session, SIGKILL the whole group once ``ready()``."""
    log = platform.work / f"killed-{time.monotonic_ns()}.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dagster", *args],
            cwd=REPO,
            env=platform.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no sign of {what} in {timeout_s} s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _fail_the_killed_run() -> str:
    """What terminating the dead run in the UI and then the daemon's run monitoring
    (dagster.yaml: ``free_slots_after_run_end_seconds``) do to a run whose process was killed
    (it cannot report its end itself): mark it failed and give its pool slot back (``relion``
    and ``train`` hold one slot each; without this the next run of the step waits for it
    forever; ``tests/test_postgres.py`` runs the daemon's part for real)."""
    instance = DagsterInstance.get()
    (killed,) = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    instance.report_run_failed(killed, "the run process was killed (SIGKILL)")
    instance.event_log_storage.free_concurrency_slots_for_run(killed.run_id)
    assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.FAILURE
    return killed.run_id


def _latest(asset: str, partition: str | None = None):
    instance = DagsterInstance.get()
    records = instance.fetch_materializations(
        AssetKey(asset)
        if partition is None
        else AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]),
        limit=1,
    )
    assert records.records, f"{asset} {partition or ''} was never materialized"
    return records.records[0].event_log_entry


def _processes_mentioning(text: str) -> list[int]:
    """Processes (ours: the tests started them) whose command line contains ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


# ------------------------------------------------------------------------------ download


def test_a_run_killed_while_downloading_leaves_no_partial_file(platform: Platform):
    data, server = platform.data, platform.server
    before = _hashes(data)
    stack = "data/Particles/particles_001.mrcs"
    source = platform.archive / "archive" / "30002" / stack
    target = data / "downloads" / "30002" / stack
    part = target.with_name(target.name + ".part")
    # the stack trickles at 100 kB/s: the kill lands while it is in flight
    server.faults.append(Fault(r"/30002/.*\.mrcs$", "slow", bytes_per_s=100_000, times=-1))
    try:
        _kill_when(
            platform,
            [
                "asset",
                "materialize",
                *TARGET,
                "--select",
                "particle_stacks",
                "--partition",
                "30002",
            ],
            part.exists,
            "the stack download",
        )
    finally:
        server.faults.clear()
    _fail_the_killed_run()

    after = _unchanged(before, data)
    new = sorted(set(after) - set(before))
    assert f"downloads/30002/{stack}.part" in new and not target.exists()
    for name in new:  # every other new file is a complete copy, never a torn one
        assert name.startswith("downloads/30002/"), name
        if not name.endswith(".part"):
            original = platform.archive / "archive" / "30002" / name.split("/", 2)[2]
            assert after[name] == hashlib.sha256(original.read_bytes()).hexdigest(), name
    with pytest.raises(FileNotFoundError, match="materialize particle_stacks"):
        read_manifest(data / "particle_stacks" / "30002", "particle_stacks")
    instance = DagsterInstance.get()
    assert instance.get_materialized_partitions(AssetKey("particle_stacks")) == {"30001"}

    seen = len(server.requests)
    _ok(
        _dagster(
            "job",
            "execute",
            *TARGET,
            "-j",
            "dataset_job",
            "--tags",
            json.dumps({"dagster/partition": "30002"}),
            env=platform.env,
        )
    )
    assert ("GET", f"/empiar/world_availability/30002/{stack}", 200) in server.requests[seen:]
    assert target.read_bytes() == source.read_bytes()
    assert not list((data / "downloads").rglob("*.part"))
    assert open_corpus(data / "corpus", "30002").n_particles == N_PARTICLES
    assert instance.get_materialized_partitions(AssetKey("particle_masks")) == {"30001", "30002"}


# ------------------------------------------------------------------------------ masks


def test_a_run_killed_in_particle_masks_leaves_the_last_corpus(platform: Platform):
    data = platform.data
    corpus = data / "corpus"
    before = open_corpus(corpus, "30001")
    before_created = before.attrs["created"]
    before_files = _hashes(corpus / "30001.zarr")
    latest_before = _latest("particle_masks", "30001").run_id

    # a slow re-labelling (one particle per batch), killed once its temporary version exists
    config = _config(platform, "relabel", "particle_masks", {"batch": 1, "threshold": 5.0})
    select = [
        "asset",
        "materialize",
        *TARGET,
        "--select",
        "particle_masks",
        "--partition",
        "30001",
        "--config",
        config,
    ]
    _kill_when(
        platform,
        select,
        lambda: any(p.name.startswith("30001.zarr.tmp-") for p in corpus.iterdir()),
        "a temporary corpus version",
    )
    _fail_the_killed_run()

    # the half-written version is invisible; the last good one is intact, byte for byte
    _unchanged(before_files, corpus / "30001.zarr")
    after_kill = open_corpus(corpus, "30001")
    assert after_kill.attrs["created"] == before_created
    assert after_kill.n_particles == N_PARTICLES and after_kill.attrs["threshold"] == 10.0
    latest = _latest("particle_masks", "30001")
    assert latest.run_id == latest_before
    assert latest.asset_materialization.metadata["threshold"].value == 10.0

    _ok(_dagster(*select, env=platform.env))
    rebuilt = open_corpus(corpus, "30001")
    assert rebuilt.attrs["threshold"] == 5.0 and rebuilt.n_particles == N_PARTICLES
    assert not [p for p in corpus.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert (
        _latest("particle_masks", "30001").asset_materialization.metadata["threshold"].value == 5.0
    )


# ------------------------------------------------------------------------------ train


TINY = {
    "size": 32,
    "base_filters": 8,
    "batch_size": 16,
    "optimizer": "adam",
    "partitions": ["30001"],
}


def test_a_run_killed_in_training_keeps_the_registered_model(platform: Platform):
    models = platform.data / "models"
    select = ["asset", "materialize", *TARGET, "--select", "segmentation_model", "--config"]
    quick = _config(
        platform, "train-quick", "segmentation_model", {**TINY, "epochs": 1, "patience": 1}
    )
    _ok(_dagster(*select, quick, env=platform.env))
    assert resolve_model(models_root=models).version == "v0001"
    before = _hashes(models / "v0001")

    # a long training, killed in its first epoch (Keras' CSV log opens when fit begins)
    long = _config(
        platform, "train-long", "segmentation_model", {**TINY, "epochs": 500, "patience": 500}
    )
    _kill_when(
        platform,
        [*select, long],
        lambda: any(models.glob(".staging-*/history.csv")),
        "an epoch in progress",
    )
    _fail_the_killed_run()
    (staged,) = models.glob(".staging-*")  # the killed run's, mid-training: no model yet
    assert (staged / "history.csv").exists() and not (staged / "model.keras").exists()
    assert (models / "LATEST").read_text().strip() == "v0001"
    assert [v.version for v in list_models(models)] == ["v0001"]
    latest = resolve_model(models_root=models)
    assert latest.version == "v0001" and load_model(latest).input_shape[1:3] == (32, 32)
    assert _hashes(models / "v0001") == before
    event = _latest("segmentation_model")
    assert event.asset_materialization.metadata["version"].value == "v0001"

    _ok(_dagster(*select, quick, env=platform.env))
    assert [v.version for v in list_models(models)] == ["v0001", "v0002"]
    assert resolve_model(models_root=models).version == "v0002"
    assert load_model(resolve_model(models_root=models)).input_shape[1:3] == (32, 32)
    assert _hashes(models / "v0001") == before
    assert _latest("segmentation_model").asset_materialization.metadata["version"].value == "v0002"


# ------------------------------------------------------------------------------ refine


def test_a_run_killed_in_relion_refine_keeps_the_last_poses(platform: Platform, relion_bin):
    data = platform.data
    out = data / "refined_particles" / "30001"
    config = _config(
        platform,
        "refine",
        "refined_particles",
        {"source": "refine", "max_iterations": 1, "max_particles": 24},
    )
    select = [
        "asset",
        "materialize",
        *TARGET,
        "--select",
        "refined_particles",
        "--partition",
        "30001",
        "--config",
        config,
    ]
    _ok(_dagster(*select, env=platform.env))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "refine"
    first_run = _latest("refined_particles", "30001").run_id
    before = _hashes(data)

    started = time.time()

    def relion_is_iterating() -> bool:  # RELION has written its first iteration files
        return any(p.stat().st_mtime >= started for p in out.rglob("run_it000_data.star"))

    try:
        _kill_when(platform, select, relion_is_iterating, "relion_refine running")
        # RELION runs in a session of its own: it must die with the killed run, not write on
        deadline = time.monotonic() + 20
        while _processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _processes_mentioning(str(out)), "RELION outlived the killed run"
    finally:
        for pid in _processes_mentioning(str(out)):
            os.kill(pid, signal.SIGKILL)
    _fail_the_killed_run()

    _unchanged(before, data)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    poses = read_star(manifest["particles_star"]).particles
    assert len(poses) == 24 and poses[["rot_deg", "tilt_deg", "psi_deg"]].notna().all().all()
    assert _latest("refined_particles", "30001").run_id == first_run

    _ok(_dagster(*select, env=platform.env))
    again = json.loads((out / "manifest.json").read_text())
    assert again["particles_star"] != manifest["particles_star"]
    assert len(read_star(again["particles_star"]).particles) == 24
    # the killed run's folder and the previous version's are gone; only the new one is left
    assert [p.name for p in out.iterdir() if p.is_dir()] == [
        Path(again["particles_star"]).parent.name
    ]
    assert _latest("refined_particles", "30001").run_id != first_run


# ------------------------------------------------------------------------------ catalog


def test_catalog_refresh_with_failing_entries_keeps_the_others(server_env, dagster_home, tmp_path):
    """EMDB answers 500 for the maps of two updated entries and one new entry: the refresh
    succeeds, names them, keeps the failing entries' previous rows, takes the others' updates,
    and the next refresh (API healthy) picks the failing ones up although newer entries moved
    the catalog's update-date watermark past them."""
    instance = DagsterInstance.get()
    mirror = server_env.mirror
    assert run_catalog(instance, tmp_path).success
    catalog_path = tmp_path / "data" / "catalog" / "empiar_entries.parquet"
    first = pd.read_parquet(catalog_path).set_index("empiar_id")
    records = fixture_records()["entries"]
    updates = {
        "EMPIAR-10028": "2026-11-05",  # healthy: its map answers
        "EMPIAR-10005": "2026-11-03",  # EMD-5778 fails
        "EMPIAR-10059": "2026-11-04",
    }  # EMD-8117 fails
    for key, date in updates.items():
        mirror.put_entry(
            key, dict(records[key], update_date=date, title=records[key]["title"] + " (revised)")
        )
    mirror.put_entry(
        "EMPIAR-12001", dict(records["EMPIAR-10126"], update_date="2026-11-02", title="a new entry")
    )  # EMD-7132 fails
    server_env.faults.append(Fault(r"EMD-(5778|8117|7132)$", "status", status=500, times=-1))

    result = run_catalog(instance, tmp_path)
    assert result.success
    metadata = result.asset_materializations_for_node("empiar_entries")[0].metadata
    problems = metadata["error_list"].value
    for key in ("EMPIAR-10005", "EMPIAR-10059", "EMPIAR-12001"):
        assert key in problems and "500" in problems, problems
    assert "EMPIAR-10028" not in problems
    table = pd.read_parquet(catalog_path).set_index("empiar_id")
    assert table.loc["EMPIAR-10028", "title"].endswith("(revised)")
    assert table.loc["EMPIAR-10028", "update_date"] == "2026-11-05"
    for key in ("EMPIAR-10005", "EMPIAR-10059"):  # the previous rows, resolution included
        kept = table.loc[key]
        for column in ("title", "update_date", "best_resolution_a", "best_emdb_id"):
            assert kept[column] == first.loc[key, column], (key, column)
        assert "500" in kept["error"]
    assert pd.isna(table.loc["EMPIAR-12001", "best_resolution_a"])
    unchanged = [k for k in first.index if k not in updates and not first.loc[k, "error"]]
    assert table.loc[unchanged, "title"].equals(first.loc[unchanged, "title"])
    eligible = set(
        pd.read_parquet(tmp_path / "data" / "catalog" / "eligible_entries.parquet")["empiar_id"]
    )
    assert {"EMPIAR-10005", "EMPIAR-10059", "EMPIAR-10028"} <= eligible
    assert "EMPIAR-12001" not in eligible

    server_env.faults.clear()
    healed = run_catalog(instance, tmp_path)
    assert healed.success
    problems = (
        healed.asset_materializations_for_node("empiar_entries")[0].metadata["error_list"].value
    )
    table = pd.read_parquet(catalog_path).set_index("empiar_id")
    for key, date in updates.items():
        assert table.loc[key, "update_date"] == date and table.loc[key, "error"] == "", key
        assert key not in problems
    assert (
        table.loc["EMPIAR-12001", "best_resolution_a"]
        == first.loc["EMPIAR-10126", "best_resolution_a"]
    )
    eligible = set(
        pd.read_parquet(tmp_path / "data" / "catalog" / "eligible_entries.parquet")["empiar_id"]
    )
    assert "EMPIAR-12001" in eligible


# ------------------------------------------------------------------------------ sensor


def test_sensor_tick_while_the_api_is_down_skips_and_the_next_tick_runs(
    server_env, dagster_home, tmp_path
):
    instance = DagsterInstance.get()
    first, _ = sensor_tick(empiar_updates_sensor, instance, tmp_path)
    assert isinstance(first, SensorResult)
    cursor = first.cursor
    record = dict(fixture_records()["entries"]["EMPIAR-10028"], update_date="2026-11-20")
    server_env.mirror.put_entry("EMPIAR-12000", record)

    server_env.faults.append(Fault("/empiar/search/", "status", status=503, times=-1))
    seen = len(server_env.requests)
    down, cursor_after = sensor_tick(empiar_updates_sensor, instance, tmp_path, cursor=cursor)
    assert isinstance(down, SkipReason) and "retrying next tick" in down.skip_message
    assert "503" in down.skip_message
    assert cursor_after == cursor  # the window is asked for again next tick
    asked = [r for r in server_env.requests[seen:] if "/empiar/search/" in r[1]]
    assert len(asked) == 2 and all(status == 503 for _, _, status in asked)  # one retry

    server_env.faults.clear()
    back, _ = sensor_tick(empiar_updates_sensor, instance, tmp_path, cursor=cursor_after)
    assert isinstance(back, SensorResult)
    (request,) = back.run_requests
    assert request.run_key.startswith("catalog-2026-11-20-")
    assert request.tags["particleseg/changed_entries"] == "1"
    stored = json.loads(back.cursor)
    assert (stored["update_date"], stored["ids"]) == ("2026-11-20", ["EMPIAR-12000"])
    assert list(stored["digests"]) == ["EMPIAR-12000"]
