"""The Postgres instance as shipped (deploy/postgres/dagster.yaml): credentials from the
environment only, the run queue, pools, run monitoring and retries; the repo's own
dagster.yaml stays the sqlite instance of `make demo`."""

from __future__ import annotations

import uuid

from dagster import DagsterInstance

from laion_assets_tests.conftest import REPO


def test_the_shipped_postgres_instance_loads_with_credentials_from_the_environment(postgres, tmp_path, monkeypatch):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    db = postgres.create_database(f"inst_{uuid.uuid4().hex[:8]}")
    for key, value in postgres.env(db).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # its local artifacts go under ./data
    instance = DagsterInstance.from_config(str(REPO / "deploy/postgres"))
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        instance.add_dynamic_partitions("shards", ["a", "b"])
        assert instance.get_dynamic_partitions("shards") == ["a", "b"]
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 8
        assert instance.global_op_concurrency_default_limit == 1
        assert instance.run_monitoring_enabled and instance.run_retries_enabled
        assert not instance.run_retries_retry_on_asset_or_op_failure
    finally:
        instance.dispose()


def test_the_demo_instance_stays_sqlite(tmp_path, monkeypatch):
    from dagster._core.storage.runs import SqliteRunStorage

    monkeypatch.chdir(tmp_path)  # its storage is relative: data/dagster
    demo = DagsterInstance.from_config(str(REPO))
    try:
        assert isinstance(demo.run_storage, SqliteRunStorage)
    finally:
        demo.dispose()
