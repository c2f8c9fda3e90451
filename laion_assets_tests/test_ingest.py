import gzip

import mmh3
import polars as pl
import pytest

from laion_assets.core.errors import LaionAssetsError
from laion_assets.core.ingest import list_shard_files, normalize, read_shard_file, shard_key

LAION = pl.DataFrame(
    {
        "URL": ["https://a.example/1.jpg", "http://b.example/2.png", None, "ftp://c/3.jpg", "https://a.example/1.jpg", "not a url"],
        "TEXT": ["a cat", "a dog", "no url", "ftp", "a cat", "junk"],
        "WIDTH": [640, 480, 1, 2, 640, 3],
        "similarity": [0.31, 0.29, 0.1, 0.2, 0.31, 0.0],
        "punsafe": [0.01, 0.2, 0.0, 0.0, 0.01, 0.0],
        "LICENSE": ["?"] * 6,
    }
)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".jsonl", ".csv.gz", ".jsonl.gz", ".parquet.gz"])
def test_reads_every_format_with_laion_columns(tmp_path, suffix):
    path = tmp_path / f"part-00001{suffix}"
    base = suffix.removesuffix(".gz")
    raw = tmp_path / f"tmp{base}"
    if base == ".parquet":
        LAION.write_parquet(raw)
    elif base == ".csv":
        LAION.write_csv(raw)
    elif base == ".tsv":
        LAION.write_csv(raw, separator="\t")
    else:
        LAION.write_ndjson(raw)
    data = raw.read_bytes()
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)

    res = normalize(read_shard_file(str(path)), str(path))

    assert shard_key(str(path)) == "part-00001"
    assert res.rows["url"].to_list() == ["https://a.example/1.jpg", "http://b.example/2.png"]
    assert res.rows["caption"].to_list() == ["a cat", "a dog"]
    # every source column kept; LAION URL/TEXT become url/caption
    assert {"WIDTH", "similarity", "punsafe", "LICENSE"} <= set(res.rows.columns)
    assert res.rejected == {"missing_url": 1, "unsupported_scheme": 2, "duplicate_uid": 1}
    assert res.input_rows == 6


def test_uid_is_laions_mmh3_hash():
    res = normalize(LAION.head(2), "x")
    assert res.rows["uid"].to_list() == [mmh3.hash64(u + t)[0] for u, t in [("https://a.example/1.jpg", "a cat"), ("http://b.example/2.png", "a dog")]]


def test_lowercase_url_caption_columns():
    df = pl.DataFrame({"url": ["https://x.example/a.jpg"], "caption": ["hello"], "shard": ["s"], "uid": [1]})
    res = normalize(df, "x")
    assert res.rows["caption"].to_list() == ["hello"]
    assert {"source_shard", "source_uid"} <= set(res.rows.columns)  # ours win, theirs kept


def test_missing_url_column_is_a_clear_error(tmp_path):
    path = tmp_path / "s.csv"
    pl.DataFrame({"link": ["https://x/a.jpg"], "TEXT": ["t"]}).write_csv(path)
    with pytest.raises(LaionAssetsError, match="no URL column.*rename"):
        normalize(read_shard_file(str(path)), str(path))


def test_empty_and_corrupt_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(LaionAssetsError, match="is empty"):
        read_shard_file(str(empty))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(LaionAssetsError, match="could not be read as parquet"):
        read_shard_file(str(corrupt))
    header_only = tmp_path / "header.csv"
    header_only.write_text("URL,TEXT\n")
    with pytest.raises(LaionAssetsError, match="no rows"):
        read_shard_file(str(header_only))


def test_list_shard_files(tmp_path):
    for name in ["b.parquet", "a.csv.gz", "notes.txt", ".hidden.csv"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.rsplit("/", 1)[1] for p in list_shard_files(str(tmp_path))] == ["a.csv.gz", "b.parquet"]
    with pytest.raises(LaionAssetsError, match="does not exist"):
        list_shard_files(str(tmp_path / "nope"))
