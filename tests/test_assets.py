"""The catalog assets, checks and sensors on a real (SQLite) Dagster instance."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from dagster import (
    DagsterInstance,
    RunRequest,
    SensorResult,
    SkipReason,
)
from helpers import N_ELIGIBLE, REPO, run_catalog, sensor_tick

from particleseg_assets.partitions import EMPIAR_PARTITIONS_NAME
from particleseg_assets.sensors import eligible_partitions_sensor, empiar_updates_sensor
from particleseg_model.access.fixtures import (
    ORIGINAL_IDS_AT_3_5_A,
    fixture_records,
)
from particleseg_model.access.server import Fault


def test_catalog_assets_materialize_with_metadata(server_env, dagster_home, tmp_path):
    instance = DagsterInstance.get()
    result = run_catalog(instance, tmp_path)
    assert result.success
    entries_md = result.asset_materializations_for_node("empiar_entries")[0].metadata
    assert entries_md["entries"].value == len(fixture_records()["entries"]) - 1
    assert entries_md["errors"].value >= 3  # malformed 19007, unparseable 19005, missing 19006
    eligible_md = result.asset_materializations_for_node("eligible_entries")[0].metadata
    assert eligible_md["eligible"].value == N_ELIGIBLE
    assert "10028" in eligible_md["partition_keys"].value
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {
        "entry_ids_unique": True,
        "few_catalog_errors": True,
        "eligible_current": True,
    }
    stored = pd.read_parquet(tmp_path / "data" / "catalog" / "eligible_entries.parquet")
    assert len(stored) == N_ELIGIBLE and (stored["best_resolution_a"] < 3.5).all()

    inclusive = run_catalog(instance, tmp_path, inclusive=True)
    md = inclusive.asset_materializations_for_node("eligible_entries")[0].metadata
    assert md["eligible"].value == N_ELIGIBLE + len(ORIGINAL_IDS_AT_3_5_A)
    # the second run was incremental: far fewer requests than the first catalog
    refreshed = inclusive.asset_materializations_for_node("empiar_entries")[0].metadata
    assert refreshed["new_entries"].value == 0
    assert refreshed["since_update_date"].value == "2022-02-07"


def test_updates_sensor_requests_a_refresh_then_nothing(server_env, dagster_home, tmp_path):
    instance = DagsterInstance.get()
    result, _ = sensor_tick(empiar_updates_sensor, instance, tmp_path)
    assert isinstance(result, SensorResult)
    assert len(result.run_requests) == 1 and isinstance(result.run_requests[0], RunRequest)
    assert result.run_requests[0].run_key.startswith("catalog-2022-02-07-")
    cursor = result.cursor
    stored = json.loads(cursor)
    assert (stored["update_date"], stored["ids"]) == ("2022-02-07", ["EMPIAR-10934"])
    assert list(stored["digests"]) == ["EMPIAR-10934"]  # a second update that day shows

    again, _ = sensor_tick(empiar_updates_sensor, instance, tmp_path, cursor=cursor)
    assert isinstance(again, SkipReason) and "since 2022-02-07" in again.skip_message

    record = dict(fixture_records()["entries"]["EMPIAR-10028"], update_date="2026-11-20")
    server_env.mirror.put_entry("EMPIAR-12000", record)
    third, _ = sensor_tick(empiar_updates_sensor, instance, tmp_path, cursor=cursor)
    assert isinstance(third, SensorResult)
    assert json.loads(third.cursor)["ids"] == ["EMPIAR-12000"]


def test_updates_sensor_starts_from_the_stored_catalog(server_env, dagster_home, tmp_path):
    instance = DagsterInstance.get()
    assert run_catalog(instance, tmp_path).success
    result, _ = sensor_tick(empiar_updates_sensor, instance, tmp_path)
    assert isinstance(result, SkipReason)  # the catalog is current: nothing to do


def test_updates_sensor_skips_while_the_api_is_down(server_env, dagster_home, tmp_path):
    instance = DagsterInstance.get()
    server_env.faults.append(Fault("/empiar/search/", "status", status=503, times=-1))
    result, _ = sensor_tick(empiar_updates_sensor, instance, tmp_path, cursor=None)
    assert isinstance(result, SkipReason) and "unavailable" in result.skip_message
    server_env.faults.clear()
    result, _ = sensor_tick(empiar_updates_sensor, instance, tmp_path, cursor=None)
    assert isinstance(result, SensorResult)


def test_partition_sensor_adds_each_eligible_entry_once(server_env, dagster_home, tmp_path):
    instance = DagsterInstance.get()
    first, _ = sensor_tick(eligible_partitions_sensor, instance, tmp_path)
    assert isinstance(first, SkipReason)
    assert run_catalog(instance, tmp_path).success
    result, _ = sensor_tick(eligible_partitions_sensor, instance, tmp_path)
    assert isinstance(result, SensorResult)
    (request,) = result.dynamic_partitions_requests
    assert len(request.partition_keys) == N_ELIGIBLE
    assert "10028" in request.partition_keys and "10934" not in request.partition_keys
    # one dataset_job run per new partition, keyed so that Dagster never launches it twice
    runs = {r.partition_key: r for r in result.run_requests}
    assert sorted(runs) == sorted(request.partition_keys)
    assert runs["10028"].run_key == "dataset-10028"
    instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
    again, _ = sensor_tick(eligible_partitions_sensor, instance, tmp_path, cursor=result.cursor)
    assert isinstance(again, SkipReason)
    # a new materialization with nothing new adds nothing
    assert run_catalog(instance, tmp_path).success
    third, _ = sensor_tick(eligible_partitions_sensor, instance, tmp_path, cursor=result.cursor)
    assert isinstance(third, SensorResult) and third.dynamic_partitions_requests == []
    assert len(instance.get_dynamic_partitions(EMPIAR_PARTITIONS_NAME)) == N_ELIGIBLE
    assert third.run_requests == []


def test_partition_sensor_only_adds_partitions_when_auto_run_is_off(
    server_env, dagster_home, tmp_path, monkeypatch
):
    instance = DagsterInstance.get()
    assert run_catalog(instance, tmp_path).success
    monkeypatch.setenv("PARTICLESEG_AUTO_RUN", "off")
    result, _ = sensor_tick(eligible_partitions_sensor, instance, tmp_path)
    assert len(result.dynamic_partitions_requests[0].partition_keys) == N_ELIGIBLE
    assert result.run_requests == []
    monkeypatch.setenv("PARTICLESEG_AUTO_RUN", "always")
    with pytest.raises(ValueError, match="PARTICLESEG_AUTO_RUN='always'"):
        sensor_tick(eligible_partitions_sensor, instance, tmp_path)


def dagster_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dagster", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_definitions_validate():
    env = {**os.environ}
    env.pop("DAGSTER_HOME", None)
    done = dagster_cli("definitions", "validate", "-w", "workspace.yaml", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Validation successful" in done.stdout + done.stderr


@pytest.mark.slow
def test_catalog_job_from_the_command_line(server_env, dagster_home, tmp_path):
    env = {**os.environ}
    done = dagster_cli(
        "job", "execute", "-m", "particleseg_assets.definitions", "-j", "catalog_job", env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    eligible = pd.read_parquet(tmp_path / "data" / "catalog" / "eligible_entries.parquet")
    assert len(eligible) == N_ELIGIBLE
    runs = DagsterInstance.get().get_runs()
    assert len(runs) == 1 and runs[0].job_name == "catalog_job"
    assert runs[0].status.value == "SUCCESS"
