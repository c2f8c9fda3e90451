"""Input shards: find shard files, read them into one schema, give every row a stable uid, and
say for every input row whether it is kept and, if not, why.

A shard is one input file (parquet, csv, tsv, jsonl, json, txt; optionally gzip-compressed):
img2dataset's input formats, a `.txt` being one URL a line without captions. Its key is
the file name without extensions, e.g. `part-00042.parquet` -> `part-00042`. A file that cannot
be read is refused with the place (file, line, column) where that can be known.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import mmh3
import polars as pl
import pyarrow.fs as pafs

from laion_assets.core.ingest.urls import BadURL, fetchable
from laion_assets.core.lake.delta import check_shard_key
from laion_assets.core.lake.errors import LaionAssetsError

FORMATS = {
    ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".txt": "txt",
}
URL_COLUMNS = ("URL", "url")
CAPTION_COLUMNS = ("TEXT", "caption", "text", "TEXT_EN")
# Names of columns we add: a source column with one of them gets a `source_` prefix.
RESERVED = ("shard", "uid", "source_row", "fetch_url", "reason", "detail", "duplicate_of_row")
# Why a row is kept out of raw_urls (each kept-out row is in raw_urls_rejected with its reason).
REASONS = ("missing_url", "unsupported_scheme", "malformed_url", "duplicate_uid")
SUPPORTED = ".parquet, .csv, .tsv, .jsonl, .json or .txt (optionally .gz)"


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


@dataclass
class InputFiles:
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def scan_inputs(location: str) -> InputFiles:
    """Shard files in a folder or object-store prefix (or the file itself), sorted; what else
    is in the folder is listed as skipped, with the reason."""
    fs, root = pafs.FileSystem.from_uri(location if "://" in location else _abspath(location))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise LaionAssetsError(f"input {location} does not exist: pass a shard file or a folder of them")
    if info.type == pafs.FileType.File:
        if shard_format(root) is None:
            raise LaionAssetsError(f"{location} is not a shard file: use {SUPPORTED}")
        return InputFiles([_to_uri(location, root)])
    found = InputFiles([])
    for i in sorted(fs.get_file_info(pafs.FileSelector(root, recursive=False)), key=lambda i: i.path):
        uri = _to_uri(location, i.path)
        if i.type == pafs.FileType.Directory:
            found.skipped.append((uri, "a folder (not searched: pass it as an input of its own)"))
        elif i.base_name.startswith("."):
            found.skipped.append((uri, "hidden file (name starts with '.')"))
        elif shard_format(i.path) is None:
            found.skipped.append((uri, f"not a shard file (use {SUPPORTED})"))
        else:
            found.files.append(uri)
    return found


def list_shard_files(location: str) -> list[str]:
    return scan_inputs(location).files


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
        raise LaionAssetsError(
            f"shard file {source} no longer exists: restore it, or remove the shard from the lake and "
            f"the UI with `laion-assets remove-shard {shard_key(source)}`"
        ) from None
    if source.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # zlib.error: damaged bytes inside a valid header
            raise LaionAssetsError(f"{source} is not valid gzip ({e}): re-compress or replace the file") from None
    return data


def _parse(data: bytes, fmt: str, infer_rows: int | None) -> pl.DataFrame:
    if fmt == "parquet":
        return pl.read_parquet(io.BytesIO(data))
    if fmt == "txt":  # one URL a line (img2dataset's url lists); blank lines are not rows
        lines = (line.removesuffix("\r") for line in data.decode("utf-8").split("\n"))
        return pl.DataFrame({"url": [line for line in lines if line.strip()]}, schema={"url": pl.String})
    if fmt == "json":  # one JSON document read as img2dataset reads it (pandas): records or columns
        import pandas as pd

        return pl.from_pandas(pd.read_json(io.BytesIO(data), dtype=False, convert_dates=False))
    if fmt in ("csv", "tsv"):
        return pl.read_csv(
            io.BytesIO(data), separator="\t" if fmt == "tsv" else ",",
            infer_schema_length=infer_rows, quote_char='"', truncate_ragged_lines=True,
        )
    return pl.read_ndjson(io.BytesIO(data), infer_schema_length=infer_rows)


def read_shard_file(source: str) -> pl.DataFrame:
    """Read one shard file as it is, every column kept."""
    fmt = shard_format(source)
    if fmt is None:
        raise LaionAssetsError(f"{source}: unknown shard format, use {SUPPORTED}")
    data = _read_bytes(source)
    if not data.strip():
        raise LaionAssetsError(f"{source} is empty: a shard needs a header/schema and at least one row")
    try:
        try:
            df = _parse(data, fmt, 10_000)
        except pl.exceptions.ComputeError:
            if fmt == "parquet":
                raise
            df = _parse(data, fmt, None)  # a type that changes after row 10,000: infer from every row
    except Exception as e:  # polars raises several error types for a corrupt file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        place = _place(data, fmt, str(e))
        where = f" at {place}" if place else ""
        raise LaionAssetsError(f"{source} could not be read as {fmt}{where} ({first}): check or replace the file") from None
    if df.height == 0:
        raise LaionAssetsError(f"{source} has no rows: remove the file or add rows")
    twice = [c for c in df.columns if (m := re.fullmatch(r"(.+)_duplicated_\d+", c)) and m[1] in df.columns]
    if twice:  # polars renames a repeated csv header name; which column was meant is unknown
        raise LaionAssetsError(f"{source} has the column {twice[0].rsplit('_duplicated_', 1)[0]} more than once: rename or remove one")
    return df


def _place(data: bytes, fmt: str, message: str) -> str | None:
    """Where a text shard is broken ("line 3, column 17"), found again by slower readers that
    know lines, since polars' errors only give a character or byte offset."""
    if fmt == "parquet":
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        return f"line {line}, column {col}: byte 0x{data[e.start]:02x} is not UTF-8"
    if fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n}, column {e.colno}: {e.msg}"
            if not isinstance(value, dict):
                return f"line {n}: a JSON {type(value).__name__}, not an object"
        return None
    if fmt == "json":
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}, column {e.colno}: {e.msg}"
        return None
    if fmt == "txt":
        return None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",", strict=True)
    try:
        for _ in reader:
            pass
    except csv.Error as e:
        return f"line {reader.line_num}: {e}"
    column = re.search(r"at column '([^']*)'", message)
    return f"column '{column.group(1)}'" if column else None


@dataclass
class IngestResult:
    rows: pl.DataFrame  # kept: uid, url, caption, source_row, fetch_url + every source column
    rejected: pl.DataFrame  # kept out: source_row, reason, detail, duplicate_of_row, uid, url, caption, ...
    input_rows: int
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def kept_out(self) -> dict[str, int]:
        """Rows kept out per reason (every reason listed, 0 included)."""
        counts = dict(self.rejected.group_by("reason").len().iter_rows())
        return {r: counts.get(r, 0) for r in REASONS}


def laion_uid(url: str, caption: str | None) -> int:
    """LAION's sample hash: mmh3.hash64(url + text)[0] (signed 64-bit), joinable with LAION metadata."""
    return mmh3.hash64(url + (caption or ""))[0]


def find_columns(columns: list[str], source: str) -> tuple[str, str | None]:
    """The URL and caption columns of a shard (LAION's names first)."""
    url_col = next((c for c in URL_COLUMNS if c in columns), None)
    if url_col is None:
        raise LaionAssetsError(
            f"{source} has no URL column (looked for {', '.join(URL_COLUMNS)}; found "
            f"{', '.join(columns[:12])}): rename the image URL column to URL or url"
        )
    return url_col, next((c for c in CAPTION_COLUMNS if c in columns), None)


def check_shard_file(source: str) -> int:
    """Refuse a file that cannot be a shard (unreadable, no URL column) before it is registered;
    returns its row count."""
    df = read_shard_file(source)
    find_columns(df.columns, source)
    return df.height


def _as_text(s: pl.Series) -> tuple[pl.Series, str | None]:
    """A column as text, and what it held when that was not text (e.g. 'Int64')."""
    if s.dtype == pl.String:
        return s, None
    if s.dtype.is_nested():
        return pl.Series(s.name, [None if v is None else json.dumps(v, default=str) for v in s.to_list()], pl.String), str(s.dtype)
    return s.cast(pl.String, strict=False), str(s.dtype)


def _judge(urls: list[str | None], non_text: str | None) -> tuple[list, list, list]:
    """(fetch_url, reason, detail) per row: the WHATWG form we fetch, or why the row is out."""
    fetch, reasons, details = [], [], []
    for url in urls:
        try:
            if non_text and url is not None:
                raise BadURL("malformed_url", f"URL column holds {non_text} values, not text")
            fetch.append(fetchable(url))
            reasons.append(None)
            details.append(None)
        except BadURL as e:
            fetch.append(None)
            reasons.append(e.reason)
            details.append(e.detail)
    return fetch, reasons, details


def normalize(df: pl.DataFrame, source: str) -> IngestResult:
    """Canonical `uid`, `url`, `caption`, `source_row`, `fetch_url`; every other source column
    kept as is. Rows without a fetchable http(s) URL and repeated (url, caption) pairs are
    kept out, each with its reason, in `rejected`: kept + rejected = the input rows.

    `url` is the source string untouched (uid = LAION's hash of it); `fetch_url` is its WHATWG
    form. LAION's `URL`/`TEXT` become `url`/`caption` (Delta column names are
    case-insensitive, so both spellings cannot coexist); source columns named like ours get a
    `source_` prefix.
    """
    url_col, caption_col = find_columns(df.columns, source)
    renamed = {c: f"source_{c}" for c in df.columns if c.lower() in RESERVED}
    renamed[url_col] = "url"
    if caption_col:
        renamed[caption_col] = "caption"
    clashes = [c for c in df.columns if c.lower() in ("url", "caption") and c not in renamed]
    renamed.update({c: f"source_{c}" for c in clashes})
    df = df.rename(renamed).with_columns(pl.col(pl.Null).cast(pl.String))  # Delta has no null type
    if "caption" not in df.columns:
        df = df.with_columns(caption=pl.lit(None, pl.String))
    url, non_text = _as_text(df["url"])
    caption, _ = _as_text(df["caption"])
    urls, captions = url.to_list(), caption.to_list()
    fetch, reasons, details = _judge(urls, non_text)
    uids = [None if u is None else laion_uid(u, c) for u, c in zip(urls, captions)]
    df = df.with_columns(
        url, caption,
        uid=pl.Series(uids, dtype=pl.Int64),
        source_row=pl.int_range(df.height, dtype=pl.Int64),
        fetch_url=pl.Series(fetch, dtype=pl.String),
        reason=pl.Series(reasons, dtype=pl.String),
        detail=pl.Series(details, dtype=pl.String),
    )
    # The first row of each uid is kept; later ones name the row they repeat.
    first = pl.col("source_row").min().over("uid")
    df = df.with_columns(
        duplicate_of_row=pl.when(pl.col("reason").is_null() & (pl.col("source_row") != first)).then(first)
    ).with_columns(
        reason=pl.when(pl.col("duplicate_of_row").is_not_null()).then(pl.lit("duplicate_uid")).otherwise("reason"),
        detail=pl.when(pl.col("duplicate_of_row").is_not_null())
        .then(pl.format("same url and caption as source_row {} (uid {})", "duplicate_of_row", "uid"))
        .otherwise("detail"),
    )
    ours = ["uid", "url", "caption", "source_row", "fetch_url", "reason", "detail", "duplicate_of_row"]
    rest = [c for c in df.columns if c not in ours]
    kept = df.filter(pl.col("reason").is_null()).select("uid", "url", "caption", "source_row", "fetch_url", *rest)
    rejected = df.filter(pl.col("reason").is_not_null()).select(
        "source_row", "reason", "detail", "duplicate_of_row", "uid", "url", "caption", *rest
    )
    return IngestResult(rows=kept, rejected=rejected, input_rows=df.height, renamed=renamed)
