"""Scale-out: the executor chosen by PARTICLESEG_EXECUTOR, the deployment files under deploy/
validated against the real Dagster, dagster-k8s, dagster-dask and dagster-celery schemas, the
training step's GPU request as a Kubernetes pod would get it, and a real run on a local Dask
cluster."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterInvalidConfigError,
    DagsterRunStatus,
    multi_or_in_process_executor,
    validate_run_config,
)
from dagster._cli.workspace.cli_target import get_run_config_from_file_list
from dagster._config import process_config
from dagster._core.execution.api import create_execution_plan
from dagster._core.instance.config import dagster_instance_config
from dagster._core.storage.dagster_run import DagsterRun
from helpers import N_ELIGIBLE

from particleseg_assets.executors import EXECUTOR_ENV, executor_for

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
JOBS = ("catalog_job", "dataset_job", "train_job", "report_job", "clean_job", "remove_dataset_job")
# the op config two jobs cannot run without (the deploy files set executors, not ops)
JOB_OPS = {
    "clean_job": {"cleaned_particles": {"config": {"star": "/data/particles.star"}}},
    "remove_dataset_job": {"remove_dataset": {"config": {"empiar_id": "10028"}}},
}
# what the Kubernetes deployment's ConfigMap and secret would put in the environment
K8S_ENV = {
    "PGHOST": "postgres.dagster.svc",
    "PGPORT": "5432",
    "PGUSER": "dagster",
    "DAGSTER_PG_PASSWORD": "s3cret+1",
    "PGDATABASE": "dagster",
    "DAGSTER_K8S_NAMESPACE": "particleseg",
    "PARTICLESEG_IMAGE": "registry/particleseg:1",
}


@pytest.fixture
def defs_with(monkeypatch):
    """The code location as loaded with ``PARTICLESEG_EXECUTOR`` set: the module is reloaded,
    and reloaded again with the caller's environment afterwards."""
    import particleseg_assets.definitions as module

    def load(name: str | None):
        if name is None:
            monkeypatch.delenv(EXECUTOR_ENV, raising=False)
        else:
            monkeypatch.setenv(EXECUTOR_ENV, name)
        return importlib.reload(module).defs

    yield load
    monkeypatch.undo()
    importlib.reload(module)


@pytest.fixture
def k8s_env(monkeypatch) -> dict[str, str]:
    for name, value in K8S_ENV.items():
        monkeypatch.setenv(name, value)
    return K8S_ENV


def run_config(*names: str) -> dict:
    """Run config files merged as ``dagster job execute -c a -c b`` merges them."""
    return dict(get_run_config_from_file_list([str(DEPLOY / n) for n in names]))


# -- executor selection ------------------------------------------------------------------------


def test_default_executor_is_dagsters_own(defs_with):
    defs = defs_with(None)
    assert all(defs.resolve_job_def(j).executor_def is multi_or_in_process_executor for j in JOBS)
    assert (
        defs_with("default").resolve_job_def("train_job").executor_def
        is multi_or_in_process_executor
    )


@pytest.mark.parametrize(
    "name, executor",
    [
        ("multiprocess", "multiprocess"),
        ("in_process", "in_process"),
        ("dask", "dask"),
        ("celery", "celery"),
        ("k8s", "k8s"),
        ("in-process", "in_process"),
    ],
)
def test_executor_from_the_environment(defs_with, name, executor):
    defs = defs_with(name)
    # every job, asset jobs and the op job alike
    assert {defs.resolve_job_def(j).executor_def.name for j in JOBS} == {executor}


def test_bad_or_missing_executor_is_named(monkeypatch):
    with pytest.raises(ValueError, match="choose one of default, multiprocess, in_process"):
        executor_for("spark")
    monkeypatch.setitem(sys.modules, "dagster_celery", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs dagster-celery.*pip install -e '\.\[celery\]'"):
        executor_for("celery")


# -- the Kubernetes instance -------------------------------------------------------------------


def kubeconfig(tmp_path: Path) -> Path:
    """A kubeconfig for a cluster that is never contacted: enough for the launcher to load."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "test", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "test", "user": {"token": "x"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            }
        )
    )
    return path


def load_instance_config(tmp_path: Path, text: str) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(text)
    config, custom_class = dagster_instance_config(str(home))
    assert custom_class is None
    return dict(config)


def k8s_launcher(config: dict, tmp_path: Path):
    """The run launcher built from the instance's run_launcher section the way an instance
    builds it (its config checked against the class's schema, environment variables read), out
    of the cluster: the test kubeconfig instead of the in-cluster service account."""
    from dagster._serdes.config_class import ConfigurableClassData

    section = config["run_launcher"]
    out_of_cluster = {
        **section["config"],
        "load_incluster_config": False,
        "kubeconfig_file": str(kubeconfig(tmp_path)),
    }
    return ConfigurableClassData(
        section["module"], section["class"], yaml.safe_dump(out_of_cluster)
    ).rehydrate()


def test_k8s_instance_config_is_valid(k8s_env, tmp_path):
    from dagster_k8s import K8sRunLauncher
    from dagster_postgres import DagsterPostgresStorage
    from dagster_postgres.utils import pg_url_from_config

    text = (DEPLOY / "k8s" / "dagster.yaml").read_text()
    config = load_instance_config(tmp_path, text)
    launcher = k8s_launcher(config, tmp_path)
    assert isinstance(launcher, K8sRunLauncher)
    assert launcher.job_namespace == "particleseg"
    assert launcher.job_image == "registry/particleseg:1"
    assert launcher.env_config_maps == ["particleseg-env"]
    assert launcher.postgres_password_secret == "dagster-postgresql-secret"
    # storage: the environment's server, through psycopg2
    storage = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert storage.success, storage.errors
    assert (
        pg_url_from_config(storage.value)
        == "postgresql+psycopg2://dagster:s3cret%2B1@postgres.dagster.svc:5432/dagster"
    )
    # the same pools and run queue as the local instance
    local = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    assert config["concurrency"] == local["concurrency"]
    assert config["run_monitoring"]["enabled"] is True


def test_k8s_instance_config_rejects_mistakes(k8s_env, tmp_path):
    text = (DEPLOY / "k8s" / "dagster.yaml").read_text()
    typo = load_instance_config(tmp_path, text.replace("job_namespace:", "job_namespac:"))
    with pytest.raises(DagsterInvalidConfigError, match="job_namespac"):
        k8s_launcher(typo, tmp_path)
    no_map = load_instance_config(tmp_path, text.replace("instance_config_map:", "#"))
    with pytest.raises(DagsterInvalidConfigError, match="instance_config_map"):
        k8s_launcher(no_map, tmp_path)
    with pytest.raises(DagsterInvalidConfigError, match="hostnam"):
        load_instance_config(tmp_path, text.replace("hostname:", "hostnam:"))
    with pytest.raises(DagsterInvalidConfigError, match="default_limi"):
        load_instance_config(tmp_path, text.replace("default_limit:", "default_limi:"))


# -- the run configs ---------------------------------------------------------------------------

RUN_CONFIGS = [
    ("k8s", ("k8s/run_config.yaml",), JOBS),
    ("k8s", ("k8s/run_config.yaml", "k8s/train_gpus.yaml"), ("train_job",)),
    ("dask", ("dask/run_config.yaml",), JOBS),
    ("dask", ("dask/local_run_config.yaml",), JOBS),
    ("celery", ("celery/run_config.yaml",), JOBS),
]


@pytest.mark.parametrize("executor, files, jobs", RUN_CONFIGS)
def test_run_configs_validate_against_the_jobs(
    defs_with, k8s_env, monkeypatch, executor, files, jobs
):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://scheduler:8786")
    monkeypatch.setenv("DAGSTER_CELERY_BROKER_URL", "pyamqp://guest@rabbitmq:5672//")
    monkeypatch.setenv("DAGSTER_CELERY_BACKEND_URL", "redis://redis:6379/0")
    defs = defs_with(executor)
    config = run_config(*files)
    for name in jobs:
        with_ops = {**config, "ops": {**config.get("ops", {}), **JOB_OPS.get(name, {})}}
        resolved = validate_run_config(defs.resolve_job_def(name), with_ops)
        assert list(resolved["execution"]) == [executor]
    # the same file does not fit a job on another executor
    with pytest.raises(DagsterInvalidConfigError):
        validate_run_config(defs_with("multiprocess").resolve_job_def(jobs[0]), config)


def test_run_config_values_and_mistakes(defs_with, k8s_env, monkeypatch):
    train = defs_with("k8s").resolve_job_def("train_job")
    resolved = validate_run_config(train, run_config("k8s/run_config.yaml", "k8s/train_gpus.yaml"))
    execution = resolved["execution"]["k8s"]
    assert execution["job_namespace"] == "particleseg"  # from the environment
    step = execution["per_step_k8s_config"]["segmentation_model"]["container_config"]
    assert step["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert step["resources"]["requests"]["cpu"] == "4"  # kept from run_config.yaml
    assert resolved["ops"]["segmentation_model"]["config"]["distribute"] == "mirrored"

    k8s = run_config("k8s/run_config.yaml")
    k8s["execution"]["config"]["max_concurrent"] = "eight"
    with pytest.raises(DagsterInvalidConfigError, match="max_concurrent"):
        validate_run_config(train, k8s)
    k8s = run_config("k8s/run_config.yaml")
    k8s["execution"]["config"]["step_k8s_config"]["container_confg"] = {}
    with pytest.raises(DagsterInvalidConfigError, match="container_confg"):
        validate_run_config(train, k8s)

    catalog = defs_with("dask").resolve_job_def("catalog_job")
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(DagsterInvalidConfigError, match="DASK_SCHEDULER_ADDRESS"):
        validate_run_config(catalog, run_config("dask/run_config.yaml"))
    with pytest.raises(DagsterInvalidConfigError, match="address"):
        validate_run_config(catalog, {"execution": {"config": {"cluster": {"existing": {}}}}})
    celery = defs_with("celery").resolve_job_def("catalog_job")
    with pytest.raises(DagsterInvalidConfigError, match="brokr"):
        validate_run_config(celery, {"execution": {"config": {"brokr": "redis://x"}}})


# -- the step pods -----------------------------------------------------------------------------


def step_pod(defs, job: str, step_key: str, files: tuple[str, ...], tmp_path: Path):
    """The Kubernetes Job the k8s_job_executor would create for one step: the run launcher's
    settings, then the executor's step_k8s_config, the step's own ``dagster-k8s/config`` tag
    and the run config's per_step_k8s_config, merged in the order of
    ``dagster_k8s.executor.K8sStepHandler._get_container_context``."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )

    job_def = defs.resolve_job_def(job)
    config = run_config(*files)
    executor = validate_run_config(job_def, config)["execution"]["k8s"]
    step = create_execution_plan(job_def, run_config=config).get_step_by_key(step_key)
    launcher = k8s_launcher(
        load_instance_config(tmp_path, (DEPLOY / "k8s" / "dagster.yaml").read_text()), tmp_path
    )
    context = K8sContainerContext.create_for_run(
        DagsterRun(job_name=job), launcher, include_run_tags=False
    )
    context = context.merge(
        K8sContainerContext(
            namespace=executor.get("job_namespace"),
            run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
                executor.get("step_k8s_config", {})
            ),
        )
    )
    context = context.merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step.tags))
    ).merge(
        K8sContainerContext(
            run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
                executor["per_step_k8s_config"].get(step.op_name, {})
            )
        )
    )
    job_config = context.get_k8s_job_config(None, launcher)
    body = construct_dagster_k8s_job(
        job_config,
        ["dagster", "api", "execute_step"],
        f"dagster-step-{step_key.replace('_', '-')}",
        user_defined_k8s_config=context.run_k8s_config,
        component="step_worker",
    )
    return context, body.to_dict()


def test_training_step_pod_requests_a_gpu(defs_with, k8s_env, tmp_path):
    defs = defs_with("k8s")
    context, body = step_pod(
        defs, "train_job", "segmentation_model", ("k8s/run_config.yaml",), tmp_path
    )
    assert context.namespace == "particleseg"
    pod = body["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry/particleseg:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # the op tag
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in [
        {k: v for k, v in t.items() if v is not None} for t in pod["tolerations"]
    ]
    # the run launcher's shared volume and environment reach the step pod
    assert {"name": "particleseg-data", "mount_path": "/data"}.items() <= container[
        "volume_mounts"
    ][-1].items()
    assert any(
        e["config_map_ref"]["name"] == "particleseg-env"
        for e in container["env_from"]
        if e.get("config_map_ref")
    )
    # four GPUs for a MirroredStrategy run, from the second run config file
    _, body = step_pod(
        defs,
        "train_job",
        "segmentation_model",
        ("k8s/run_config.yaml", "k8s/train_gpus.yaml"),
        tmp_path,
    )
    limits = body["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "4" and limits["memory"] == "32Gi"


def test_relion_step_pod_gets_cpus_and_no_gpu(defs_with, k8s_env, tmp_path):
    _, body = step_pod(
        defs_with("k8s"), "dataset_job", "refined_particles", ("k8s/run_config.yaml",), tmp_path
    )
    (container,) = body["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": "9", "memory": "48Gi"}
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    env = {e["name"]: e["value"] for e in container["env"] if e.get("value") is not None}
    assert env["PARTICLESEG_RELION_MPI_RANKS"] == "9"
    # an ordinary step gets the executor's default pod
    _, body = step_pod(
        defs_with("k8s"), "catalog_job", "empiar_entries", ("k8s/run_config.yaml",), tmp_path
    )
    resources = body["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "1", "memory": "2Gi"}
    assert "nvidia.com/gpu" not in resources.get("limits", {})


def test_gpu_tag_parses_with_dagster_k8s():
    from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY, get_user_defined_k8s_config

    from particleseg_assets.assets.model import TRAIN_K8S_CONFIG, segmentation_model

    tags = {
        k: json.dumps(v) if not isinstance(v, str) else v
        for k, v in segmentation_model.op.tags.items()
    }
    parsed = get_user_defined_k8s_config(tags)
    assert parsed.container_config["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert json.loads(tags[USER_DEFINED_K8S_CONFIG_KEY]) == TRAIN_K8S_CONFIG
    bad = {USER_DEFINED_K8S_CONFIG_KEY: json.dumps({"container": {"resources": {}}})}
    with pytest.raises(DagsterInvalidConfigError, match="container"):
        get_user_defined_k8s_config(bad)


# -- a real Dask run ---------------------------------------------------------------------------


@pytest.mark.slow
def test_catalog_job_on_a_local_dask_cluster(server_env, dagster_home, tmp_path, monkeypatch):
    """catalog_job from the command line with PARTICLESEG_EXECUTOR=dask and
    deploy/dask/run_config.yaml as shipped, on a two-worker cluster of separate processes."""
    from dask.distributed import Client, LocalCluster

    monkeypatch.setenv(EXECUTOR_ENV, "dask")
    with (
        LocalCluster(
            n_workers=0, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        # the workers start with this environment, as a deployment's would: the loopback
        # archive, the data root, DAGSTER_HOME, the executor and the scheduler's address (each
        # step checks the run config again, environment variables included)
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
        cluster.scale(2)
        client.wait_for_workers(2, timeout=120)
        worker_pids = set(client.run(os.getpid).values())
        env = {**os.environ}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "dagster",
                "job",
                "execute",
                "-m",
                "particleseg_assets.definitions",
                "-j",
                "catalog_job",
                "-c",
                str(DEPLOY / "dask" / "run_config.yaml"),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids

    instance = DagsterInstance.get()
    (run,) = instance.get_runs()
    assert run.job_name == "catalog_job" and run.status == DagsterRunStatus.SUCCESS
    assert run.run_config["execution"]["config"]["cluster"] == {
        "existing": {"address": {"env": "DASK_SCHEDULER_ADDRESS"}}
    }  # the file as shipped
    starts = instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)
    steps = {e.step_key: e.dagster_event.pid for e in starts}
    assert {"empiar_entries", "eligible_entries"} <= set(steps)
    # every step ran in a Dask worker process, none in the run's own
    assert set(steps.values()) <= worker_pids
    eligible = instance.get_latest_materialization_event(AssetKey("eligible_entries"))
    assert eligible.asset_materialization.metadata["eligible"].value == N_ELIGIBLE
    stored = pd.read_parquet(tmp_path / "data" / "catalog" / "eligible_entries.parquet")
    assert len(stored) == N_ELIGIBLE and (stored["best_resolution_a"] < 3.5).all()
    checks = instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
    assert checks and all(e.dagster_event.event_specific_data.passed for e in checks)
