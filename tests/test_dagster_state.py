"""The state the platform leaves behind: the update sensor's cursor, removed datasets that
stay removed, the demo's runs that the daemon recognises as its own, run logs a person reads."""

from __future__ import annotations

import json
import subprocess
import sys

from dagster import DagsterInstance, RunRequest, SensorResult
from helpers import REPO, run_catalog, sensor_tick

from particleseg_model.access.catalog import find_updates
from particleseg_model.access.fixtures import fixture_records


def test_a_second_update_of_an_id_on_the_cursor_date_is_found(archive_server) -> None:
    from particleseg_model.access.empiar import EmpiarClient

    empiar = EmpiarClient(archive_server.empiar_url, archive_server.emdb_url, retries=1)
    _, cursor = find_updates(empiar, None)
    assert cursor.update_date == "2022-02-07" and cursor.ids == ["EMPIAR-10934"]
    record = dict(fixture_records()["entries"]["EMPIAR-10005"], update_date="2022-02-07")
    archive_server.mirror.put_entry("EMPIAR-10005", record)
    changed, cursor = find_updates(empiar, cursor)
    assert changed == ["EMPIAR-10005"]
    # the same entry updated again the same day (the API's dates have no time)
    archive_server.mirror.put_entry("EMPIAR-10005", {**record, "title": "a corrected title"})
    changed, after = find_updates(empiar, cursor)
    assert changed == ["EMPIAR-10005"]
    assert after.update_date == "2022-02-07"
    assert after.digests["EMPIAR-10005"] != cursor.digests["EMPIAR-10005"]
    # and nothing new once that is seen
    assert find_updates(empiar, after) == ([], after)


def test_a_removed_dataset_loses_its_reports_and_is_not_added_back(
    server_env, dagster_home, tmp_path
) -> None:
    from particleseg_assets.jobs import remove_dataset_job, removed_partitions
    from particleseg_assets.resources import StorageResource
    from particleseg_assets.sensors import eligible_partitions_sensor

    instance = DagsterInstance.get()
    storage = StorageResource(root=str(tmp_path / "data"))
    assert run_catalog(instance, tmp_path).success
    first, _ = sensor_tick(eligible_partitions_sensor, instance, tmp_path)
    assert isinstance(first, SensorResult)
    added = first.dynamic_partitions_requests[0].partition_keys
    assert "10028" in added
    instance.add_dynamic_partitions("empiar_id", added)
    report = storage.path("iou_reports", "10028", "report.json")
    report.parent.mkdir(parents=True)
    report.write_text("{}")
    result = remove_dataset_job.execute_in_process(
        instance=instance,
        resources={"storage": storage},
        run_config={"ops": {"remove_dataset": {"config": {"empiar_id": "10028"}}}},
    )
    assert result.success
    assert not report.parent.exists()
    assert "10028" in removed_partitions(storage)
    assert "10028" not in instance.get_dynamic_partitions("empiar_id")
    # the next catalog run: 10028 is still eligible, but the sensor does not bring it back
    assert run_catalog(instance, tmp_path).success
    again, _ = sensor_tick(eligible_partitions_sensor, instance, tmp_path)
    assert isinstance(again, SensorResult)
    requested = [k for r in again.dynamic_partitions_requests for k in r.partition_keys]
    assert "10028" not in requested
    assert "10028" not in [r.partition_key for r in again.run_requests]


def test_the_demos_runs_carry_the_run_keys_the_daemon_looks_up(dagster_home, tmp_path) -> None:
    """A run launched as the demo launches the report runs (``dagster job execute`` with the
    tags of :func:`sensor_run_tags`) is found by the daemon's own run-key lookup for that
    sensor, so the first ``make dev`` does not launch it again."""
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster._daemon.sensor import fetch_existing_runs

    from particleseg_assets.demo import sensor_run_tags

    tags = sensor_run_tags("model_reports_sensor", "iou-v0001-30001", "30001")
    # a job that fails at once without config: what matters is the run and its tags
    subprocess.run(
        [sys.executable, "-m", "dagster", "job", "execute", "-m",
         "particleseg_assets.definitions", "-j", "remove_dataset_job", "--tags",
         json.dumps(tags)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    instance = DagsterInstance.get()
    target = ModuleTarget("particleseg_assets.definitions", None, str(REPO), None)
    with create_test_daemon_workspace_context(target, instance) as context:
        workspace = context.create_request_context()
        (location,) = workspace.code_locations
        repository = next(iter(location.get_repositories().values()))
        sensor = repository.get_sensor("model_reports_sensor")
        found = fetch_existing_runs(instance, sensor, [RunRequest(run_key="iou-v0001-30001")])
        other = repository.get_sensor("eligible_partitions_sensor")
        not_its = fetch_existing_runs(instance, other, [RunRequest(run_key="iou-v0001-30001")])
    assert list(found) == ["iou-v0001-30001"]
    assert not_its == {}


def test_pose_errors_are_a_line_not_a_dict() -> None:
    from particleseg_model.corpus.build import pose_errors_line

    line = pose_errors_line(
        {
            "n_particles": 500.0,
            "median_angle_error_deg": 1.234,
            "mean_angle_error_deg": 2.345,
            "within_deg": 5.0,
            "fraction_within_deg": 0.91,
            "median_shift_error_a": 0.812,
            "mean_shift_error_a": 1.1,
        }
    )
    assert line == (
        "500 particles: angle error median 1.23 deg (mean 2.35), 91.0% within 5 deg; shift "
        "error median 0.812 A (mean 1.1)"
    )
    assert "{" not in line and "'" not in line


def test_no_run_log_line_of_the_library_formats_a_dict() -> None:
    """Every f-string handed to a log callback in the corpus, model and cleaning steps: none
    interpolates a dict (the one that did, the pose errors, goes through pose_errors_line)."""
    import ast

    dicts = {"errors", "summary", "metadata", "counts", "options", "settings", "manifest"}
    found = []
    for path in sorted((REPO / "particleseg_model").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("log", "say", "warn")
            ):
                continue
            for arg in node.args:
                for part in ast.walk(arg):
                    if (
                        isinstance(part, ast.FormattedValue)
                        and isinstance(part.value, ast.Name)
                        and part.value.id in dicts
                    ):
                        found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []
