"""Input shards: find shard files, read them into one schema, give every row a stable uid.

A shard is one input file (parquet, csv, tsv, jsonl; optionally gzip-compressed). Its key is
the file name without extensions, e.g. `part-00042.parquet` -> `part-00042`.
"""

from __future__ import annotations

import gzip
import io
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import mmh3
import polars as pl
import pyarrow.fs as pafs

from laion_assets.core.errors import LaionAssetsError
from laion_assets.core.lake import check_shard_key

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
URL_COLUMNS = ("URL", "url")
CAPTION_COLUMNS = ("TEXT", "caption", "text", "TEXT_EN")
RESERVED = ("shard", "uid")
HTTP_URL = r"(?i)^https?://[^\s/?#]+[^\s]*$"


def shard_format(path: str) -> str | None:
    """The reader for a file name, or None if it is not a shard file."""
    name = PurePosixPath(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return FORMATS.get(PurePosixPath(name).suffix)


def shard_key(path: str) -> str:
    """`dir/part-00042.csv.gz` -> `part-00042`; other characters become `_`."""
    name = PurePosixPath(path).name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", PurePosixPath(name).stem)
    return check_shard_key(stem.lstrip("._-") or "shard")


def list_shard_files(location: str) -> list[str]:
    """Shard files in a folder or object-store prefix (or the file itself), sorted."""
    fs, root = pafs.FileSystem.from_uri(location if "://" in location else _abspath(location))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise LaionAssetsError(f"input {location} does not exist: pass a shard file or a folder of them")
    if info.type == pafs.FileType.File:
        if shard_format(root) is None:
            raise LaionAssetsError(
                f"{location} is not a shard file: use .parquet, .csv, .tsv or .jsonl (optionally .gz)"
            )
        return [_to_uri(location, root)]
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return sorted(
        _to_uri(location, i.path)
        for i in infos
        if i.type == pafs.FileType.File and shard_format(i.path) and not i.base_name.startswith(".")
    )


def _abspath(p: str) -> str:
    from pathlib import Path

    return str(Path(p).expanduser().resolve())


def _to_uri(location: str, path: str) -> str:
    if "://" in location:
        return f"{location.split('://', 1)[0]}://{path}"
    return path


def _read_bytes(source: str) -> bytes:
    fs, path = pafs.FileSystem.from_uri(source if "://" in source else _abspath(source))
    try:
        with fs.open_input_stream(path, compression=None) as f:
            data = f.read()
    except FileNotFoundError:
        raise LaionAssetsError(f"shard file {source} no longer exists: restore it or remove the shard") from None
    if source.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise LaionAssetsError(f"{source} is not valid gzip ({e}): re-compress or replace the file") from None
    return data


def read_shard_file(source: str) -> pl.DataFrame:
    """Read one shard file as it is, every column kept."""
    fmt = shard_format(source)
    if fmt is None:
        raise LaionAssetsError(f"{source}: unknown shard format, use .parquet, .csv, .tsv or .jsonl (optionally .gz)")
    data = _read_bytes(source)
    if not data.strip():
        raise LaionAssetsError(f"{source} is empty: a shard needs a header/schema and at least one row")
    try:
        if fmt == "parquet":
            df = pl.read_parquet(io.BytesIO(data))
        elif fmt in ("csv", "tsv"):
            df = pl.read_csv(
                io.BytesIO(data), separator="\t" if fmt == "tsv" else ",",
                infer_schema_length=10_000, quote_char='"', truncate_ragged_lines=True,
            )
        else:
            df = pl.read_ndjson(io.BytesIO(data), infer_schema_length=10_000)
    except Exception as e:  # polars raises several error types for a corrupt file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LaionAssetsError(f"{source} could not be read as {fmt} ({first}): check or replace the file") from None
    if df.height == 0:
        raise LaionAssetsError(f"{source} has no rows: remove the file or add rows")
    return df


@dataclass
class IngestResult:
    rows: pl.DataFrame
    input_rows: int
    rejected: dict[str, int] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)


def laion_uid(url: str, caption: str | None) -> int:
    """LAION's sample hash: mmh3.hash64(url + text)[0] (signed 64-bit), joinable with LAION metadata."""
    return mmh3.hash64(url + (caption or ""))[0]


def normalize(df: pl.DataFrame, source: str) -> IngestResult:
    """Canonical `uid`, `url`, `caption` columns; every other source column kept as is.

    LAION's `URL`/`TEXT` become `url`/`caption` (Delta column names are case-insensitive, so
    both spellings cannot coexist); source columns named like ours get a `source_` prefix.
    Rows without a usable http(s) URL, and repeated (url, caption) pairs, are counted out.
    """
    url_col = next((c for c in URL_COLUMNS if c in df.columns), None)
    if url_col is None:
        raise LaionAssetsError(
            f"{source} has no URL column (looked for {', '.join(URL_COLUMNS)}; found "
            f"{', '.join(df.columns[:12])}): rename the image URL column to URL or url"
        )
    caption_col = next((c for c in CAPTION_COLUMNS if c in df.columns), None)
    renamed = {c: f"source_{c}" for c in df.columns if c.lower() in RESERVED}
    renamed[url_col] = "url"
    if caption_col:
        renamed[caption_col] = "caption"
    clashes = [c for c in df.columns if c.lower() in ("url", "caption") and c not in renamed]
    renamed.update({c: f"source_{c}" for c in clashes})
    df = df.rename(renamed)
    if "caption" not in df.columns:
        df = df.with_columns(caption=pl.lit(None, pl.String))
    df = df.with_columns(
        pl.col("url").cast(pl.String).str.strip_chars(), pl.col("caption").cast(pl.String)
    )
    input_rows = df.height
    reason = (
        pl.when(pl.col("url").is_null() | (pl.col("url") == "")).then(pl.lit("missing_url"))
        .when(~pl.col("url").str.contains(r"(?i)^https?://")).then(pl.lit("unsupported_scheme"))
        .when(~pl.col("url").str.contains(HTTP_URL)).then(pl.lit("malformed_url"))
    )
    df = df.with_columns(_reason=reason)
    rejected = dict(
        df.filter(pl.col("_reason").is_not_null()).group_by("_reason").len().iter_rows()
    )
    df = df.filter(pl.col("_reason").is_null()).drop("_reason")
    uid = pl.struct("url", "caption").map_elements(
        lambda r: laion_uid(r["url"], r["caption"]), return_dtype=pl.Int64
    )
    df = df.with_columns(uid=uid)
    before = df.height
    df = df.unique(subset="uid", keep="first", maintain_order=True)
    if before - df.height:
        rejected["duplicate_uid"] = before - df.height
    front = ["uid", "url", "caption"]
    df = df.select(front + [c for c in df.columns if c not in front])
    return IngestResult(rows=df, input_rows=input_rows, rejected=rejected, renamed=renamed)
