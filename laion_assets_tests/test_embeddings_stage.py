"""The embeddings stage in a real process: a killed run resumes (`kill -9` after a staged chunk,
restart, no chunk recomputed, exactly one row per successful image), and memory stays bounded
whatever the shard size.

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
from laion_assets.core.lake.delta import Lake
from laion_assets_tests.conftest import REPO

SHARD = "part-00000"
SUCCESS, FAILED, CHUNK = 21, 3, 8

RUNNER = textwrap.dedent(
    """
    import logging, os, sys, time
    sys.path.insert(0, {repo!r})
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
    from laion_assets.core import stages
    from laion_assets.core.embeddings.encoder import Encoder
    from laion_assets.core.embeddings.clip import load_model
    from laion_assets.core.embeddings.config import EmbeddingConfig, SpaceConfig
    from laion_assets.core.config import PipelineConfig
    from laion_assets.core.lake.delta import Lake

    delay = float(os.environ.get("EMBED_DELAY_S", "0"))
    cfg = PipelineConfig(embeddings=EmbeddingConfig(spaces={{"tiny": SpaceConfig(model="tiny")}}, batch_size=4, chunk_rows={chunk}, workers=1))

    class CountingEncoder(Encoder):
        def encode(self, blobs):
            blobs = list(blobs)
            out = super().encode(blobs)
            print(f"ENCODED {{len(blobs)}}", flush=True)
            time.sleep(delay)  # slow chunks: the test kills us inside the second one
            return out

    out = stages.run_embeddings(Lake(sys.argv[1]), cfg, sys.argv[2],
                                lambda spaces: CountingEncoder([load_model(cfg.embeddings.spaces[s]) for s in spaces], 4, 1))
    print(f"DONE {{out['tiny'].rows}}", flush=True)
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
    staged = lake.read_shard(stages.staging_embeddings("tiny"), SHARD)
    assert staged.height == CHUNK, "exactly the first chunk was committed before the kill"
    staged_version = lake.table(stages.staging_embeddings("tiny")).version()
    assert not lake.exists(stages.embeddings_table("tiny"))

    # run 2: resumes, encodes only what was not staged, publishes, clears staging
    proc = _start(script, lake, delay=0.0)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    encoded = sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("ENCODED"))
    assert f"{CHUNK} images resumed in every space, {SUCCESS - CHUNK} to compute" in out
    assert encoded == SUCCESS - CHUNK, out
    assert f"DONE {SUCCESS}" in out

    final = lake.read_shard(stages.embeddings_table("tiny"), SHARD)
    assert final.height == SUCCESS
    assert final["uid"].n_unique() == SUCCESS
    assert sorted(final["uid"].to_list()) == sorted(ok)
    # the staged rows were published as staged, not recomputed
    kept = final.filter(final["uid"].is_in(staged["uid"].to_list())).sort("uid")
    staged = staged.sort("uid")
    assert kept["image_embedding"].to_list() == staged["image_embedding"].to_list()
    assert kept["text_embedding"].to_list() == staged["text_embedding"].to_list()
    # run 2 appended the remaining chunks on top of run 1's, then cleared the shard's staging
    assert lake.table(stages.staging_embeddings("tiny")).version() > staged_version
    assert lake.shard_row_count(stages.staging_embeddings("tiny"), SHARD) == 0


class _Interrupted(Exception):
    pass


def _crashing_encoder(towers, encoded: list[int], fail_after: int | None):
    """An Encoder (batches of 4, one worker) that records each batch's size in `encoded` and
    raises _Interrupted, as a crash, once `fail_after` images were encoded."""
    from laion_assets.core.embeddings.encoder import Encoder

    class CrashingEncoder(Encoder):
        def encode(self, blobs):
            blobs = list(blobs)
            if fail_after is not None and sum(encoded) >= fail_after:
                raise _Interrupted
            encoded.append(len(blobs))
            return super().encode(blobs)

    return CrashingEncoder(towers, 4, 1)


def test_staged_chunks_are_reused_only_for_the_same_images(tmp_path):
    """A run that stopped after its first chunk is resumed from staging; but when the images
    shard was published again in between (a new download may bring other bytes under the same
    uids), the staged vectors are dropped and every image is embedded anew."""
    from laion_assets.core.config import PipelineConfig
    from laion_assets.core.embeddings.clip import load_model
    from laion_assets.core.embeddings.config import EmbeddingConfig, SpaceConfig

    cfg = PipelineConfig(embeddings=EmbeddingConfig(spaces={"tiny": SpaceConfig(model="tiny")}, batch_size=4, chunk_rows=CHUNK, workers=1))
    model = load_model(cfg.embeddings.spaces["tiny"])
    encoded: list[int] = []

    def run(fail_after=None):  # fail_after=CHUNK: a crash after the first staged chunk
        return stages.run_embeddings(lake, cfg, SHARD, lambda spaces: _crashing_encoder(model, encoded, fail_after))["tiny"]

    lake = Lake(tmp_path / "lake")
    ok = _prepare(lake)
    with pytest.raises(_Interrupted):
        run(fail_after=CHUNK)
    assert lake.shard_row_count(stages.staging_embeddings("tiny"), SHARD) == CHUNK
    run()  # same images: only the rest is embedded
    assert sum(encoded) == SUCCESS

    encoded.clear()
    with pytest.raises(_Interrupted):
        run(fail_after=CHUNK)
    _prepare(lake)  # the images shard is published again
    out = run()
    assert sum(encoded) == CHUNK + SUCCESS, "staged vectors of the replaced images were not reused"
    final = lake.read_shard(stages.embeddings_table("tiny"), SHARD)
    assert out.rows == final.height == final["uid"].n_unique() == len(ok)


def _flip_bits(path: Path, column: str, rows: int) -> None:
    """One bit flipped in the value of `column` in each of the first `rows` rows of a staged
    file, which stays a valid parquet file: what a disk or a copy can do without a reader
    noticing (a float16 element off by a little, the norm still within the gate's tolerance)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    col = table[column].combine_chunks()
    if pa.types.is_binary(col.type):
        cells = col.to_pylist()
        flipped = [bytes([c[0] ^ 0x01]) + c[1:] if i < rows else c for i, c in enumerate(cells)]
        values = pa.array(flipped, pa.binary())
    else:
        raw = col.to_numpy().copy()
        raw.view(np.uint32)[:rows] ^= 1
        values = pa.array(raw, col.type)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, values), path)


@pytest.mark.parametrize("tower, table, column", [
    ("tiny", stages.staging_embeddings("tiny"), "image_embedding"),
    ("watermark", "_staging/watermark", "pwatermark"),
])
def test_bits_flipped_in_staging_after_a_kill_are_recomputed_not_published(tmp_path, caplog, tower, table, column):
    """A run stops after its first staged chunk; six bits are flipped in the staged vectors (or
    pwatermark). The rerun finds them by their checksum, drops that staging with a warning,
    computes the shard again, and publishes exactly what an uninterrupted run publishes."""
    from laion_assets.core.config import PipelineConfig
    from laion_assets.core.embeddings.clip import load_model
    from laion_assets.core.embeddings.config import EmbeddingConfig, SpaceConfig
    from laion_assets.core.scores import watermark
    from laion_assets.core.scores.config import WatermarkConfig

    cfg = PipelineConfig(embeddings=EmbeddingConfig(spaces={"tiny": SpaceConfig(model="tiny")}, batch_size=4, chunk_rows=CHUNK, workers=1),
                         watermark=WatermarkConfig(model="tiny"))
    towers = [load_model(cfg.embeddings.spaces["tiny"]), watermark.load(cfg.watermark, torch_device())]
    encoded: list[int] = []

    def run(lake, fail_after=None):  # fail_after=CHUNK: a kill after the first staged chunk
        def factory(names):
            return _crashing_encoder([towers[0] if n == "tiny" else towers[1] for n in names], encoded, fail_after)
        return stages.run_embeddings(lake, cfg, SHARD, factory, watermark=True)

    reference = Lake(tmp_path / "reference")
    _prepare(reference)
    run(reference)
    lake = Lake(tmp_path / "lake")
    _prepare(lake)
    encoded.clear()
    with pytest.raises(_Interrupted):
        run(lake, fail_after=CHUNK)
    [path] = [Path(u) for u in lake.shard_files(table, SHARD)]
    _flip_bits(path, column, 6)

    encoded.clear()
    out = run(lake)
    assert "do not match the checksum taken when they were staged" in caplog.text and "dropped and recomputed" in caplog.text
    assert out["tiny"].rows == out["watermark"].rows == SUCCESS
    assert sum(encoded) > SUCCESS - CHUNK, "the damaged tower was computed again"
    for name in (stages.embeddings_table("tiny"), stages.WATERMARK):
        got, want = (lk.read_shard(name, SHARD).sort("uid").drop("shard") for lk in (lake, reference))
        assert got.equals(want), f"{name}: published what was damaged"
    assert lake.shard_row_count(table, SHARD) == 0


def torch_device():
    import torch

    return torch.device("cpu")


def test_two_spaces_in_one_pass_decode_each_image_once(tmp_path, monkeypatch):
    """Two spaces (two different tiny models: 512-d and 768-d) computed in one run: every image
    is decoded once, each space gets its own table with its own identity, and each space's
    vectors are exactly what that model computes alone."""
    from laion_assets.core.config import PipelineConfig
    from laion_assets.core.embeddings import encoder, vectors
    from laion_assets.core.embeddings.clip import load_model
    from laion_assets.core.embeddings.config import EmbeddingConfig, SpaceConfig
    from laion_assets.core.embeddings.encoder import Encoder

    spaces = {"b32": SpaceConfig(model="tiny"), "l14": SpaceConfig(model="tiny-l")}
    cfg = PipelineConfig(embeddings=EmbeddingConfig(spaces=spaces, batch_size=4, chunk_rows=CHUNK, workers=1), subsets=())
    models = {name: load_model(sp) for name, sp in spaces.items()}
    lake = Lake(tmp_path / "lake")
    ok = _prepare(lake)
    decoded = []
    decode = encoder._decode
    monkeypatch.setattr(encoder, "_decode", lambda blob: decoded.append(1) or decode(blob))

    out = stages.run_embeddings(lake, cfg, SHARD, lambda names: Encoder([models[n] for n in names], 4, 1))
    assert len(decoded) == SUCCESS, "each image decoded once for both spaces"
    assert {name: o.rows for name, o in out.items()} == {"b32": SUCCESS, "l14": SUCCESS}

    images = lake.read_shard(stages.IMAGES, SHARD).filter(status="success")
    for name, dim in (("b32", 512), ("l14", 768)):
        table = lake.read_shard(stages.embeddings_table(name), SHARD)
        assert sorted(table["uid"].to_list()) == sorted(ok)
        assert table["embedding_space"].unique().to_list() == [spaces[name].identity]
        got = table.join(images.select("uid", "image"), on="uid")
        alone = Encoder(models[name], 4, 1).images(got["image"].to_list())
        vec = vectors.from_column(got["image_embedding"])
        assert vec.shape == (SUCCESS, dim)
        np.testing.assert_allclose(vec, alone, atol=2e-3)  # float16 storage


MEMORY_RUNNER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from laion_assets.core import stages
    from laion_assets.core.embeddings.encoder import Encoder
    from laion_assets.core.embeddings.clip import load_model
    from laion_assets.core.embeddings.config import EmbeddingConfig, SpaceConfig
    from laion_assets.core.config import PipelineConfig
    from laion_assets.core.lake.delta import Lake

    cfg = PipelineConfig(embeddings=EmbeddingConfig(spaces={{"tiny": SpaceConfig(model="tiny")}}, batch_size=32, chunk_rows=256, workers=2))
    encoder = Encoder(load_model(cfg.embeddings.spaces["tiny"]), 32, 2)
    encoder.images([open(sys.argv[3], "rb").read()] * 4)  # warm: allocator pools, thread pool

    def status_kb(key):
        line = next(x for x in open("/proc/self/status") if x.startswith(key))
        return int(line.split()[1])

    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status_kb("VmRSS:")
    out = stages.run_embeddings(Lake(sys.argv[1]), cfg, sys.argv[2], lambda spaces: encoder)["tiny"]
    print(f"ROWS {{out.rows}} GROWTH_KB {{status_kb('VmHWM:') - before}}", flush=True)
    """
)


# Allocators told to hand freed memory back at once (glibc, arrow's pool on glibc, polars'
# jemalloc), so the peak RSS follows live memory rather than what allocators keep cached.
LIVE_MEMORY_ENV = {
    "ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "0",
    "_RJEM_MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0",
}


def _noise_jpegs(k: int) -> list[bytes]:
    """Incompressible JPEGs of ~40 KB, about what the images table holds per row."""
    rng = np.random.default_rng(3)
    out = []
    for _ in range(k):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (160, 192, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def _unique(blob: bytes, uid: int) -> bytes:
    """A distinct cell per row (decoders stop at the JPEG's end marker), so neither parquet
    dictionaries nor polars' binary views can share the bytes of equal images."""
    return blob + uid.to_bytes(8, "little")


def _peak_growth_mb(tmp_path: Path, rows: int, blobs: list[bytes]) -> float:
    lake = Lake(tmp_path / f"lake-{rows}")
    uids = pa.array(range(1, rows + 1), pa.int64())
    lake.publish_shard(stages.RAW_URLS, SHARD, pa.table({
        "uid": uids, "url": [f"http://127.0.0.1/{i}.jpg" for i in range(rows)], "caption": [f"photo {i}" for i in range(rows)],
    }))
    lake.publish_shard(stages.IMAGES, SHARD, pa.table({
        "uid": uids, "status": ["success"] * rows, "image": pa.array([_unique(blobs[i % len(blobs)], i) for i in range(rows)], pa.binary()),
    }))
    script, sample = tmp_path / "memory.py", tmp_path / "sample.jpg"
    script.write_text(MEMORY_RUNNER.format(repo=str(REPO)))
    sample.write_bytes(blobs[0])
    env = {**os.environ, **LIVE_MEMORY_ENV, "AWS_EC2_METADATA_DISABLED": "true", "GX_ANALYTICS_ENABLED": "False"}
    proc = subprocess.run([sys.executable, str(script), lake.uri, SHARD, str(sample)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ROWS"))
    assert line.split()[1] == str(rows)
    assert lake.shard_row_count(stages.embeddings_table("tiny"), SHARD) == rows
    return int(line.split()[3]) / 1024


@pytest.mark.slow
def test_memory_does_not_grow_with_the_shard(tmp_path):
    """A 6x larger shard (1024 vs 6144 distinct JPEGs of ~37 KB: 37 vs 222 MB of image bytes)
    needs no more memory: images are read a record batch at a time and embedded chunk by chunk,
    and the staged vectors are audited and published as a stream. Reading the shard whole (as
    this stage once did) grows the peak by about the 185 MB of extra image bytes."""
    blobs = _noise_jpegs(64)
    small = _peak_growth_mb(tmp_path, 1024, blobs)
    large = _peak_growth_mb(tmp_path, 6144, blobs)
    assert large - small < 60, f"peak RSS growth: {small:.0f} MB for 1024 rows, {large:.0f} MB for 6144"
