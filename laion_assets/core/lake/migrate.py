"""Lake layout migrations: move data to where this version reads it, without recomputing it.

Before several embedding spaces, a lake had one `embeddings` table; now each space has
`embeddings/<space>`. The old table folder is moved under its space's name (its Delta log and
data files are kept as they are: add actions are relative paths, so the table, its versions
and its time travel stay valid). Nothing is downloaded or embedded again.
"""

from __future__ import annotations

import logging

import polars as pl
import pyarrow.fs as pafs

from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.lake.tables import embeddings_table

log = logging.getLogger(__name__)

OLD_TABLE = "embeddings"
OLD_STAGING = "_staging/embeddings"


def migrate_embeddings(lake: Lake, space: str, identity: str, force: bool = False) -> dict:
    """Move the single-space `embeddings` table to `embeddings/<space>`. Refuses when its rows
    were computed in another space than `identity` (the configured model of `space`) unless
    `force`. Resumable: a crash between the steps is finished by running it again."""
    fs, root = pafs.FileSystem.from_uri(lake.table_uri(""))
    root = root.rstrip("/")
    old, parked, new = f"{root}/{OLD_TABLE}", f"{root}/_migrating/{OLD_TABLE}", f"{root}/{embeddings_table(space)}"

    def is_table(path: str) -> bool:
        return fs.get_file_info(f"{path}/_delta_log").type == pafs.FileType.Directory

    if not is_table(parked):  # else a migration was interrupted after parking the table: finish it
        if not is_table(old):
            if lake.exists(embeddings_table(space)):
                return {"moved": False, "reason": f"already migrated: {lake.table_uri(embeddings_table(space))}"}
            raise LaionAssetsError(f"no single-space embeddings table in lake {lake.uri}: nothing to migrate")
        if lake.exists(embeddings_table(space)):
            raise LaionAssetsError(f"{lake.table_uri(embeddings_table(space))} exists already: remove it or pick another space name")
        found = pl.scan_delta(lake.table_uri(OLD_TABLE), storage_options=lake.storage_options).select("embedding_space").unique().collect()
        spaces = sorted(found["embedding_space"].drop_nulls().to_list())
        if spaces and spaces != [identity] and not force:
            raise LaionAssetsError(
                f"the embeddings table holds {', '.join(spaces)} vectors, but space '{space}' is {identity}: "
                "migrate to the space of that model, or pass --force"
            )
        _move(fs, old, parked)
    _move(fs, parked, new)
    fs.delete_dir_contents(f"{root}/_migrating", missing_dir_ok=True)
    if fs.get_file_info(f"{root}/{OLD_STAGING}/_delta_log").type == pafs.FileType.Directory:
        fs.delete_dir(f"{root}/{OLD_STAGING}")  # staging is disposable: unfinished shards re-embed
    log.info("moved %s to %s", lake.table_uri(OLD_TABLE), lake.table_uri(embeddings_table(space)))
    return {"moved": True, "table": lake.table_uri(embeddings_table(space)), "rows": lake.scan(embeddings_table(space)).select(pl.len()).collect().item()}


def _move(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """A rename on a local disk; a copy then delete on object stores (no directory rename)."""
    fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)
        return
    pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(src)
