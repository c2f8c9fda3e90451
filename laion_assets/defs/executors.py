"""Where a run's steps execute, chosen per deployment with LAION_ASSETS_EXECUTOR:

- `in_process` (the default): every step in the run's own process, the model loaded once
  (many shard runs on few cores; killing the run worker stops the whole run, like losing its
  pod);
- `multiprocess` (Dagster's own default): one process per step, on the run's machine or pod;
- `celery`: each step is a Celery task taken by whichever worker is free (deploy/celery);
  LAION_ASSETS_CELERY_CONFIG names the YAML the workers start with, so both sides agree;
- `k8s`: each step is a Kubernetes Job (dagster-k8s); steps in the `gpu` pool ask for a GPU
  through their `dagster-k8s/config` tag (GPU_STEP_K8S_CONFIG).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from dagster import ExecutorDefinition, in_process_executor, multiprocess_executor

from laion_assets.core.lake.errors import LaionAssetsError

EXECUTORS = ("in_process", "multiprocess", "celery", "k8s")

# A step of the `gpu` pool gets one GPU (and tolerates the usual GPU node taint) when it runs
# as a Kubernetes Job; other executors ignore the tag. Override per deployment with the k8s
# executor's `per_step_k8s_config`.
GPU_STEP_K8S_CONFIG = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
    "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}
POOL_OP_TAGS = {"gpu": {"dagster-k8s/config": json.dumps(GPU_STEP_K8S_CONFIG)}}


def celery_settings(path: str | None) -> dict:
    """The `execution.config` block of a Celery YAML (broker, backend, config_source)."""
    if not path:
        raise LaionAssetsError("LAION_ASSETS_EXECUTOR=celery needs LAION_ASSETS_CELERY_CONFIG (e.g. deploy/celery/celery.yaml)")
    try:
        return yaml.safe_load(Path(path).read_text())["execution"]["config"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise LaionAssetsError(f"celery config {path}: no execution.config block ({e})") from None


def executor_for(kind: str, celery_config: str | None = None) -> ExecutorDefinition:
    if kind == "multiprocess":
        return multiprocess_executor
    if kind == "in_process":
        return in_process_executor
    if kind == "celery":
        from dagster_celery import celery_executor

        return celery_executor.configured(celery_settings(celery_config), name="celery")
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    raise LaionAssetsError(f"unknown executor '{kind}' (LAION_ASSETS_EXECUTOR): use one of {', '.join(EXECUTORS)}")
