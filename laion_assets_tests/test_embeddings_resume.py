"""A killed embeddings run resumes: `kill -9` after a staged chunk, restart, no chunk recomputed,
exactly one row per successful image.

The stage runs in a fresh Python interpreter (subprocess: exec, never a fork of this process,
which has deltalake loaded). The runner counts the images it encodes on stdout.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from laion_assets.core import stages
from laion_assets.core.lake import Lake
from laion_assets_tests.conftest import REPO

SHARD = "part-00000"
SUCCESS, FAILED, CHUNK = 21, 3, 8

RUNNER = textwrap.dedent(
    """
    import logging, os, sys, time
    sys.path.insert(0, {repo!r})
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
    from laion_assets.core import stages
    from laion_assets.core.clip import Encoder, load_model
    from laion_assets.core.config import EmbeddingConfig, PipelineConfig
    from laion_assets.core.lake import Lake

    delay = float(os.environ.get("EMBED_DELAY_S", "0"))
    cfg = PipelineConfig(embeddings=EmbeddingConfig(model="tiny", batch_size=4, chunk_rows={chunk}, workers=1))

    class CountingEncoder(Encoder):
        def images(self, blobs):
            blobs = list(blobs)
            out = super().images(blobs)
            print(f"ENCODED {{len(blobs)}}", flush=True)
            time.sleep(delay)  # slow chunks: the test kills us inside the second one
            return out

    out = stages.run_embeddings(Lake(sys.argv[1]), cfg, sys.argv[2],
                                lambda: CountingEncoder(load_model(cfg.embeddings), 4, 1))
    print(f"DONE {{out.rows}}", flush=True)
    """
)


def _jpeg(rng: np.random.Generator) -> bytes:
    arr = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _prepare(lake: Lake) -> list[int]:
    rng = np.random.default_rng(7)
    n = SUCCESS + FAILED
    uids = [int(u) for u in rng.choice(2**40, n, replace=False)]
    ok = uids[:SUCCESS]
    lake.publish_shard(stages.RAW_URLS, SHARD, pa.table({
        "uid": pa.array(uids, pa.int64()),
        "url": [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
        "caption": [None if i % 5 == 0 else f"a photo number {i}" for i in range(n)],
    }))
    lake.publish_shard(stages.IMAGES, SHARD, pa.table({
        "uid": pa.array(uids, pa.int64()),
        "status": ["success"] * SUCCESS + ["failed_download"] * FAILED,
        "image": pa.array([_jpeg(rng) for _ in ok] + [None] * FAILED, pa.binary()),
    }))
    return ok


def _start(script: Path, lake: Lake, delay: float) -> subprocess.Popen:
    env = {**os.environ, "EMBED_DELAY_S": str(delay), "AWS_EC2_METADATA_DISABLED": "true", "GX_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen(
        [sys.executable, str(script), lake.uri, SHARD], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, cwd=REPO,
    )


@pytest.mark.slow
def test_kill_9_then_resume_recomputes_nothing_staged(tmp_path):
    lake = Lake(tmp_path / "lake")
    ok = _prepare(lake)
    script = tmp_path / "run_embeddings.py"
    script.write_text(RUNNER.format(repo=str(REPO), chunk=CHUNK))

    # run 1: killed (SIGKILL, no cleanup) once its first chunk is committed to staging
    proc = _start(script, lake, delay=3.0)
    lines, deadline = [], time.monotonic() + 120
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if f"embedded {CHUNK}/{SUCCESS}" in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "\n".join(lines)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "\n".join(lines)
    assert not any(line.startswith("DONE") for line in lines)
    staged = lake.read_shard(stages.STAGING_EMBEDDINGS, SHARD)
    assert staged.height == CHUNK, "exactly the first chunk was committed before the kill"
    staged_version = lake.table(stages.STAGING_EMBEDDINGS).version()
    assert not lake.exists(stages.EMBEDDINGS)

    # run 2: resumes, encodes only what was not staged, publishes, clears staging
    proc = _start(script, lake, delay=0.0)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    encoded = sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("ENCODED"))
    assert f"{CHUNK} embeddings resumed, {SUCCESS - CHUNK} to compute" in out
    assert encoded == SUCCESS - CHUNK, out
    assert f"DONE {SUCCESS}" in out

    final = lake.read_shard(stages.EMBEDDINGS, SHARD)
    assert final.height == SUCCESS
    assert final["uid"].n_unique() == SUCCESS
    assert sorted(final["uid"].to_list()) == sorted(ok)
    # the staged rows were published as staged, not recomputed
    kept = final.filter(final["uid"].is_in(staged["uid"].to_list())).sort("uid")
    staged = staged.sort("uid")
    assert kept["image_embedding"].to_list() == staged["image_embedding"].to_list()
    assert kept["text_embedding"].to_list() == staged["text_embedding"].to_list()
    # run 2 appended the remaining chunks on top of run 1's, then cleared the shard's staging
    assert lake.table(stages.STAGING_EMBEDDINGS).version() > staged_version
    assert lake.shard_row_count(stages.STAGING_EMBEDDINGS, SHARD) == 0
