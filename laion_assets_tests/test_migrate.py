"""A lake built before embedding spaces (one `embeddings` table) is moved to
`embeddings/<space>` without recomputing anything, and the later stages read it."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from laion_assets.cli import main
from laion_assets.core import stages
from laion_assets.core.embeddings import vectors
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.lake.migrate import migrate_embeddings
from laion_assets_tests.conftest import make_config, write_config


def _old_lake(tmp_path) -> tuple[Lake, np.ndarray]:
    lake = Lake(tmp_path / "lake")
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(6, 512)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    uids = pa.array(range(6), pa.int64())
    lake.publish_shard(stages.IMAGES, "s1", pa.table({"uid": uids, "status": ["success"] * 6}))
    for shard in ("s1", "s2"):
        lake.publish_shard("embeddings", shard, pa.table({
            "uid": uids, "image_embedding": vectors.to_column(vecs, "float16"),
            "text_embedding": vectors.to_column(vecs, "float16"), "similarity": pa.array([1.0] * 6, pa.float32()),
            "embedding_space": ["tiny/random-seed0"] * 6,
        }))
    lake.append("_staging/embeddings", pa.table({"uid": uids, "recipe": ["x"] * 6}), shard="s3")
    return lake, vecs


def test_old_embeddings_table_moves_under_its_space_and_is_read(tmp_path):
    lake, vecs = _old_lake(tmp_path)
    before = lake.table("embeddings").version()
    result = migrate_embeddings(lake, "tiny", "tiny/random-seed0")
    assert result == {"moved": True, "table": lake.table_uri("embeddings/tiny"), "rows": 12}
    moved = lake.table(stages.embeddings_table("tiny"))
    assert moved.version() == before  # the same table, history and all, not a copy of its rows
    assert not lake.exists("_staging/embeddings") and "embeddings" not in lake.tables()
    got = pl.read_delta(lake.table_uri("embeddings/tiny")).filter(shard="s1").sort("uid")
    np.testing.assert_allclose(vectors.from_column(got["image_embedding"]), vecs, atol=1e-3)
    # the scores stage reads the moved table as its head's space
    out = stages.run_scores(lake, make_config(), "s1")
    assert out.rows == 6
    assert migrate_embeddings(lake, "tiny", "tiny/random-seed0")["moved"] is False  # idempotent


def test_wrong_space_is_refused_unless_forced(tmp_path):
    lake, _ = _old_lake(tmp_path)
    with pytest.raises(LaionAssetsError, match="holds tiny/random-seed0 vectors, but space 'l14' is ViT-L-14/openai"):
        migrate_embeddings(lake, "l14", "ViT-L-14/openai")
    assert lake.exists("embeddings")  # untouched
    assert migrate_embeddings(lake, "l14", "ViT-L-14/openai", force=True)["moved"]


def test_interrupted_migration_is_finished_by_running_it_again(tmp_path):
    lake, _ = _old_lake(tmp_path)
    root = tmp_path / "lake"
    (root / "_migrating").mkdir()
    (root / "embeddings").rename(root / "_migrating" / "embeddings")  # killed after parking
    assert migrate_embeddings(lake, "tiny", "tiny/random-seed0")["rows"] == 12


def test_cli_migrate_embeddings(tmp_path, capsys):
    lake, _ = _old_lake(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", make_config())
    assert main(["migrate-embeddings", "--space", "tiny", "--lake", lake.uri, "--config", str(cfg)]) == 0
    assert "moved the embeddings table to" in capsys.readouterr().out
    from laion_assets.core.stages import fingerprints  # moved, not made: a later run does not embed them again

    config = make_config()
    assert fingerprints.plan(lake, config, ["embeddings/tiny"], "s1")["embeddings/tiny"] is not None
    assert main(["migrate-embeddings", "--space", "tiny", "--lake", str(tmp_path / "empty"), "--config", str(cfg)]) == 2
    assert "nothing to migrate" in capsys.readouterr().err
