"""PostgreSQL instance storage (dagster-postgres) against a real server on loopback, and the
concurrency rules of the instance: the run queue limit, the "relion" pool serialising the
RELION steps of parallel partitions, and a killed run's slot going back to the pool once the
run is cancelled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from helpers import BIN, REPO, start_process, stop_process

from particleseg_model.access.server import serve
from particleseg_model.corpus.store import open_corpus
from particleseg_model.simulation.demo_archive import write_demo_archive

TARGET = ["-m", "particleseg_assets.definitions"]
PARTITIONS = ["30001", "30002", "30003"]
N_PARTICLES = 48
RELION_POOL_STEPS = {"particle_stacks", "refined_particles"}
# One process per run: the multiprocess executor's 5 s of imports per step would be most of the
# time on data this small; the pools are claimed the same way by either executor.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_entry_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pg") / "archive"
    write_demo_archive(
        out,
        maps=["generated:globular", "generated:ring", "generated:globular"],
        n_particles=N_PARTICLES,
        box=48,
        micrograph_entries=0,
        seed=5,
        progress=False,
    )
    return out


def _tune(home: Path, **monitoring: int) -> None:
    """Shorter daemon intervals and a run queue of two for the test instance."""
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    config["run_monitoring"].update(monitoring)
    config["concurrency"]["runs"]["max_concurrent_runs"] = 2
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def pg_platform(
    postgres_home: Path, three_entry_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    _tune(postgres_home, poll_interval_seconds=1, free_slots_after_run_end_seconds=1)
    monkeypatch.setenv("PARTICLESEG_DATA", str(tmp_path / "data"))
    with serve(three_entry_archive) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        with DagsterInstance.get() as instance:
            instance.add_dynamic_partitions("empiar_id", PARTITIONS)
        (tmp_path / "in_process.json").write_text(json.dumps(IN_PROCESS))
        yield {**os.environ, "PYTHONUNBUFFERED": "1"}


def _dataset_job(command: str, partition: str, env: dict[str, str]) -> list[str]:
    """``dagster job <command>`` of dataset_job for one partition, in one process."""
    config = Path(env["PARTICLESEG_DATA"]).parent / "in_process.json"
    return [
        str(BIN / "dagster"),
        "job",
        command,
        *TARGET,
        "-j",
        "dataset_job",
        "--tags",
        json.dumps({"dagster/partition": partition}),
        "--config",
        str(config),
    ]


def _dagster(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _step_windows(instance: DagsterInstance, run_id: str) -> dict[str, tuple[float, float]]:
    """Each step's (start, end) in seconds since the epoch, from the run's event log."""
    starts: dict[str, float] = {}
    windows: dict[str, tuple[float, float]] = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == DagsterEventType.STEP_START:
            starts[event.step_key] = record.timestamp
        elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            windows[event.step_key] = (starts[event.step_key], record.timestamp)
    return windows


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return min(a[1], b[1]) - max(a[0], b[0])


def test_instance_storage_is_postgres(postgres_home: Path) -> None:
    from dagster_postgres import (
        PostgresEventLogStorage,
        PostgresRunStorage,
        PostgresScheduleStorage,
    )

    with DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert instance.event_log_storage.supports_global_concurrency_limits
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        instance.add_dynamic_partitions("empiar_id", ["10028", "10061"])
    # a second process sees the same state: it lives in the database, not in DAGSTER_HOME
    with DagsterInstance.get() as again:
        assert set(again.get_dynamic_partitions("empiar_id")) == {"10028", "10061"}
    assert not list(postgres_home.glob("**/*.db")), "no SQLite file beside a Postgres instance"


def test_parallel_partitions_queue_and_relion_pool(
    pg_platform: dict[str, str], tmp_path: Path
) -> None:
    """Three partitions launched at once through the run queue (limit two) on PostgreSQL: every
    run succeeds, no more than two run at a time but two do overlap, and the steps of the
    "relion" pool never overlap (pool limit one)."""
    launches = [
        subprocess.Popen(
            _dataset_job("launch", key, pg_platform),
            cwd=REPO,
            env=pg_platform,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for key in PARTITIONS
    ]
    for launch in launches:
        output = launch.communicate(timeout=120)[0]
        assert launch.returncode == 0, output[-3000:]
    with DagsterInstance.get() as instance:
        queued = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.QUEUED]))
        assert len(queued) == 3, "launched runs wait in the queue until the daemon takes them"

    log = tmp_path / "daemon.log"
    daemon = start_process([str(BIN / "dagster-daemon"), "run", *TARGET], pg_platform, log)
    try:
        deadline = time.monotonic() + 420
        with DagsterInstance.get() as instance:
            while time.monotonic() < deadline:
                assert daemon.poll() is None, log.read_text()[-3000:]
                runs = instance.get_runs()
                if all(
                    r.status
                    in (
                        DagsterRunStatus.SUCCESS,
                        DagsterRunStatus.FAILURE,
                        DagsterRunStatus.CANCELED,
                    )
                    for r in runs
                ):
                    break
                time.sleep(1)
    finally:
        stop_process(daemon)

    with DagsterInstance.get() as instance:
        records = instance.get_run_records()
        assert sorted(r.dagster_run.tags["dagster/partition"] for r in records) == PARTITIONS
        assert all(r.dagster_run.status == DagsterRunStatus.SUCCESS for r in records), (
            log.read_text()[-3000:]
        )
        # the run queue: at most two runs at once, and two did run at once
        spans = [(r.start_time, r.end_time) for r in records]
        most = max(sum(1 for s in spans if s[0] <= t < s[1]) for t, _ in spans)
        assert most == 2, spans
        # the relion pool: its steps across all runs never overlap
        relion_windows = []
        for r in records:
            windows = _step_windows(instance, r.dagster_run.run_id)
            assert RELION_POOL_STEPS | {"mask_volume", "particle_masks"} <= set(windows)
            relion_windows += [windows[s] for s in RELION_POOL_STEPS]
        for i, a in enumerate(relion_windows):
            for b in relion_windows[i + 1 :]:
                assert _overlap(a, b) <= 0, (a, b)
        # run and event history in PostgreSQL: one materialization per partition and asset
        for asset in ("particle_stacks", "refined_particles", "particle_masks"):
            assert instance.get_materialized_partitions(AssetKey(asset)) == set(PARTITIONS)
        info = instance.event_log_storage.get_concurrency_info("relion")
        assert info.slot_count == 1 and info.active_slot_count == 0
    for key in PARTITIONS:
        assert (
            open_corpus(Path(pg_platform["PARTICLESEG_DATA"]) / "corpus", key).n_particles
            == N_PARTICLES
        )


def test_a_killed_run_frees_its_pool_slot_once_cancelled(
    pg_platform: dict[str, str], tmp_path: Path
) -> None:
    """A run SIGKILLed inside a "relion" step holds the pool's only slot; once the run is
    cancelled (the UI's terminate of a dead run), run monitoring gives the slot back and the
    next partition's RELION steps run."""
    proc = subprocess.Popen(
        _dataset_job("execute", "30001", pg_platform),
        cwd=REPO,
        env=pg_platform,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        with DagsterInstance.get() as instance:
            while not instance.event_log_storage.get_concurrency_info("relion").claimed_slots:
                assert proc.poll() is None, "the run ended before it was killed"
                assert time.monotonic() < deadline, "no step claimed the relion slot"
                time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    with DagsterInstance.get() as instance:
        (killed,) = instance.get_runs()
        assert killed.status == DagsterRunStatus.STARTED  # a dead worker cannot say so
        claimed = instance.event_log_storage.get_concurrency_info("relion").claimed_slots
        assert [slot.run_id for slot in claimed] == [killed.run_id]
        instance.report_run_canceled(killed, message="run worker killed")

    log = tmp_path / "daemon.log"
    daemon = start_process([str(BIN / "dagster-daemon"), "run", *TARGET], pg_platform, log)
    try:
        deadline = time.monotonic() + 90
        with DagsterInstance.get() as instance:
            while instance.event_log_storage.get_concurrency_info("relion").claimed_slots:
                assert daemon.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, (
                    "the slot was not freed:\n" + log.read_text()[-3000:]
                )
                time.sleep(0.5)
    finally:
        stop_process(daemon)
    _dagster(_dataset_job("execute", "30002", pg_platform), env=pg_platform)
    with DagsterInstance.get() as instance:
        assert instance.get_materialized_partitions(AssetKey("particle_masks")) == {"30002"}
