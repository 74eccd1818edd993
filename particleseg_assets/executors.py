"""Which executor runs the steps of every job, chosen by ``PARTICLESEG_EXECUTOR``.

The jobs carry no executor of their own, so one code location runs on a laptop (the default:
Dagster's multiprocess executor, in-process under ``materialize``), a Dask or Celery cluster,
or one Kubernetes Job per step, with the executor's settings in the run config (the files
under ``deploy/``). The cluster libraries are imported only when chosen: a host without the
``dask``, ``celery`` or ``k8s`` extra loads the code location as before.

Every process that loads the code location (the run worker, each Dask or Celery worker, each
step pod) must see the same ``PARTICLESEG_EXECUTOR``: a step worker rebuilds the job from the
module and checks the run config's ``execution`` section against that job's executor.
"""

from __future__ import annotations

import importlib
import os

from dagster import ExecutorDefinition, in_process_executor, multiprocess_executor

EXECUTOR_ENV = "PARTICLESEG_EXECUTOR"

# name -> (module, attribute, pip extra) of the executors that live in integration libraries
_CLUSTER_EXECUTORS: dict[str, tuple[str, str, str]] = {
    "dask": ("dagster_dask", "dask_executor", "dask"),
    "celery": ("dagster_celery", "celery_executor", "celery"),
    "k8s": ("dagster_k8s", "k8s_job_executor", "k8s"),
}
EXECUTOR_NAMES = ("default", "multiprocess", "in_process", *_CLUSTER_EXECUTORS)


def executor_for(name: str | None) -> ExecutorDefinition | None:
    """The executor called ``name`` (one of :data:`EXECUTOR_NAMES`); ``None`` for "default"
    or an empty name: Definitions then keep Dagster's own default (multiprocess, or in-process
    for ``materialize``), exactly as without this setting."""
    key = (name or "default").strip().lower().replace("-", "_")
    if key == "default":
        return None
    if key == "multiprocess":
        return multiprocess_executor
    if key == "in_process":
        return in_process_executor
    if key not in _CLUSTER_EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={name!r}: choose one of {', '.join(EXECUTOR_NAMES)}")
    module, attribute, extra = _CLUSTER_EXECUTORS[key]
    try:
        found = importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{EXECUTOR_ENV}={name!r} needs {module.replace('_', '-')}, which is "
            f"not installed: pip install -e '.[{extra}]' ({error})"
        ) from error
    return getattr(found, attribute)


def executor_from_env() -> ExecutorDefinition | None:
    """:func:`executor_for` of ``$PARTICLESEG_EXECUTOR`` (unset: the default)."""
    return executor_for(os.environ.get(EXECUTOR_ENV))
