"""Infrastructure failures reach the user as one line naming the cause and the fix (CLI summary
and the step's failure in the UI), from real failures: a full disk (a small tmpfs), a deleted
data file, a corrupt one, an object store that refuses connections (127.0.0.1)."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from dagster import DagsterEventType, instance_for_test

from laion_assets.cli.pipeline import run_pipeline
from laion_assets.core import stages
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import InfrastructureError, explain
from laion_assets_tests.conftest import REPO, make_config, write_config
from laion_assets_tests.test_runs import cli_env, write_instance


def one_line(err) -> str:
    assert isinstance(err, InfrastructureError)
    text = str(err)
    assert "\n" not in text and len(text) < 400
    return text


def test_real_low_level_failures_are_named_with_their_fix(tmp_path):
    with pytest.raises(OSError) as full, open("/dev/full", "wb") as f:
        f.write(b"x" * 10)
        f.flush()
    assert one_line(explain(full.value)).startswith("no space left on device (")

    assert "permission denied" in one_line(explain(PermissionError(errno.EACCES, "Permission denied", "/lake/images")))

    lake = Lake(tmp_path / "lake")
    lake.publish_stream("t", "a", pa.RecordBatchReader.from_batches(
        pa.schema([("uid", pa.int64())]), [pa.record_batch([pa.array([1, 2], pa.int64())], names=["uid"])]))
    [data] = [Path(u) for u in lake.shard_files("t", "a")]
    data.write_bytes(data.read_bytes()[:20])
    with pytest.raises(Exception) as corrupt:
        list(lake.batches("t", "a", ["uid"]))
    assert one_line(explain(corrupt.value)).startswith("a data file is corrupt (")
    data.unlink()
    with pytest.raises(Exception) as missing:
        list(lake.batches("t", "a", ["uid"]))
    text = one_line(explain(missing.value))
    assert text.startswith("a file the lake lists is missing (") and "--force" in text

    store = Lake("s3://bucket/lake", {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1", "max_retries": "0", "timeout": "5s",
    })
    with pytest.raises(Exception) as refused:
        store.append("t", pa.table({"uid": pa.array([1], pa.int64())}), shard="a")
    text = one_line(explain(refused.value))
    assert text.startswith("object store error (") and "\x1b" not in text

    assert explain(ValueError("a bug of ours")) is None  # not infrastructure: the traceback stays


@pytest.mark.slow
def test_a_deleted_data_file_fails_the_stage_in_one_line_in_summary_and_ui(tmp_path, shard_rows):
    inputs = tmp_path / "input"
    inputs.mkdir()
    shard_rows.write_parquet(inputs / "shard-a.parquet")
    config = str(write_config(tmp_path / "config.yaml", make_config()))
    lake = str(tmp_path / "lake")
    with instance_for_test() as instance:
        run_pipeline([str(inputs)], lake, config, "raw_urls", instance=instance)
        for f in Lake(lake).shard_files(stages.RAW_URLS, "shard-a"):
            Path(f).unlink()  # deleted outside laion-assets
        summary = run_pipeline([str(inputs)], lake, config, "images", instance=instance)
        [line] = summary.lines
        assert line.status == "FAILED" and line.detail.startswith("a file the lake lists is missing (")
        assert line.detail.endswith("restore it, or redo the shard with `laion-assets run --force`")
        failure = instance.get_records_for_run(instance.get_runs(limit=1)[0].run_id, of_type=DagsterEventType.STEP_FAILURE).records
        assert failure[0].event_log_entry.dagster_event.step_failure_data.user_failure_data.description == line.detail


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", f"mkdir -p {tmp_path}/p && mount -t tmpfs -o size=1m none {tmp_path}/p"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_a_full_disk_is_one_line(tmp_path, shard_rows):
    """The lake on a 2 MiB tmpfs (its own mount namespace): raw_urls fits, the images do not."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs here (needs unshare and mount rights)")
    home = write_instance(tmp_path / "home")
    inputs = tmp_path / "input"
    inputs.mkdir()
    shard_rows.write_parquet(inputs / "shard-a.parquet")
    config = write_config(tmp_path / "config.yaml", make_config())
    lake = tmp_path / "lake"
    lake.mkdir()
    run = f"{sys.executable} -m laion_assets.cli run {inputs} --lake {lake} --config {config} --select raw_urls,images"
    full = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size=2m none {lake} && {run}"],
        env=cli_env(home), cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert full.returncode == 1, full.stdout + full.stderr
    [images] = [line for line in full.stdout.splitlines() if line.split()[1:3] == ["images", "FAILED"]]
    assert "no space left on device (" in images and "free disk space or put the lake on a larger volume" in images
