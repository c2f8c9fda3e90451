"""Messages name the real cause, as a new user meets them: a failed images gate says which
statuses failed it and what to change, a kNN index over 0 rows says so, and SIGTERM at any
moment (imports included, or a lake-wide pass) ends in exit 130 with the interrupted line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from laion_assets.core import stages
from laion_assets.core.exports.knn import sync_index
from laion_assets.core.images.config import DownloadConfig
from laion_assets.core.images.download import STATUS_FIXES, STATUSES
from laion_assets.core.ingest import registry
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError, ValidationFailed
from laion_assets.core.lake.tables import embeddings_table, subset_table
from laion_assets.core.subsets.rules import SubsetConfig
from laion_assets_tests.conftest import REPO, make_config, write_config
from laion_assets_tests.test_runs import cli_env, write_instance


def test_every_failure_status_has_a_fix():
    assert set(STATUS_FIXES) == set(STATUSES) - {"success"}


def test_a_failed_images_gate_names_the_statuses_and_their_fix(tmp_path, shard_rows):
    """The usual first-run mistake on a local server: download.allowed_networks left out."""
    lake = Lake(tmp_path / "lake")
    path = tmp_path / "local.parquet"
    shard_rows.head(20).write_parquet(path)
    registry.register(lake, [str(path)])
    stages.run_raw_urls(lake, make_config(), "local")
    cfg = make_config(download=DownloadConfig(retries=0, min_success_rate=0.5))  # 127.0.0.1 not allowed
    with pytest.raises(ValidationFailed) as e:
        stages.run_images(lake, cfg, "local")
    n = lake.read_shard(stages.RAW_URLS, "local").height
    assert f"(is_success): {n} unexpected of {n}" in str(e.value), str(e.value)
    assert f"not stored: refused_address {n} of {n} (the hosts resolve to private or local addresses: add their networks to download.allowed_networks" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_knn_index_over_0_rows_says_so(tmp_path):
    """Every image failed: embeddings and the subset were materialized with 0 rows."""
    lake = Lake(tmp_path / "lake")
    cfg = make_config(subsets=(SubsetConfig(name="all"),))
    empty = {"uid": pa.array([], pa.int64()), "image_embedding": pa.array([], pa.binary())}
    lake.publish_stream(embeddings_table("tiny"), "s", pa.RecordBatchReader.from_batches(pa.schema([(k, v.type) for k, v in empty.items()]), [pa.record_batch(list(empty.values()), names=list(empty))]))
    lake.publish_stream(subset_table("all"), "s", pa.RecordBatchReader.from_batches(pa.schema([("uid", pa.int64())]), [pa.record_batch([empty["uid"]], names=["uid"])]))
    with pytest.raises(LaionAssetsError) as e:
        sync_index(lake, cfg, "all")
    assert str(e.value).startswith("embeddings/tiny holds 0 rows (materialized, but no shard has a stored image yet): nothing to index")


def _run(cmd: list[str], home, until=None, delay: float | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Start the CLI, SIGTERM it `delay` s after the start or once a stdout line starts with
    `until`; returns its outcome and the seconds from the signal to its exit."""
    proc = subprocess.Popen(cmd, env=cli_env(home), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    if delay is not None:
        time.sleep(delay)
    else:
        for line in proc.stdout:
            out.append(line)
            if line.startswith(until):
                break
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    rest, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out) + rest, err), time.monotonic() - sent


@pytest.mark.parametrize("delay", [0.6, 0.9, 1.2, 1.4, 1.7, 2.0, 2.4])
def test_sigterm_while_starting_exits_130_with_the_interrupted_line(tmp_path, delay):
    """Within the first seconds the CLI is importing Dagster, polars, GX: a SIGTERM there used
    to end it silently with 143."""
    path = tmp_path / "part-1.csv"
    path.write_text("URL,TEXT\nhttps://a.example/1.jpg,one\n")
    cmd = [sys.executable, "-m", "laion_assets.cli", "run", str(path), "--lake", str(tmp_path / "lake"), "--select", "raw_urls"]
    done, took = _run(cmd, write_instance(tmp_path / "home"), delay=delay)
    if done.returncode == 0:
        pytest.skip(f"the run was over before {delay} s")
    assert done.returncode == 130, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("interrupted"), done.stderr
    assert "Traceback" not in done.stderr and took < 10


def test_a_sigterm_that_python_wraps_while_defining_a_class_still_exits_130(tmp_path, monkeypatch, capsys):
    """Seen in CI: the SIGTERM landed in a `__set_name__` of a Dagster class being imported, and
    Python 3.11 turned its KeyboardInterrupt into "RuntimeError: Error calling __set_name__"."""
    import laion_assets.cli as cli
    from laion_assets.cli import pipeline

    class Stops:
        def __set_name__(self, owner, name):
            signal.raise_signal(signal.SIGTERM)

    def importing_dagster(args):
        type("RemoteWorkspaceAssetNode", (), {"key": Stops()})
        return 0

    monkeypatch.setattr(pipeline, "cmd_run", importing_dagster)
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(["run", str(tmp_path / "part-1.csv"), "--lake", str(tmp_path / "lake")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is handler  # given back as it was found


@pytest.mark.slow
def test_an_interrupted_lake_wide_pass_is_named(tmp_path, shard_rows):
    path = tmp_path / "part-1.parquet"
    shard_rows.head(10).write_parquet(path)
    config = write_config(tmp_path / "config.yaml", make_config())
    cmd = [sys.executable, "-m", "laion_assets.cli", "run", str(path), "--lake", str(tmp_path / "lake"), "--config", str(config),
           "--select", "curation/duplicates,lake_summary"]
    done, took = _run(cmd, write_instance(tmp_path / "home"), until="lake: running")
    assert done.returncode == 130, done.stdout + done.stderr
    lines = [line.split() for line in done.stdout.split("per-stage summary (interrupted):")[1].splitlines() if line.strip()]
    named = {(w[0], w[1]) for w in lines if len(w) > 3 and w[2] in ("interrupted", "FAILED") and "interrupted" in w[3:]}
    assert {("(lake)", "curation/duplicates"), ("(lake)", "lake_summary")} <= named, done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("interrupted: rerun the same command to resume")
    assert took < 30
