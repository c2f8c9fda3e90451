import gzip

import mmh3
import polars as pl
import pytest

from laion_assets.core.ingest.reader import (
    REASONS,
    list_shard_files,
    normalize,
    read_shard_file,
    scan_inputs,
    shard_key,
)
from laion_assets.core.ingest.urls import BadURL, fetchable, resolve
from laion_assets.core.lake.errors import LaionAssetsError

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
    assert res.rows["source_row"].to_list() == [0, 1]
    # every source column kept; LAION URL/TEXT become url/caption
    assert {"WIDTH", "similarity", "punsafe", "LICENSE"} <= set(res.rows.columns)
    assert res.kept_out == {"missing_url": 1, "unsupported_scheme": 1, "malformed_url": 1, "duplicate_uid": 1}
    assert res.input_rows == 6


@pytest.mark.parametrize("name", ["urls.txt", "urls.txt.gz"])
def test_a_url_list_is_one_url_a_line_and_a_repeat_is_kept_out(tmp_path, name):
    text = b"https://a.example/1.jpg\r\nhttps://b.example/2.jpg\n\n  \nhttps://a.example/1.jpg\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)

    res = normalize(read_shard_file(str(path)), str(path))

    assert shard_key(str(path)) == "urls"
    assert res.rows.select("url", "caption").rows() == [("https://a.example/1.jpg", None), ("https://b.example/2.jpg", None)]
    assert res.input_rows == 3  # blank lines are not rows
    assert res.kept_out["duplicate_uid"] == 1
    assert res.rejected["duplicate_of_row"].to_list() == [0]


@pytest.mark.parametrize("orient", ["records", "columns"])
def test_json_documents_as_pandas_writes_them(tmp_path, orient):
    """img2dataset reads .json with pandas: a list of records, or pandas' default
    column-oriented document (which its own test fixtures write)."""
    import pandas as pd

    path = tmp_path / "part-7.json.gz"
    pd.DataFrame({"url": ["https://a.example/1.jpg", "https://b.example/2.jpg"], "caption": ["", "a dog"]}).to_json(
        path, orient=orient, compression="gzip"
    )
    res = normalize(read_shard_file(str(path)), str(path))
    assert res.rows.select("url", "caption").rows() == [("https://a.example/1.jpg", ""), ("https://b.example/2.jpg", "a dog")]


def test_a_broken_json_document_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"url": "https://a.example/1.jpg"},\n {"url": }]')
    with pytest.raises(LaionAssetsError, match="line 2, column 10"):
        read_shard_file(str(path))


def test_every_input_row_is_kept_or_kept_out_with_its_reason_and_values():
    res = normalize(LAION, "x")
    rejected = res.rejected.sort("source_row")
    assert sorted(res.rows["source_row"].to_list() + rejected["source_row"].to_list()) == list(range(6))
    assert rejected.select("source_row", "reason", "url", "caption", "WIDTH").rows() == [
        (2, "missing_url", None, "no url", 1),
        (3, "unsupported_scheme", "ftp://c/3.jpg", "ftp", 2),
        (4, "duplicate_uid", "https://a.example/1.jpg", "a cat", 640),
        (5, "malformed_url", "not a url", "junk", 3),
    ]
    dup = rejected.filter(pl.col("reason") == "duplicate_uid").row(0, named=True)
    assert dup["duplicate_of_row"] == 0 and dup["uid"] == res.rows["uid"][0]  # names the row and uid it repeats
    assert f"uid {dup['uid']}" in dup["detail"]
    assert rejected.filter(pl.col("reason") == "unsupported_scheme")["detail"].item() == "scheme 'ftp'"
    assert set(res.rejected["reason"]) <= set(REASONS)


def test_uid_is_laions_mmh3_hash_of_the_original_url():
    urls = ["https://a.example/1.jpg", "http://b.example/my photo 01.png", " https://c.example/café.jpg"]
    res = normalize(pl.DataFrame({"URL": urls, "TEXT": ["a", "b", "c"]}), "x")
    assert res.rows["url"].to_list() == urls  # as given, spaces and all
    assert res.rows["uid"].to_list() == [mmh3.hash64(u + t)[0] for u, t in zip(urls, "abc")]
    assert res.rows["fetch_url"].to_list() == [
        "https://a.example/1.jpg", "http://b.example/my%20photo%2001.png", "https://c.example/caf%C3%A9.jpg",
    ]


def test_lowercase_url_caption_columns():
    df = pl.DataFrame({"url": ["https://x.example/a.jpg"], "caption": ["hello"], "shard": ["s"], "uid": [1], "source_row": [9]})
    res = normalize(df, "x")
    assert res.rows["caption"].to_list() == ["hello"]
    assert {"source_shard", "source_uid", "source_source_row"} <= set(res.rows.columns)  # ours win, theirs kept
    assert res.rows["source_row"].to_list() == [0]


# Real-world URL shapes (LAION rows, redirects seen in crawls) and what a browser fetches.
WHATWG = [
    ("http://host/my photo 01.png", "http://host/my%20photo%2001.png"),
    ("https://example.com/café au lait 東京.jpg", "https://example.com/caf%C3%A9%20au%20lait%20%E6%9D%B1%E4%BA%AC.jpg"),
    ("https://example.com/a%20b%2Fc.jpg", "https://example.com/a%20b%2Fc.jpg"),  # encoded stays encoded
    ("https://example.com/100%.jpg", "https://example.com/100%.jpg"),  # a lone % is kept
    ("https://example.com/a%2", "https://example.com/a%2"),
    ("https://example.com/a+b.jpg?q=a+b", "https://example.com/a+b.jpg?q=a+b"),
    ("https://upload.wikimedia.org/a/a1/Foo_(bar).jpg/220px-Foo_(bar).jpg", "https://upload.wikimedia.org/a/a1/Foo_(bar).jpg/220px-Foo_(bar).jpg"),
    ("https://example.com/a.jpg#section", "https://example.com/a.jpg#section"),
    ("http://a.b/c d?e f#g h", "http://a.b/c%20d?e%20f#g%20h"),
    ("https://example.com/img?name=a b&city=東京", "https://example.com/img?name=a%20b&city=%E6%9D%B1%E4%BA%AC"),
    ("https://example.com/a.jpg?x='y'", "https://example.com/a.jpg?x=%27y%27"),
    ('https://example.com/a"b<c>.jpg', "https://example.com/a%22b%3Cc%3E.jpg"),
    ("https://example.com/{a}|b.jpg", "https://example.com/%7Ba%7D|b.jpg"),
    ("https://example.com/😀.png", "https://example.com/%F0%9F%98%80.png"),
    ("HTTPS://Example.COM/Image.JPG", "https://example.com/Image.JPG"),
    ("HTTP://EXAMPLE.COM:80/%7euser/", "http://example.com/%7euser/"),
    ("https://example.com:443/a.jpg", "https://example.com/a.jpg"),
    ("http://bücher.example/x.jpg", "http://xn--bcher-kva.example/x.jpg"),
    ("https://ｅｘａｍｐｌｅ.com/a.jpg", "https://example.com/a.jpg"),  # full-width letters: IDNA mapping
    ("https://ex%41mple.com/a.jpg", "https://example.com/a.jpg"),
    ("https://example.com/a/./b/../c.jpg", "https://example.com/a/c.jpg"),
    ("https://example.com\\path\\img.jpg", "https://example.com/path/img.jpg"),
    ("  https://example.com/a.jpg\n", "https://example.com/a.jpg"),
    ("https://exa\tmple.com/a\nb.jpg", "https://example.com/ab.jpg"),
    ("http:example.com/a.jpg", "http://example.com/a.jpg"),
    ("http://0x7f.1/a.jpg", "http://127.0.0.1/a.jpg"),  # legacy IPv4 made canonical (the SSRF guard sees it)
    ("http://[0:0:0:0:0:0:0:1]/a.jpg", "http://[::1]/a.jpg"),
    ("https://user:pass@example.com/a.jpg", "https://user:pass@example.com/a.jpg"),
]
KEPT_OUT = [
    ("ftp://example.com/a.jpg", "unsupported_scheme"),
    ("data:image/png;base64,iVBOR", "unsupported_scheme"),
    ("javascript:alert(1)", "unsupported_scheme"),
    ("//example.com/a.jpg", "malformed_url"),  # protocol-relative: no page to resolve it against
    ("www.example.com/a.jpg", "malformed_url"),
    ("http://exa mple.com/a.jpg", "malformed_url"),
    ("http://", "malformed_url"),
    ("https://example.com:99999/a.jpg", "malformed_url"),
    ("http://[::1/a.jpg", "malformed_url"),
    ("", "missing_url"),
    ("   ", "missing_url"),
]


@pytest.mark.parametrize("url, expected", WHATWG)
def test_urls_are_read_as_browsers_read_them(url, expected):
    assert fetchable(url) == expected
    assert fetchable(expected) == expected  # idempotent: what we store is what we fetch


@pytest.mark.parametrize("url, reason", KEPT_OUT)
def test_unfetchable_urls_get_a_reason(url, reason):
    with pytest.raises(BadURL) as e:
        fetchable(url)
    assert e.value.reason == reason


@pytest.mark.parametrize("location, expected", [
    ("/img/a b.jpg", "http://h.test/img/a%20b.jpg"),
    ("b.jpg", "http://h.test/x/b.jpg"),
    ("//cdn.test/ü.jpg", "http://cdn.test/%C3%BC.jpg"),
    ("https://Other.TEST/p?q=1 2", "https://other.test/p?q=1%202"),
    ("/caf\udce9.jpg", "http://h.test/caf%E9.jpg"),  # a latin-1 byte (aiohttp hands it over surrogate-escaped)
    ("file:///etc/passwd", "file:///etc/passwd"),  # resolved; the fetcher refuses the scheme
])
def test_redirect_locations_resolve_like_a_browser(location, expected):
    assert resolve("http://h.test/x/y", location) == expected


def test_kept_out_urls_of_a_shard():
    res = normalize(pl.DataFrame({"URL": [u for u, _ in KEPT_OUT] + [u for u, _ in WHATWG]}), "x")
    assert res.rows.height == len(WHATWG)
    assert res.rows["fetch_url"].to_list() == [e for _, e in WHATWG]
    assert res.rejected.sort("source_row")["reason"].to_list() == [r for _, r in KEPT_OUT]


def test_a_url_column_of_numbers_is_kept_out_row_by_row():
    res = normalize(pl.DataFrame({"URL": [1, 2, None], "TEXT": ["a", "b", "c"]}), "x")
    assert res.rows.height == 0
    assert res.rejected["reason"].to_list() == ["malformed_url", "malformed_url", "missing_url"]
    assert res.rejected["detail"][0] == "URL column holds Int64 values, not text"
    assert res.rejected["url"].to_list() == ["1", "2", None]  # the original values, as text


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


@pytest.mark.parametrize("name, data, place", [
    ("bad.jsonl", b'{"URL": "http://a/1", "TEXT": "x"}\n{"URL": "http://a/2", "TEXT": "y"}\n{"URL": "http://a/3", TEXT: 1}\n',
     "line 3, column 23: Expecting property name enclosed in double quotes"),
    ("array.jsonl", b'{"URL": "http://a/1"}\n[1, 2]\n', "line 2: a JSON list, not an object"),
    ("cut.jsonl", b'{"URL": "http://a/1"}\n{"URL": "http://a/2"', "line 2, column 21"),
    ("latin1.csv", b"URL,TEXT\nhttp://a/1,ok\nhttp://a/2,caf\xe9\n", "line 3, column 15: byte 0xe9 is not UTF-8"),
    ("quote.csv", b'URL,TEXT\nhttp://a/1,"unterminated\nhttp://a/2,y\n', "line 3: unexpected end of data"),
])
def test_unreadable_text_files_name_the_line_and_column(tmp_path, name, data, place):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(LaionAssetsError) as e:
        read_shard_file(str(path))
    assert str(path) in str(e.value) and place in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_a_type_change_after_the_inference_window_is_read(tmp_path):
    path = tmp_path / "late.csv"
    rows = "".join(f"http://a/{i}.jpg,{i}\n" for i in range(10_050))
    path.write_text("URL,WIDTH\n" + rows + "http://a/x.jpg,wide\n")
    df = read_shard_file(str(path))
    assert df.height == 10_051 and df["WIDTH"].dtype == pl.String and df["WIDTH"][-1] == "wide"


def test_list_shard_files_and_what_is_skipped(tmp_path):
    for name in ["b.parquet", "a.csv.gz", "notes.md", ".hidden.csv"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "more").mkdir()
    assert [p.rsplit("/", 1)[1] for p in list_shard_files(str(tmp_path))] == ["a.csv.gz", "b.parquet"]
    skipped = {p.rsplit("/", 1)[1]: why for p, why in scan_inputs(str(tmp_path)).skipped}
    assert skipped == {
        ".hidden.csv": "hidden file (name starts with '.')",
        "notes.md": "not a shard file (use .parquet, .csv, .tsv, .jsonl, .json or .txt (optionally .gz))",
        "more": "a folder (not searched: pass it as an input of its own)",
    }
    with pytest.raises(LaionAssetsError, match="does not exist"):
        list_shard_files(str(tmp_path / "nope"))
