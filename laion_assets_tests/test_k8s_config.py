"""Kubernetes without a cluster: the instance the official Dagster chart renders from
deploy/helm/values.yaml loads with Dagster's own classes (Postgres storage for real, the
K8sRunLauncher, the run queue, pools), the code server the chart starts is our code location,
and a `gpu`-pool step becomes a Kubernetes Job that asks for a GPU."""

from __future__ import annotations

import tomllib
import uuid

import pytest
import yaml
from dagster import DagsterInstance, DagsterRun

from laion_assets.defs.definitions import build_defs
from laion_assets.defs.resources import Settings
from laion_assets_tests.conftest import REPO

VALUES = REPO / "deploy/helm/values.yaml"
RELEASE, NAMESPACE = "dagster", "laion"


def render_instance(values: dict) -> dict:
    """The dagster.yaml of the chart's `<release>-instance` ConfigMap for these values: the
    chart's templates/configmap-instance.yaml and helpers/instance/*.tpl (1.13), for the keys
    deploy/helm/values.yaml sets (`helm template` prints the same)."""
    pg = values["postgresql"]
    postgres = {"postgres_db": {
        "username": pg["postgresqlUsername"], "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": pg["postgresqlHost"], "db_name": pg["postgresqlDatabase"], "port": pg["service"]["port"],
        "params": pg["postgresqlParams"], **({"scheme": pg["postgresqlScheme"]} if pg.get("postgresqlScheme") else {}),
    }}
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    launcher = {
        "load_incluster_config": k8s["loadInclusterConfig"],
        **({"kubeconfig_file": k8s["kubeconfigFile"]} if k8s.get("kubeconfigFile") else {}),
        "job_namespace": k8s.get("jobNamespace") or NAMESPACE, "image_pull_policy": k8s["imagePullPolicy"],
        "service_account_name": RELEASE, "dagster_home": values["global"]["dagsterHome"],
        "instance_config_map": f"{RELEASE}-instance", "postgres_password_secret": values["global"]["postgresqlSecretName"],
        **({"env_config_maps": [c["name"] for c in k8s["envConfigMaps"]]} if k8s["envConfigMaps"] else {}),
        **({"env_secrets": [s["name"] for s in k8s["envSecrets"]]} if k8s["envSecrets"] else {}),
        **({"env_vars": k8s["envVars"]} if k8s["envVars"] else {}),
        **({"run_k8s_config": {"container_config": k8s["runK8sConfig"]["containerConfig"]}} if k8s.get("runK8sConfig") else {}),
    }
    daemon, queued = values["dagsterDaemon"], values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    monitoring, retries = daemon["runMonitoring"], daemon["runRetries"]
    logs = values["computeLogManager"]["config"]["s3ComputeLogManager"]
    concurrency = values["concurrency"]
    return {
        "scheduler": {"module": "dagster._core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": {"module": "dagster_postgres.schedule_storage", "class": "PostgresScheduleStorage", "config": postgres},
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": launcher},
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": postgres},
        "event_log_storage": {"module": "dagster_postgres.event_log", "class": "PostgresEventLogStorage", "config": postgres},
        "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"dequeue_interval_seconds": queued["dequeueIntervalSeconds"]}},
        "compute_logs": {"module": "dagster_aws.s3.compute_log_manager", "class": "S3ComputeLogManager",
                         "config": {"bucket": logs["bucket"], "prefix": logs["prefix"], "verify": True}},
        "run_monitoring": {
            "enabled": monitoring["enabled"], "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "max_resume_run_attempts": monitoring["maxResumeRunAttempts"], "poll_interval_seconds": monitoring["pollIntervalSeconds"],
            "free_slots_after_run_end_seconds": monitoring["freeSlotsAfterRunEndSeconds"],
        },
        "run_retries": {"enabled": retries["enabled"], "max_retries": retries["maxRetries"],
                        "retry_on_asset_or_op_failure": retries["retryOnAssetOrOpFailure"]},
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
        "concurrency": {
            "pools": {"default_limit": concurrency["pools"]["defaultLimit"], "granularity": concurrency["pools"]["granularity"]},
            "runs": {"max_concurrent_runs": concurrency["runs"]["maxConcurrentRuns"]},
        },
    }


@pytest.fixture
def values(tmp_path, postgres, monkeypatch):
    """The shipped values, pointed at the test's Postgres and, as for a daemon run outside the
    cluster, at a kubeconfig (no API server is contacted to load the launcher)."""
    db = postgres.create_database(f"k8s_{uuid.uuid4().hex[:8]}")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "test", "user": {"token": "unused"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))
    values = yaml.safe_load(VALUES.read_text())
    values["postgresql"].update(postgresqlHost="127.0.0.1", postgresqlUsername=postgres.user, postgresqlDatabase=db)
    values["postgresql"]["service"]["port"] = postgres.port
    values["runLauncher"]["config"]["k8sRunLauncher"].update(loadInclusterConfig=False, kubeconfigFile=str(kubeconfig))
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", postgres.password)  # the chart sets it from the secret
    return values


@pytest.fixture
def chart_instance(values, tmp_path):
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(render_instance(values)))
    instance = DagsterInstance.from_config(str(tmp_path))
    yield instance
    instance.dispose()


def test_the_rendered_instance_loads_with_postgres_the_k8s_launcher_and_the_queue(chart_instance):
    from dagster_k8s import K8sRunLauncher

    instance = chart_instance
    assert instance.get_runs_count() == 0  # Postgres tables created and readable
    instance.add_dynamic_partitions("shards", ["part-00000"])
    assert instance.get_dynamic_partitions("shards") == ["part-00000"]
    launcher = instance.run_launcher
    assert isinstance(launcher, K8sRunLauncher)
    assert launcher.job_namespace == NAMESPACE and launcher.env_secrets == ["laion-assets-aws"]
    assert launcher.supports_check_run_worker_health and launcher.supports_resume_run  # run monitoring works
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 64
    assert instance.global_op_concurrency_default_limit == 1
    assert type(instance.compute_log_manager).__name__ == "S3ComputeLogManager"
    assert instance.run_retries_enabled and not instance.run_retries_retry_on_asset_or_op_failure


def test_the_code_server_is_our_code_location_and_gpu_steps_ask_for_a_gpu(values, chart_instance):
    from dagster_k8s import k8s_job_executor
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config

    deployment = values["dagster-user-deployments"]["deployments"][0]
    module = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]["module_name"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", module]
    assert f'"{module}"' in (REPO / "deploy/Dockerfile").read_text()
    env = {e["name"]: e["value"] for e in deployment["env"]}
    defs = build_defs(Settings(lake=env["LAION_ASSETS_LAKE"], inputs=env["LAION_ASSETS_INPUT"], executor=env["LAION_ASSETS_EXECUTOR"]))
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def is k8s_job_executor

    launcher = chart_instance.run_launcher
    run = DagsterRun(job_name=job.name, run_id=str(uuid.uuid4()))
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"

    def step_pod(step: str):
        """The Kubernetes Job the k8s executor builds for a step (the calls of its launch_step)."""
        tags = next(n for n in job.nodes if n.name == step).definition.tags
        context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False).merge(
            K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags))
        )
        config = context.get_k8s_job_config(image, launcher)
        pod = construct_dagster_k8s_job(
            config, ["dagster", "api", "execute_step"], f"dagster-step-{step}", user_defined_k8s_config=context.run_k8s_config
        ).spec.template.spec
        return pod.containers[0].resources, [t.key for t in pod.tolerations or []]

    assert [n.name for n in job.nodes if n.definition.pool == "gpu"] == ["embeddings"]
    resources, tolerations = step_pod("embeddings")
    assert resources.limits == {"nvidia.com/gpu": "1"} and tolerations == ["nvidia.com/gpu"]
    assert resources.requests == {"cpu": "250m", "memory": "1Gi"}  # the run pod's requests, from the values
    resources, tolerations = step_pod("images")
    assert not resources.limits and tolerations == []
