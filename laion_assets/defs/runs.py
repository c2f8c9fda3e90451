"""Runs started outside the UI (`laion-assets run`, the demo): executed in this process, and
recorded as runs of the UI's code location, so the UI shows them like its own and can
re-execute them (Dagster re-executes a run through its recorded origin; a plain
`execute_in_process` run has none, and its "Re-execute" fails)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from dagster import AssetKey, DagsterInstance, JobDefinition
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.execution.api import create_execution_plan, execute_run
from dagster._core.execution.execute_in_process import merge_run_tags
from dagster._core.remote_origin import ManagedGrpcPythonEnvCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.snap import snapshot_from_execution_plan
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.utils import make_new_run_id

from laion_assets.defs.recovery import process_tags

# The code location of workspace.yaml and pyproject's [tool.dagster]; Definitions make one
# repository, which Dagster names like this.
LOCATION = "laion_assets"
MODULE = "laion_assets.defs.definitions"
REPOSITORY = "__repository__"


def origin(job_name: str) -> RemoteJobOrigin:
    """The origin a workspace.yaml `python_module` entry gives the UI's runs of `job_name`."""
    code = LoadableTargetOrigin(executable_path=sys.executable, module_name=MODULE, working_directory=os.getcwd())
    location = ManagedGrpcPythonEnvCodeLocationOrigin(code, location_name=LOCATION)
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, REPOSITORY), job_name)


def run_shard(
    instance: DagsterInstance, job: JobDefinition, shard: str | None, assets: Sequence[AssetKey],
    run_config: Mapping | None = None,
):
    """Materialize `assets` of one shard (None: of the lake-wide, unpartitioned job) with
    `job`, in this process; returns the result (its events, as for any run). The run is tagged
    with this process, for `recover_dead_runs` should it die. Like the jobs, it selects no
    checks: each stage records its own gate (defs/gate.py)."""
    run_id = make_new_run_id()
    tags = merge_run_tags(job, shard, process_tags(run_id), list(assets), instance, run_config)
    # create_run_for_job would subset the job again and so select every check of the assets
    job = job.get_subset(asset_selection=set(assets), asset_check_selection=set())
    plan = create_execution_plan(job, run_config=run_config, instance_ref=instance.get_ref() if instance.is_persistent else None, tags=tags)
    run = instance.create_run(
        job_name=job.name, run_id=run_id, run_config=run_config, op_selection=None, resolved_op_selection=None,
        asset_selection=frozenset(assets), asset_check_selection=frozenset(), step_keys_to_execute=plan.step_keys_to_execute,
        status=None, tags=tags, root_run_id=None, parent_run_id=None, job_snapshot=job.get_job_snapshot(),
        execution_plan_snapshot=snapshot_from_execution_plan(plan, job.get_job_snapshot_id()),
        parent_job_snapshot=job.get_parent_job_snapshot(), remote_job_origin=origin(job.name), job_code_origin=None,
        asset_graph=job.asset_layer.asset_graph,
    )
    return execute_run(InMemoryJob(job), run, instance)
