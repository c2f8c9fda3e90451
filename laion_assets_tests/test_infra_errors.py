"""Infrastructure failures reach the user as one line naming the cause and the fix (CLI summary
and the step's failure in the UI), from real failures: a full disk (a small tmpfs), a deleted
data file, a corrupt one, an object store that refuses connections (127.0.0.1)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from dagster import DagsterEventType, instance_for_test

from laion_assets.cli.pipeline import run_pipeline
from laion_assets.cli.shard_runs import RunSummary
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


def test_a_step_that_raises_the_low_level_error_is_recognised_too():
    """Exports and curation passes raise OSError and friends as they come; the CLI finds the
    one-line explanation in the step's error (or its cause) and stops the run with it."""
    from dagster._utils.error import serializable_error_info_from_exc_info

    from laion_assets.cli.shard_runs import infrastructure_error

    try:
        try:
            with open("/dev/full", "wb") as f:
                f.write(b"tar bytes")
                f.flush()
        except OSError as e:
            raise RuntimeError('Error occurred while executing op "webdataset_pretty"') from e
    except RuntimeError:
        info = serializable_error_info_from_exc_info(sys.exc_info())
    assert one_line(infrastructure_error(info)).startswith("no space left on device (")
    ours = info._replace(cls_name="LaionAssetsError", message="bad input: no such file or directory", cause=None)
    assert infrastructure_error(ours) is None  # our own one-line errors stay what they say


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
        summary = RunSummary()
        with pytest.raises(InfrastructureError) as stopped:  # the run stops: the next shard would fail too
            run_pipeline([str(inputs)], lake, config, "images", instance=instance, summary=summary)
        [line] = summary.lines
        assert str(stopped.value) == line.detail
        assert line.status == "FAILED" and line.detail.startswith("a file the lake lists is missing (")
        assert line.detail.endswith("restore it, or redo the shard with `laion-assets run --force`")
        failure = instance.get_records_for_run(instance.get_runs(limit=1)[0].run_id, of_type=DagsterEventType.STEP_FAILURE).records
        assert failure[0].event_log_entry.dagster_event.step_failure_data.user_failure_data.description == line.detail


class MountNamespace:
    """tmpfs mounts that only the commands run through it see (a mount namespace held by a
    sleeping process), so nothing is left mounted on the host whatever happens to the test."""

    def __init__(self, mounts: dict[Path, str]):  # folder: mount options
        script = " && ".join(f"mkdir -p {p} && mount -t tmpfs -o {options} none {p}" for p, options in mounts.items())
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{script} && echo mounted && exec sleep 600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        if self.holder.stdout.readline().strip() != "mounted":
            self.holder.wait()
            pytest.skip(f"cannot mount a tmpfs here (needs unshare and mount rights): {self.holder.stderr.read().strip()}")

    def run(self, cmd: str, env: dict, timeout: float = 300) -> tuple[subprocess.CompletedProcess, int]:
        """`cmd` in its own session; returns its outcome and the session id."""
        with subprocess.Popen(
            ["nsenter", "-t", str(self.holder.pid), "-m", "--", "sh", "-c", f"exec {cmd}"],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        ) as proc:
            out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


def _session_left(sid: int) -> list[str]:
    """Processes still alive in session `sid` (a run and the decode workers it started)."""
    left = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            left.append(Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100])
    return left


@pytest.mark.slow
def test_a_full_disk_during_download_or_publish_stops_the_run_in_one_line(tmp_path, shard_rows):
    """Staging on a 64 KiB tmpfs (full during the download), on a read-only one, then a new
    shard's published folder on a 4 KiB one (full during the publish): each run exits 2 within
    seconds with the one line, no process left, the published shard untouched; once there is
    room the same command finishes the shard."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs unshare and nsenter (util-linux)")
    home = write_instance(tmp_path / "home")
    inputs = tmp_path / "input"
    inputs.mkdir()
    shard_rows.write_parquet(inputs / "shard-a.parquet")
    config = write_config(tmp_path / "config.yaml", make_config())
    lake = tmp_path / "lake"
    cli = f"{sys.executable} -m laion_assets.cli run {{}} --lake {lake} --config {config} --select raw_urls,images"
    env = cli_env(home)
    first = subprocess.run(cli.format(inputs / "shard-a.parquet").split(), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    published = Lake(str(lake)).read_shard(stages.IMAGES, "shard-a")
    shard_rows.write_parquet(inputs / "shard-b.parquet")

    staged, published_b = lake / "_staging" / "images" / "shard=shard-b", lake / "images" / "shard=shard-b"
    for where, options, cause in (
        (staged, "size=64k", "no space left on device ("), (staged, "ro,size=64k", "permission denied or read-only file system ("),
        (published_b, "size=4k", "no space left on device ("),
    ):
        ns = MountNamespace({where: options})
        try:
            started = time.monotonic()
            full, sid = ns.run(cli.format(inputs / "shard-b.parquet"), env)
            took = time.monotonic() - started
            left = _session_left(sid)
        finally:
            ns.close()
        assert full.returncode == 2, full.stdout + full.stderr
        line = full.stderr.strip().splitlines()[-1]  # after the run log (Dagster logs to stderr)
        assert line.startswith(f"error: {cause}") and line.endswith(("then rerun: finished chunks are kept", "pass --lake with one you can write")), line
        assert "Traceback" not in full.stdout + full.stderr and "never retrieved" not in full.stdout + full.stderr
        assert took < 60, took
        assert not left, left
        assert Lake(str(lake)).read_shard(stages.IMAGES, "shard-a").equals(published)
        assert "shard-b" not in Lake(str(lake)).scan(stages.IMAGES).select("shard").unique().collect()["shard"].to_list()

    again = subprocess.run(cli.format(inputs / "shard-b.parquet").split(), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert Lake(str(lake)).read_shard(stages.IMAGES, "shard-b").height == published.height
