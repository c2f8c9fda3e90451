"""The Delta lake: one table per stage, partitioned by shard, each shard replaced atomically.

Write-audit-publish happens in the stages; this module only knows how to stage chunks, publish
a validated shard in one commit, read shards back, and keep tables healthy.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from laion_assets.core.lake.errors import LaionAssetsError, explain

# Row groups of at most this many rows: image rows are ~20 KB, so a reader (and the writer's
# buffer) holds a few tens of MB at a time instead of a whole shard.
ROW_GROUP_ROWS = 1024
WRITER = WriterProperties(max_row_group_size=ROW_GROUP_ROWS, compression="ZSTD")
TARGET_FILE_BYTES = 128 * 2**20
# Streaming reads pull column data in pieces of this size instead of whole column chunks
# (one row group of images is ~20-40 MB): memory stays near one record batch.
READ_BUFFER_BYTES = 4 * 2**20

# Untracked files (a publish killed before its commit) younger than this may belong to a
# publish in progress, so vacuum leaves them.
ORPHAN_MIN_AGE_HOURS = 1

# A commit that conflicts with concurrent writers is tried again this many times in all.
# deltalake already rebases a commit over others that do not touch what it read (appends,
# other shards); CommitFailedError means a real conflict, e.g. two runs replacing one shard.
COMMIT_ATTEMPTS = 8

log = logging.getLogger(__name__)

SHARD_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_shard_key(shard: str) -> str:
    """Shard keys go into Delta predicates and paths, so they are restricted to a safe alphabet."""
    if not SHARD_KEY.match(shard):
        raise LaionAssetsError(
            f"invalid shard key '{shard}': use letters, digits, '_', '.', '-' (max 128)"
        )
    return shard


def normalize_uri(uri: str | os.PathLike) -> str:
    """Local paths become absolute paths; s3://, gs://, az:// URIs pass through."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else uri
        return str(Path(path).expanduser().resolve())
    return uri.rstrip("/")


class Lake:
    """A lake root (local folder or object-store prefix) holding one Delta table per stage."""

    def __init__(self, uri: str | os.PathLike, storage_options: dict[str, str] | None = None):
        self.uri = normalize_uri(uri)
        self.storage_options = storage_options or None
        self.is_local = "://" not in self.uri
        self.commit_retries = 0

    def __repr__(self) -> str:
        return f"Lake({self.uri!r})"

    def table_uri(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def ensure_writable(self) -> None:
        """Fail early, with a fix, when the lake folder cannot be written."""
        if not self.is_local:
            return
        root = Path(self.uri)
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise LaionAssetsError(
                f"lake path {root} is not writable ({e.strerror}): pass --lake with a folder you can write"
            ) from None

    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.table_uri(name), storage_options=self.storage_options)

    def table(self, name: str) -> DeltaTable:
        try:
            return DeltaTable(self.table_uri(name), storage_options=self.storage_options)
        except TableNotFoundError:
            raise LaionAssetsError(
                f"table '{name}' does not exist in lake {self.uri}: materialize it first"
            ) from None

    # -- publish ---------------------------------------------------------------------------

    def publish_shard(
        self, name: str, shard: str, data: pa.Table | pl.DataFrame, metadata: dict | None = None
    ) -> int:
        """Replace `shard` in table `name` with `data` in one Delta commit; returns the version.

        Readers see the old shard or the new one, never a mix; re-publishing the same rows
        gives the same table content (no duplicates).
        """
        check_shard_key(shard)
        table = data.to_arrow() if isinstance(data, pl.DataFrame) else data
        table = _with_shard(table, shard)
        self.ensure_writable()
        props = CommitProperties(custom_metadata={k: str(v) for k, v in (metadata or {}).items()})

        def commit() -> None:
            if self.exists(name):
                write_deltalake(
                    self.table_uri(name), table, mode="overwrite",
                    predicate=f"shard = '{shard}'", partition_by=["shard"],
                    schema_mode="merge", storage_options=self.storage_options,
                    commit_properties=props, writer_properties=WRITER, target_file_size=TARGET_FILE_BYTES,
                )
            else:
                write_deltalake(
                    self.table_uri(name), table, mode="append", partition_by=["shard"],
                    storage_options=self.storage_options, commit_properties=props,
                    writer_properties=WRITER, target_file_size=TARGET_FILE_BYTES,
                )

        self.retry_commit(f"shard '{shard}' to '{name}'", commit)
        return self.table(name).version()

    def publish_stream(
        self, name: str, shard: str, reader: pa.RecordBatchReader, metadata: dict | None = None
    ) -> int:
        """Like `publish_shard` for a stream of record batches, in bounded memory: the shard's
        files are written batch by batch (`shard_files`: deltalake's writer would hold the
        whole stream), then committed in one transaction that replaces the shard (still atomic).
        """
        from deltalake import Schema
        from deltalake.transaction import create_table_with_add_actions

        from laion_assets.core.lake.shard_files import write_shard_files

        check_shard_key(shard)
        self.ensure_writable()
        fs, root = self._filesystem(name)
        schema = reader.schema.remove(reader.schema.get_field_index("shard")) if "shard" in reader.schema.names else reader.schema
        adds = write_shard_files(fs, root, shard, schema, reader, ROW_GROUP_ROWS, TARGET_FILE_BYTES)
        full = Schema.from_arrow(schema.append(pa.field("shard", pa.string())))
        props = CommitProperties(custom_metadata={k: str(v) for k, v in (metadata or {}).items()})

        def commit() -> None:  # the files are written: only the commit is tried again
            if self.exists(name):
                self.table(name).create_write_transaction(
                    adds, mode="overwrite", schema=full, partition_by=["shard"],
                    partition_filters=[("shard", "=", shard)], commit_properties=props,
                )
            else:
                create_table_with_add_actions(
                    self.table_uri(name), full, adds, mode="append", partition_by=["shard"],
                    storage_options=self.storage_options, commit_properties=props,
                )

        self.retry_commit(f"shard '{shard}' to '{name}'", commit)
        return self.table(name).version()

    def append(self, name: str, data: pa.Table | pl.DataFrame, shard: str | None = None) -> None:
        """Append rows (staging chunks, registry entries) in one atomic commit.

        `data` carries its own `shard` column unless `shard` is given.
        """
        table = data.to_arrow() if isinstance(data, pl.DataFrame) else data
        if shard is not None:
            table = _with_shard(table, check_shard_key(shard))
        self.ensure_writable()
        self.retry_commit(f"rows to '{name}'", lambda: write_deltalake(
            self.table_uri(name), table, mode="append", partition_by=["shard"], schema_mode="merge",
            storage_options=self.storage_options,
        ))

    def retry_commit(self, what: str, commit: Callable[[], None]) -> None:
        """Run one Delta commit; on a conflict with a concurrent writer, run it again on top of
        the new table version after a jittered, growing pause (writers that collided do not
        collide again in step). `commit_retries` counts the retries of this Lake."""
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                return commit()
            except CommitFailedError as e:
                if attempt == COMMIT_ATTEMPTS:
                    raise LaionAssetsError(
                        f"could not commit {what}: {attempt} attempts conflicted with concurrent writers ({e})"
                    ) from None
                self.commit_retries += 1
                pause = random.uniform(0.05, min(5.0, 0.1 * 2**attempt))
                log.info("commit of %s conflicted with a concurrent writer (%s); retry %d in %.2f s", what, e, attempt, pause)
                time.sleep(pause)

    def delete_shard(self, name: str, shard: str) -> None:
        self.delete_where(name, f"shard = '{check_shard_key(shard)}'")

    def delete_where(self, name: str, predicate: str) -> None:
        if self.exists(name):
            self.table(name).delete(predicate)

    def drop_shard(self, name: str, shard: str) -> None:
        """Remove a shard's files now, without waiting for a vacuum, then its rows: for staging,
        which nobody reads at an older version. Files first: a kill in between leaves rows
        whose files are missing, which the next run finds unreadable and drops, never files
        that nothing lists. A table whose log cannot be read any more is removed whole (staging
        is disposable)."""
        check_shard_key(shard)
        if not name.startswith("_staging/"):
            raise ValueError(f"drop_shard is for staging tables, not '{name}'")
        fs, root = self._filesystem(name)
        fs.delete_dir_contents(f"{root}/shard={shard}", missing_dir_ok=True)
        try:
            self.retry_commit(f"the drop of shard '{shard}' from '{name}'", lambda: self.delete_shard(name, shard))
        except DeltaError as e:
            infra = explain(e)
            if infra is not None and infra.kind not in ("corrupt", "missing"):
                raise infra from e  # the store, not the log: keep the other shards' staging
            fs.delete_dir(root)

    def put(self, path: str, data: bytes) -> None:
        """Write a small file under the lake root in one piece (a rename locally, one PUT on
        object stores), so a reader sees the old content or the new one."""
        fs, full = self._filesystem(path)
        fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
        target = f"{full}.tmp-{os.getpid()}" if self.is_local else full
        with fs.open_output_stream(target) as out:
            out.write(data)
        if target != full:
            fs.move(target, full)

    def get(self, path: str) -> bytes | None:
        fs, full = self._filesystem(path)
        try:
            with fs.open_input_stream(full, compression=None) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _filesystem(self, name: str) -> tuple[pafs.FileSystem, str]:
        """pyarrow's native filesystem for a table (credentials and endpoint from the usual AWS
        environment on object stores) and the table's root path in it."""
        uri = self.table_uri(name)
        return pafs.FileSystem.from_uri(Path(uri).as_uri() if self.is_local else uri)

    def shard_files(self, name: str, shard: str) -> list[str]:
        """The data files of one shard's current version: a republish writes new ones."""
        return sorted(self.table(name).file_uris(partition_filters=[("shard", "=", check_shard_key(shard))]))

    def batches(self, name: str, shard: str, columns: list[str], uids: list[int] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of one shard (optionally only `uids`), for streaming: file by file,
        row group by row group, so memory holds about one row group whatever the shard size
        (deltalake's pyarrow dataset buffers whole files through its Python filesystem)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        check_shard_key(shard)
        if not self.exists(name):
            return
        dt = self.table(name)
        schema = pa.schema(dt.schema().to_arrow())
        schema = pa.schema([schema.field(c) for c in columns])
        fs, _ = self._filesystem(name)
        wanted = pa.array(uids, pa.int64()) if uids is not None else None
        for uri in self.shard_files(name, shard):
            path = uri if self.is_local else uri.split("://", 1)[1]
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=READ_BUFFER_BYTES, page_checksum_verification=True)
                present = [c for c in columns if c in pf.schema_arrow.names]
                for batch in pf.iter_batches(batch_size=256, columns=present):
                    if wanted is not None:
                        batch = batch.filter(pc.is_in(batch["uid"], wanted))
                    if batch.num_rows:
                        arrays = [
                            pa.array([shard] * batch.num_rows, pa.string()) if c == "shard"
                            else batch[c].cast(schema.field(c).type) if c in present
                            else pa.nulls(batch.num_rows, schema.field(c).type)  # added to the table later
                            for c in columns
                        ]
                        yield pa.RecordBatch.from_arrays(arrays, schema=schema)

    # -- read ------------------------------------------------------------------------------

    def scan(self, name: str) -> pl.LazyFrame:
        if not self.exists(name):
            raise LaionAssetsError(
                f"table '{name}' does not exist in lake {self.uri}: materialize it first"
            )
        return pl.scan_delta(self.table_uri(name), storage_options=self.storage_options)

    def read_shard(self, name: str, shard: str, columns: list[str] | None = None) -> pl.DataFrame:
        """The published rows of one shard (empty frame if the table has none for it)."""
        lf = self.scan(name).filter(pl.col("shard") == check_shard_key(shard))
        if columns:
            lf = lf.select(columns)
        return lf.collect()

    def read_shard_or_none(self, name: str, shard: str, columns: list[str] | None = None):
        return self.read_shard(name, shard, columns) if self.exists(name) else None

    def shard_row_count(self, name: str, shard: str) -> int:
        return self.scan(name).filter(pl.col("shard") == shard).select(pl.len()).collect().item()

    # -- maintenance -----------------------------------------------------------------------

    def tables(self) -> list[str]:
        """Names of the Delta tables under the root, up to three levels deep (stages,
        embeddings/<space>, subsets/<name>, _staging/embeddings/<space>)."""
        fs, root = pafs.FileSystem.from_uri(Path(self.uri).as_uri() if self.is_local else self.uri)
        found = []

        def walk(path: str, depth: int) -> None:
            for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
                if info.type != pafs.FileType.Directory or info.base_name == "_delta_log":
                    continue
                if fs.get_file_info(f"{info.path}/_delta_log").type == pafs.FileType.Directory:
                    found.append(info.path.removeprefix(root).strip("/"))
                elif depth < 3:
                    walk(info.path, depth + 1)

        walk(root, 1)
        return sorted(found)

    def maintain(self, name: str, retention_hours: int, target_size_mb: int) -> dict:
        """Compact small files, then vacuum (see `vacuum`)."""
        dt = self.table(name)
        compact = dt.optimize.compact(target_size=target_size_mb * 2**20)
        return {
            "files_added": compact.get("numFilesAdded", 0),
            "files_removed_by_compaction": compact.get("numFilesRemoved", 0),
            "files_vacuumed": len(self.vacuum(name, retention_hours)),
            "version": self.table(name).version(),
        }

    def vacuum(self, name: str, retention_hours: int) -> list[str]:
        """Remove for real (deltalake's vacuum is a dry run by default) the files that no
        version younger than `retention_hours` reads, and the untracked files a killed publish
        left, once older than max(retention, ORPHAN_MIN_AGE_HOURS) so that a publish still in
        progress is never touched.

        The retention comes from config and is honoured as given; below Delta's 7-day default,
        readers time-travelling (or still reading) older versions may lose their files.
        """
        dt = self.table(name)
        removed = dt.vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False)
        removed += dt.vacuum(
            retention_hours=max(retention_hours, ORPHAN_MIN_AGE_HOURS), dry_run=False,
            enforce_retention_duration=False, full=True,
        )
        return removed


def _with_shard(table: pa.Table, shard: str) -> pa.Table:
    col = pa.array([shard] * table.num_rows, pa.string())
    if "shard" in table.column_names:
        return table.set_column(table.column_names.index("shard"), "shard", col)
    return table.append_column("shard", col)
