"""Plain files beside the Delta tables (webdataset exports, kNN indexes): written through the
lake's own filesystem (a local folder or s3:// with the lake's settings), each folder described
by a JSON manifest written last, so a folder without a current manifest is never trusted.

A shard's fingerprint names the published files of that shard in the tables an artifact is made
from: a new Delta version of the shard (a re-run, a blocklist pass) changes it; nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from laion_assets.core.lake.delta import Lake


class LakeFiles:
    """A folder of plain files under the lake root, e.g. `webdataset/laion5b/part-00000`."""

    def __init__(self, lake: Lake, folder: str):
        self.lake, self.folder = lake, folder
        self.fs, self.root = lake._filesystem(folder)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def uri(self, name: str = "") -> str:
        return self.lake.table_uri(f"{self.folder}/{name}".rstrip("/"))

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def names(self, under: str = "") -> list[str]:
        """File names (relative to the folder) directly in `under`."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(under).rstrip("/"), allow_not_found=True))
        return sorted(str(PurePosixPath(under) / i.base_name) if under else i.base_name for i in infos if i.type == pafs.FileType.File)

    def folders(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def read_json(self, name: str) -> dict | None:
        if not self.exists(name):
            return None
        with self.fs.open_input_stream(self.path(name), compression=None) as f:
            return json.loads(f.read())

    def write_json(self, name: str, body: dict) -> None:
        self.write_bytes(name, json.dumps(body, indent=1, sort_keys=True).encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open_output(name) as out:
            out.write(data)

    def open_output(self, name: str):
        """A stream that replaces `name` when closed: on a local disk through a temporary file
        renamed at the end (readers never see half a file); an object-store upload appears
        whole when it completes."""
        return _Replacing(self, name)

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self.path(name))

    def put_file(self, name: str, write) -> None:
        """Replace `name` with the file that `write(local_path)` makes (for writers that want a
        path, like faiss): written beside it and renamed on a local disk, uploaded from a
        temporary file to an object store."""
        if self.lake.is_local:
            self.fs.create_dir(self.path(name).rsplit("/", 1)[0], recursive=True)
            write(self.path(name) + ".partial")
            self.fs.move(self.path(name) + ".partial", self.path(name))
            return
        with tempfile.TemporaryDirectory(prefix="laion-put-") as tmp:
            local = f"{tmp}/{name.rsplit('/', 1)[-1]}"
            write(local)
            pafs.copy_files(local, self.path(name), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def local_path(self, name: str, cache: str | Path) -> str:
        """A local path to `name`: the file itself on a local disk, else a copy in `cache`
        (names written here are never rewritten with other content, so a cached copy stays good)."""
        if self.lake.is_local:
            return self.path(name)
        local = Path(cache) / name
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(self.path(name), str(local) + ".partial", source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            Path(str(local) + ".partial").replace(local)
        return str(local)


class _Replacing:
    def __init__(self, files: LakeFiles, name: str):
        self.files, self.name = files, name
        self.target = files.path(name)
        self.tmp = self.target + ".partial" if files.lake.is_local else self.target
        if files.lake.is_local:  # object stores have no folders (creating one leaves a marker object)
            files.fs.create_dir(self.target.rsplit("/", 1)[0], recursive=True)
        self.stream = files.fs.open_output_stream(self.tmp, compression=None)

    def write(self, data) -> int:
        return self.stream.write(data)

    def tell(self) -> int:
        return self.stream.tell()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.stream.close()
        if exc_type is not None:
            if self.tmp != self.target:
                self.files.fs.delete_file(self.tmp)
            return
        if self.tmp != self.target:
            self.files.fs.move(self.tmp, self.target)


def shard_fingerprint(lake: Lake, tables: list[str], shard: str, *extra) -> str:
    """Names the published data files of `shard` in each table (a republished shard has new
    files), plus `extra` settings, as a short hash."""
    parts = [[t, [u.rsplit("/", 1)[-1] for u in lake.shard_files(t, shard)]] for t in tables]
    return hashlib.sha256(json.dumps([parts, *extra], sort_keys=True, default=str).encode()).hexdigest()[:16]
