"""The platform as people run it: dagster-webserver + dagster-daemon on loopback, a run launched
through the GraphQL API. Runs killed in each heavy step are in test_faults.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus
from helpers import BIN, N_PARTICLES, start_process, stop_process

from particleseg_model.access.server import serve
from particleseg_model.corpus.store import open_corpus

pytestmark = pytest.mark.slow


@pytest.fixture
def platform_env(
    particle_archive: Path, dagster_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """The environment of a deployment: DAGSTER_HOME, storage root, EMPIAR server."""
    data = tmp_path / "data"
    monkeypatch.setenv("PARTICLESEG_DATA", str(data))
    with serve(particle_archive) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        instance = DagsterInstance.get()
        instance.add_dynamic_partitions("empiar_id", ["30001", "30002"])
        yield {**os.environ, "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"{proc.args[0]} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout_s} s:\n{log.read_text()[-3000:]}")


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    assert "errors" not in answer, answer
    return answer["data"]


def test_webserver_and_daemon_run_dataset_job_from_graphql(platform_env, tmp_path: Path):
    from dagster_graphql import DagsterGraphQLClient

    port = _free_port()
    target = ["-m", "particleseg_assets.definitions"]
    web_log, daemon_log = tmp_path / "webserver.log", tmp_path / "daemon.log"
    web = start_process(
        [str(BIN / "dagster-webserver"), *target, "-h", "127.0.0.1", "-p", str(port)],
        platform_env,
        web_log,
    )
    daemon = start_process([str(BIN / "dagster-daemon"), "run", *target], platform_env, daemon_log)
    try:
        _wait_http(f"http://127.0.0.1:{port}/server_info", web, web_log)
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        run_id = client.submit_job_execution("dataset_job", tags={"dagster/partition": "30001"})
        # queued until the daemon's run coordinator launches it
        deadline = time.monotonic() + 240
        status = client.get_run_status(run_id)
        while (
            status
            not in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
            and time.monotonic() < deadline
        ):
            assert daemon.poll() is None, daemon_log.read_text()[-3000:]
            time.sleep(1)
            status = client.get_run_status(run_id)
        assert status == DagsterRunStatus.SUCCESS, daemon_log.read_text()[-3000:]

        # the materialization events, read back through the same API the UI uses
        data = _graphql(
            port,
            """
            query($runId: ID!) { runOrError(runId: $runId) { ... on Run {
              tags { key value }
              assetMaterializations { assetKey { path } partition
                metadataEntries { label ... on IntMetadataEntry { intValue } } } } } }""",
            {"runId": run_id},
        )
        run = data["runOrError"]
        assert {"key": "dagster/partition", "value": "30001"} in run["tags"]
        events = {tuple(e["assetKey"]["path"]): e for e in run["assetMaterializations"]}
        assert set(events) == {
            ("particle_stacks",),
            ("refined_particles",),
            ("mask_volume",),
            ("particle_masks",),
        }
        assert all(e["partition"] == "30001" for e in events.values())
        counts = {
            m["label"]: m.get("intValue") for m in events[("particle_masks",)]["metadataEntries"]
        }
        assert counts["particles"] == N_PARTICLES
        checks = _graphql(
            port,
            """
            { assetNodes(assetKeys: [{path: ["particle_masks"]}]) {
                assetChecksOrError { ... on AssetChecks { checks { name
                  executionForLatestMaterialization { status } } } } } }""",
        )
        found = {
            c["name"]: c["executionForLatestMaterialization"]["status"]
            for c in checks["assetNodes"][0]["assetChecksOrError"]["checks"]
        }
        assert found == {
            "masks_not_empty": "SUCCEEDED",
            "corpus_complete": "SUCCEEDED",
            "label_shares_like_the_others": "SUCCEEDED",
        }
    finally:
        stop_process(daemon)
        stop_process(web)
    instance = DagsterInstance.get()
    assert instance.get_materialized_partitions(AssetKey("particle_masks")) == {"30001"}
    corpus = open_corpus(Path(platform_env["PARTICLESEG_DATA"]) / "corpus", "30001")
    assert corpus.n_particles == N_PARTICLES
