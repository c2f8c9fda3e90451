"""Adopting LAION's published embeddings (parquet_npy): raw_urls and embeddings/<space> from the
files a lab already holds, checked the way the embeddings gate checks computed vectors, and
read identically by embedding-reader, the library LAION's own tools read them with."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from embedding_reader import EmbeddingReader

from laion_assets.cli import main
from laion_assets.core.embeddings import vectors
from laion_assets.core.embeddings.config import EmbeddingConfig, SpaceConfig
from laion_assets.core.embeddings.published import find_parts
from laion_assets.core.ingest import registry
from laion_assets.core.ingest.reader import laion_uid
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.stages import RAW_URLS, run_raw_urls
from laion_assets.core.stages.adopt import run_adopted_embeddings
from laion_assets_tests.conftest import make_config, write_config
from laion_assets_tests.published import write_parquet_npy

L14 = {"l14": SpaceConfig(model="ViT-L-14", pretrained="openai", adopted=True)}


def adopt_config(**overrides):
    return make_config(embeddings=EmbeddingConfig(spaces=L14), scores=make_config().scores.model_copy(update={"heads": {}}), subsets=(), **overrides)


def adopt(lake: Lake, cfg, root) -> list[str]:
    """The stages `adopt-embeddings` runs per shard, called directly."""
    keys = list(registry.register(lake, sorted(str(p) for p in (root / "metadata").glob("*.parquet"))))
    for key in keys:
        run_raw_urls(lake, cfg, key)
        run_adopted_embeddings(lake, cfg, key, "l14")
    return keys


def reader_vectors(root, folder: str = "img_emb") -> tuple[np.ndarray, pl.DataFrame]:
    """Every vector and its metadata, in embedding-reader's order."""
    reader = EmbeddingReader(
        embeddings_folder=str(root / folder), metadata_folder=str(root / "metadata"), meta_columns=["URL", "TEXT"], file_format="parquet_npy",
    )
    embs, metas = zip(*reader(batch_size=reader.count, show_progress=False))
    return np.concatenate(embs), pl.from_pandas(pd_concat(metas))


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("text", [True, False], ids=["with_text", "without_text"])
def test_adopted_vectors_are_embedding_readers_in_the_same_order(tmp_path, text):
    root = tmp_path / "laion"
    written = write_parquet_npy(root, [300, 250, 120], text=text)
    lake, cfg = Lake(tmp_path / "lake"), adopt_config()
    keys = adopt(lake, cfg, root)
    assert keys == ["metadata_0000", "metadata_0001", "metadata_0002"]

    emb = (
        lake.scan("embeddings/l14").join(lake.scan(RAW_URLS).select("shard", "uid", "source_row", "url", "caption"), on=["shard", "uid"])
        .sort("shard", "source_row").collect()
    )
    ours = vectors.from_column(emb["image_embedding"]).astype(np.float16)
    theirs, meta = reader_vectors(root)
    assert ours.shape == theirs.shape == (670, 768)
    assert np.array_equal(ours, theirs.astype(np.float16))  # same vectors, same order, bit for bit
    assert emb["url"].to_list() == meta["URL"].to_list()
    # LAION's uid: mmh3.hash64(URL + TEXT)[0]
    assert emb["uid"].to_list() == [laion_uid(u, t) for u, t in zip(meta["URL"], meta["TEXT"])]
    assert set(emb["embedding_space"]) == {"ViT-L-14/openai"}
    source_sim = pl.concat([m["similarity"] for m in written["metadata"]]).cast(pl.Float32)
    if text:
        text_theirs, _ = reader_vectors(root, "text_emb")
        assert np.array_equal(vectors.from_column(emb["text_embedding"]).astype(np.float16), text_theirs.astype(np.float16))
        expected = (theirs.astype(np.float32) * text_theirs.astype(np.float32)).sum(axis=1)
        np.testing.assert_allclose(emb["similarity"].to_numpy(), expected, atol=1e-5)
    else:
        assert emb["text_embedding"].null_count() == emb.height
        assert emb["similarity"].to_list() == source_sim.to_list()  # LAION's own column, said so
    # LAION's metadata columns are kept in raw_urls
    raw = lake.scan(RAW_URLS).collect()
    assert {"WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "LICENSE", "NSFW"} <= set(raw.columns)


def test_the_stage_says_where_similarity_came_from(tmp_path):
    root = tmp_path / "laion"
    write_parquet_npy(root, [40], text=False)
    lake, cfg = Lake(tmp_path / "lake"), adopt_config()
    [key] = registry.register(lake, [str(root / "metadata" / "metadata_0000.parquet")])
    run_raw_urls(lake, cfg, key)
    out = run_adopted_embeddings(lake, cfg, key, "l14")
    assert out.rows == 40
    assert "metadata's similarity column" in out.stats["similarity_from"]


def _break(root, how: str) -> None:
    img = root / "img_emb" / "img_emb_0001.npy"
    v = np.load(img)
    if how == "rows":
        np.save(img, v[:-1])
    elif how == "dimension":
        np.save(img, v[:, :512])
    elif how == "norm":
        v[7] *= np.float16(0.5)
        np.save(img, v)
    elif how == "nan":
        v[3, 10] = np.nan
        np.save(img, v)
    elif how == "truncated":  # a copy cut short: the header still says 60 rows
        img.write_bytes(img.read_bytes()[:-100])


@pytest.mark.parametrize("how,message", [
    ("rows", "img_emb_0001.npy has 59 vectors but metadata_0001.parquet has 60 rows"),
    ("dimension", "img_emb_0001.npy holds 512-d vectors but space l14 is 768-d"),
    ("norm", "img_emb_0001.npy: 1 vectors from row 7 on are not unit-norm (norm 0.500"),
    ("nan", "img_emb_0001.npy row 3 has NaN"),
    ("truncated", "img_emb_0001.npy ends before row 60: the file is truncated"),
])
def test_broken_folders_are_refused_in_one_line_with_nothing_published(tmp_path, capsys, how, message):
    root = tmp_path / "laion"
    write_parquet_npy(root, [50, 60, 40], text=False)
    _break(root, how)
    lake_dir = tmp_path / "lake"
    cfg = write_config(tmp_path / "cfg.yaml", adopt_config())
    code = main(["adopt-embeddings", str(root), "--space", "l14", "--lake", str(lake_dir), "--config", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert Lake(lake_dir).tables() == []  # nothing registered, nothing published


def test_a_space_not_declared_adopted_is_refused(tmp_path):
    root = tmp_path / "laion"
    write_parquet_npy(root, [10])
    lake, cfg = Lake(tmp_path / "lake"), make_config()
    [key] = registry.register(lake, [str(root / "metadata" / "metadata_0000.parquet")])
    run_raw_urls(lake, cfg, key)
    with pytest.raises(LaionAssetsError, match="space 'l14' is not in embeddings.spaces"):
        run_adopted_embeddings(lake, cfg, key, "l14")


def test_rows_kept_out_at_ingest_leave_the_others_vectors_in_place(tmp_path):
    """raw_urls keeps out rows (no fetchable URL, a repeated url+caption): every other row
    still gets the vector of its own metadata row."""
    root = tmp_path / "laion"
    write_parquet_npy(root, [30, 30])
    path = root / "metadata" / "metadata_0001.parquet"
    meta = pl.read_parquet(path)
    urls, texts = meta["URL"].to_list(), meta["TEXT"].to_list()
    urls[5] = "ftp://example.org/x.jpg"
    urls[9], texts[9] = urls[8], texts[8]
    meta.with_columns(URL=pl.Series(urls), TEXT=pl.Series(texts)).write_parquet(path)
    lake, cfg = Lake(tmp_path / "lake"), adopt_config()
    adopt(lake, cfg, root)

    emb = lake.scan("embeddings/l14").join(lake.scan(RAW_URLS).select("shard", "uid", "source_row"), on=["shard", "uid"]).sort("shard", "source_row").collect()
    assert emb.height == 58
    theirs, _ = reader_vectors(root)
    at = np.array([r + (30 if s == "metadata_0001" else 0) for s, r in zip(emb["shard"], emb["source_row"])])
    assert 35 not in at and 39 not in at
    assert np.array_equal(vectors.from_column(emb["image_embedding"]).astype(np.float16), theirs[at].astype(np.float16))


def test_a_folder_on_s3_is_adopted_like_a_local_one(tmp_path, moto_s3):
    """The same parts read from an object store (row ranges through pyarrow's S3 filesystem)."""
    import boto3

    root = tmp_path / "laion"
    write_parquet_npy(root, [40, 30], text=False)
    s3 = boto3.client("s3", endpoint_url=moto_s3.endpoint)
    for path in root.rglob("*.*"):
        s3.upload_file(str(path), "laion", f"published/{path.relative_to(root)}")
    lake, cfg = Lake(tmp_path / "lake"), adopt_config()
    parts = find_parts("s3://laion/published")
    assert [p.text for p in parts] == [None, None]
    for key in registry.register(lake, [p.metadata for p in parts]):
        run_raw_urls(lake, cfg, key)
        run_adopted_embeddings(lake, cfg, key, "l14")
    emb = lake.scan("embeddings/l14").join(lake.scan(RAW_URLS).select("shard", "uid", "source_row"), on=["shard", "uid"]).sort("shard", "source_row").collect()
    theirs, _ = reader_vectors(root)
    assert np.array_equal(vectors.from_column(emb["image_embedding"]).astype(np.float16), theirs.astype(np.float16))
