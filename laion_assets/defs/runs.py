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
from dagster._core.execution.api import execute_run
from dagster._core.execution.execute_in_process import merge_run_tags
from dagster._core.remote_origin import ManagedGrpcPythonEnvCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
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
    with this process, for `recover_dead_runs` should it die."""
    run_id = make_new_run_id()
    tags = merge_run_tags(job, shard, process_tags(run_id), list(assets), instance, run_config)
    run = instance.create_run_for_job(
        job_def=job, run_id=run_id, run_config=run_config, tags=tags, asset_selection=frozenset(assets),
        remote_job_origin=origin(job.name),
    )
    return execute_run(InMemoryJob(job), run, instance)
