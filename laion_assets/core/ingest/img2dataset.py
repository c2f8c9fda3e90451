"""An img2dataset output folder, read as it is: its finished shards, each shard's per-sample
status parquet (`NNNNN.parquet`) and the images it stored, in each of its output formats.

Layouts (img2dataset 1.x, writer.py): every format writes `NNNNN.parquet` (one row per input
row: the input columns, `key`, `status`, `error_message`, sizes, `exif`, the hash) and, when
the shard is finished, `NNNNN_stats.json`. The images are in `NNNNN.tar` (webdataset:
`<key>.jpg` beside `.txt` and `.json`), in `NNNNN/<key>.jpg` (files), or in the status
parquet's own `jpg`/`webp`/`png` column (parquet). Nothing here makes a request.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from laion_assets.core.ingest import registry
from laion_assets.core.lake.delta import Lake, check_shard_key
from laion_assets.core.lake.errors import LaionAssetsError

ENCODE_FORMATS = ("jpg", "webp", "png")  # img2dataset's encode_format: the image's file extension
# Columns img2dataset adds to the input's: kept in raw_urls with an `img2dataset_` prefix (its
# width/height would clash with LAION's WIDTH/HEIGHT in Delta, whose names ignore case).
OUTCOME_COLUMNS = (
    "key", "status", "error_message", "width", "height", "original_width", "original_height", "exif",
    "md5", "sha256", "sha512",
)
PREFIX = "img2dataset_"
_SHARD = re.compile(r"^(\d+)_stats\.json$")


@dataclass(frozen=True)
class I2dShard:
    folder: str  # absolute path, or URI on an object store
    name: str  # "00042"
    format: str  # webdataset | files | parquet
    encode_format: str  # the stored images' extension

    @property
    def status_file(self) -> str:
        return f"{self.folder}/{self.name}.parquet"

    @property
    def container(self) -> str:
        """Where the images are: the tar, the shard's folder, or the status parquet itself."""
        return {"webdataset": f"{self.folder}/{self.name}.tar", "files": f"{self.folder}/{self.name}"}.get(self.format, self.status_file)

    def describe(self) -> dict:
        return {"folder": self.folder, "name": self.name, "format": self.format, "encode_format": self.encode_format}


def _fs(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    from pathlib import Path

    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def absolute(location: str) -> str:
    """A folder as the lake records it: an absolute path, or the URI as given."""
    return location.rstrip("/") if "://" in location else _fs(location)[1]


def scan_folder(location: str) -> tuple[list[I2dShard], list[tuple[str, str]]]:
    """The finished shards of an img2dataset output folder, by name, and what was skipped (why).
    A shard without its `_stats.json` was not finished by img2dataset and is skipped."""
    fs, root = _fs(location)
    folder = absolute(location)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise LaionAssetsError(f"{location} is not a folder: pass the output_folder img2dataset wrote")
    entries = {i.base_name: i for i in fs.get_file_info(pafs.FileSelector(root))}
    shards, skipped = [], []
    for base in sorted(entries):
        m = _SHARD.match(base)
        if m is None:
            continue
        name = m.group(1)
        if f"{name}.parquet" not in entries:
            skipped.append((f"{folder}/{base}", "no status parquet beside the stats file"))
            continue
        schema = pq.read_schema(f"{root}/{name}.parquet", filesystem=fs)
        images_in = [c for c in ENCODE_FORMATS if c in schema.names]
        if f"{name}.tar" in entries:
            fmt = "webdataset"
        elif entries.get(name) is not None and entries[name].type == pafs.FileType.Directory:
            fmt = "files"
        elif images_in:
            fmt = "parquet"
        else:
            skipped.append((f"{folder}/{name}.parquet", "no tar, folder or image column: an output format that cannot be adopted (tfrecord, dummy)"))
            continue
        shards.append(I2dShard(folder, name, fmt, images_in[0] if images_in else _stored_ext(fs, root, name, fmt)))
    return shards, skipped


def _stored_ext(fs: pafs.FileSystem, root: str, name: str, fmt: str) -> str:
    """The encode_format of a shard's stored images, from its metadata's successes."""
    if fmt == "files":
        for i in fs.get_file_info(pafs.FileSelector(f"{root}/{name}")):
            if i.extension in ENCODE_FORMATS:
                return i.extension
    else:
        for member in _tar_members(fs, f"{root}/{name}.tar", lambda n: n.rsplit(".", 1)[-1] in ENCODE_FORMATS):
            return member["fname"].rsplit(".", 1)[-1]
    return "jpg"  # no image stored: img2dataset's default


def stats(shard: I2dShard) -> dict:
    """img2dataset's `_stats.json` of the shard (count, successes, failures, status_dict)."""
    fs, root = _fs(shard.folder)
    with fs.open_input_stream(f"{root}/{shard.name}_stats.json") as f:
        return json.loads(f.read())


def input_frame(shard: I2dShard) -> pl.DataFrame:
    """The shard's rows as raw_urls reads an input file: img2dataset's `url` and `caption`,
    every input column it kept, and its outcome columns prefixed `img2dataset_`; in key order
    (img2dataset writes rows as downloads finish). The stored image bytes are left out."""
    fs, root = _fs(shard.folder)
    path = f"{root}/{shard.name}.parquet"
    names = [c for c in pq.read_schema(path, filesystem=fs).names if c not in ENCODE_FORMATS]
    df = pl.from_arrow(pq.read_table(path, columns=names, filesystem=fs))
    if "url" not in df.columns:
        raise LaionAssetsError(f"{shard.status_file} has no url column: not an img2dataset status parquet")
    return df.sort("key").rename({c: PREFIX + c for c in df.columns if c in OUTCOME_COLUMNS})


def stored_images(shard: I2dShard) -> Iterator[tuple[str, bytes, int | None]]:
    """(key, bytes, offset) of every image the shard stored, in the container's order; the
    offset of the bytes in a webdataset tar (None in other formats), for `stored_images_at`."""
    fs, root = _fs(shard.folder)
    ext = f".{shard.encode_format}"
    if shard.format == "webdataset":
        for member in _tar_members(fs, f"{root}/{shard.name}.tar", lambda n: n.endswith(ext)):
            yield member["fname"][: -len(ext)], member["data"], member["offset"]
    elif shard.format == "files":
        for i in sorted(fs.get_file_info(pafs.FileSelector(f"{root}/{shard.name}")), key=lambda i: i.base_name):
            if i.base_name.endswith(ext):
                with fs.open_input_stream(i.path) as f:
                    yield i.base_name[: -len(ext)], f.read(), None
    else:
        parquet = pq.ParquetFile(f"{root}/{shard.name}.parquet", filesystem=fs)
        for batch in parquet.iter_batches(batch_size=256, columns=["key", shard.encode_format]):
            for key, data in zip(batch["key"].to_pylist(), batch[shard.encode_format].to_pylist()):
                if data is not None:
                    yield key, data, None


def stored_images_at(shard: I2dShard, found: Iterator[tuple[str, int, int]]) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) read again where `stored_images` found them ((key, offset, size) of a
    webdataset shard): Python's tarfile parses two headers a member (a PAX header, then its
    own) at ~60 µs each, three members a sample, the most of a second pass over the tar; other
    formats are read again whole."""
    if shard.format != "webdataset":
        yield from ((key, data) for key, data, _ in stored_images(shard))
        return
    fs, root = _fs(shard.folder)
    with fs.open_input_file(f"{root}/{shard.name}.tar") as f:
        for key, offset, size in found:
            yield key, f.read_at(size, offset)


def _tar_members(fs: pafs.FileSystem, path: str, select) -> Iterator[dict]:
    """The tar's regular members whose name passes `select`, read as a stream with Python's
    tarfile (webdataset's reader is the same tarfile behind a torch import), with the offset
    of their data in the tar."""
    with fs.open_input_stream(path, compression=None, buffer_size=4 * 2**20) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if member.isreg() and select(member.name):
                yield {"fname": member.name, "data": tar.extractfile(member).read(), "offset": member.offset_data}


def register_folder(lake: Lake, location: str, prefix: str | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Register the finished shards of an img2dataset folder as the lake's shards
    `<prefix>-NNNNN` (prefix: the folder's name), each recorded as adopted so that its stages
    read the folder instead of fetching; returns the keys and what was skipped (why)."""
    shards, skipped = scan_folder(location)
    if not shards:
        raise LaionAssetsError(f"no finished img2dataset shard (NNNNN.parquet beside NNNNN_stats.json) in {location}")
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", PurePosixPath(absolute(location)).name if prefix is None else prefix)
    keys = [f"{prefix}-{s.name}" if prefix else s.name for s in shards]
    for key, shard in zip(keys, shards):  # before the registration: a shard is never registered unadopted
        registry.record_adoption(lake, check_shard_key(key), shard.status_file, {"img2dataset": shard.describe(), "container": shard.container})
    registry.register(lake, [s.status_file for s in shards], keys)
    return keys, skipped
