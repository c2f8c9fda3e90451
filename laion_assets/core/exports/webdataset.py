"""Webdataset export of a subset. The default layout is img2dataset's own (`img2dataset.py`: one
folder, tars numbered across shards); `export.layout: shards` keeps one folder per subset shard:

    webdataset/<subset>/<shard>/00000.tar      {key}.jpg (the stored format), {key}.txt, {key}.json
    webdataset/<subset>/<shard>/00000.parquet  the same metadata, one row per sample
    webdataset/<subset>/<shard>/stats.json     counts, tars, and what they were made from

Samples are keyed by their uid (16 hex digits of the unsigned 64-bit uid) and ordered by key, so
keys do not move when a row leaves the subset, and the same rows give byte-identical tars.
A shard folder is rewritten only when its fingerprint (the subset and images files of the
shard, the export settings) changed; `stats.json` goes first and is written last.
Memory holds one record batch of images: they are spilled to local temporary files per tar in
one pass over the images shard, then each tar is written in key order.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from laion_assets import __version__
from laion_assets.core.config import PipelineConfig
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.lake.files import LakeFiles, shard_fingerprint
from laion_assets.core.lake.tables import IMAGES, subset_table

LAYOUT = 1  # bump when the tar layout changes: every shard is rewritten
STATS = "stats.json"


def export_folder(subset: str, shard: str | None = None) -> str:
    return f"webdataset/{subset}" + (f"/{shard}" if shard else "")


def sample_key(uid: int) -> str:
    return f"{uid & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def image_ext(blob: bytes, default: str) -> str:
    """The stored format, from the bytes' signature."""
    if blob[:3] == b"\xff\xd8\xff":
        return "jpg"
    if blob[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return "webp"
    return default


@dataclass
class ExportReport:
    subset: str
    shard: str
    samples: int
    tars: list[str]
    rewritten: bool
    missing_images: int
    bytes: int
    subset_version: int
    fingerprint: str
    location: str
    moved_shards: int = 0  # other shards' tars renumbered (img2dataset layout)

    def as_metadata(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "tars"} | {"tar_count": len(self.tars)}


def export_shard(lake: Lake, cfg: PipelineConfig, subset: str, shard: str) -> ExportReport:
    """Write (or keep) the tars of one subset shard."""
    table = subset_table(subset)
    if not lake.exists(table):
        raise LaionAssetsError(f"subset '{subset}' has no table yet: materialize {table} first")
    if cfg.export.layout == "img2dataset":
        from laion_assets.core.exports.img2dataset import export_shard_flat  # it builds on this module

        return export_shard_flat(lake, cfg, subset, shard)
    files = LakeFiles(lake, export_folder(subset, shard))
    fingerprint, subset_files = _fingerprints(lake, cfg, subset, shard)
    subset_version = lake.table(table).version()
    old = current_export(lake, cfg, subset, shard)
    if old:
        return _report(old, files, rewritten=False)

    start = time.monotonic()
    rows = lake.read_shard(table, shard).drop("shard")
    rows = rows.insert_column(0, pl.Series("key", [sample_key(uid) for uid in rows["uid"]], pl.String)).sort("key")
    files.delete(STATS)  # from here until the end the folder is not a finished export
    per_tar = cfg.export.samples_per_tar
    with tempfile.TemporaryDirectory(prefix="laion-export-") as tmp:
        spill = _spill_images(lake, shard, rows["uid"].to_list(), per_tar, Path(tmp))
        rows = rows.filter(pl.col("uid").is_in(list(spill.offsets)))
        rows = rows.with_columns(shard=pl.lit(shard))
        tars, formats = [], {}
        for t, start_row in enumerate(range(0, rows.height, per_tar)):
            chunk = rows.slice(start_row, per_tar)
            name = f"{t:05d}"
            size = _write_tar(files, f"{name}.tar", chunk, spill, cfg.images.format, formats)
            with files.open_output(f"{name}.parquet") as out:
                pq.write_table(chunk.to_arrow(), out.stream, compression="zstd")
            tars.append({"name": f"{name}.tar", "samples": chunk.height, "bytes": size})
    keep = {t["name"] for t in tars} | {t["name"].replace(".tar", ".parquet") for t in tars}
    for stale in set(files.names()) - keep:
        files.delete(stale)
    stats = {
        "subset": subset, "shard": shard, "fingerprint": fingerprint, "subset_version": subset_version, "subset_files": subset_files,
        "samples": rows.height, "missing_images": spill.missing, "formats": formats, "tars": tars,
        "bytes": sum(t["bytes"] for t in tars), "samples_per_tar": per_tar, "layout": LAYOUT,
        "code_version": __version__, "duration_s": round(time.monotonic() - start, 3),
    }
    files.write_json(STATS, stats)
    return _report(stats, files, rewritten=True)


def _fingerprints(lake: Lake, cfg: PipelineConfig, subset: str, shard: str) -> tuple[str, str]:
    """What a shard's tars are made from (subset and images files, layout), and the subset
    shard's files alone (what exports/freshness.py compares)."""
    table = subset_table(subset)
    return shard_fingerprint(lake, [table, IMAGES], shard, LAYOUT, cfg.export.samples_per_tar), shard_fingerprint(lake, [table], shard)


def current_export(lake: Lake, cfg: PipelineConfig, subset: str, shard: str) -> dict | None:
    """The shard's record when its tars are made from the subset and images as they are
    now, with these settings, and all still there; else None (the shard must be written)."""
    if cfg.export.layout == "img2dataset":
        from laion_assets.core.exports.img2dataset import current_record

        return current_record(lake, cfg, subset, shard)
    files = LakeFiles(lake, export_folder(subset, shard))
    old = files.read_json(STATS) if lake.exists(subset_table(subset)) else None
    if not old or [old["fingerprint"], old.get("subset_files")] != list(_fingerprints(lake, cfg, subset, shard)):
        return None
    return old if all(files.exists(t["name"]) for t in old["tars"]) else None


def export_record(lake: Lake, subset: str, shard: str) -> dict | None:
    """What the shard's tars were made from (its `_shards/<shard>.json` in img2dataset's layout,
    its stats.json in the shards layout); None: the shard has no finished export."""
    from laion_assets.core.exports.img2dataset import RECORDS

    flat = LakeFiles(lake, export_folder(subset)).read_json(f"{RECORDS}/{shard}.json")
    return flat if flat is not None else LakeFiles(lake, export_folder(subset, shard)).read_json(STATS)


def exported_shards(lake: Lake, subset: str) -> set[str]:
    """The shards the subset's export has tars (or a folder) of, in either layout."""
    from laion_assets.core.exports.img2dataset import RECORDS

    files = LakeFiles(lake, export_folder(subset))
    flat = {name.split("/", 1)[1].removesuffix(".json") for name in files.names(RECORDS)}
    return flat | {folder for folder in files.folders() if folder != RECORDS}


def _report(stats: dict, files: LakeFiles, rewritten: bool) -> ExportReport:
    return ExportReport(
        stats["subset"], stats["shard"], stats["samples"], [t["name"] for t in stats["tars"]], rewritten,
        stats["missing_images"], stats["bytes"], stats["subset_version"], stats["fingerprint"], files.uri(),
    )


@dataclass
class _Spill:
    """Image bytes of a shard in local files, one per tar: uid -> (tar, offset, length)."""

    folder: Path
    offsets: dict[int, tuple[int, int, int]]
    missing: int

    def read(self, uid: int, handles: dict) -> bytes:
        t, offset, length = self.offsets[uid]
        f = handles.get(t) or handles.setdefault(t, open(self.folder / f"{t}.bin", "rb"))
        f.seek(offset)
        return f.read(length)


def _spill_images(lake: Lake, shard: str, uids: list[int], per_tar: int, folder: Path) -> _Spill:
    rank = {uid: i for i, uid in enumerate(uids)}
    outs: dict[int, io.BufferedWriter] = {}
    offsets: dict[int, tuple[int, int, int]] = {}
    try:
        for batch in lake.batches(IMAGES, shard, ["uid", "image"], uids=uids):
            for uid, blob in zip(batch["uid"].to_pylist(), batch["image"].to_pylist()):
                if blob is None or uid in offsets:
                    continue
                t = rank[uid] // per_tar
                out = outs.get(t) or outs.setdefault(t, open(folder / f"{t}.bin", "wb"))
                offsets[uid] = (t, out.tell(), len(blob))
                out.write(blob)
    finally:
        for out in outs.values():
            out.close()
    return _Spill(folder, offsets, len(uids) - len(offsets))


def _write_tar(files: LakeFiles, name: str, chunk: pl.DataFrame, spill: _Spill, default_ext: str, formats: dict) -> int:
    """One tar: for each sample in key order, its image, caption and metadata; fixed owner,
    mode and time so the same samples give the same bytes."""
    meta = chunk.select(pl.exclude(pl.Binary)).write_ndjson().splitlines()
    handles: dict = {}
    try:
        with files.open_output(name) as out:
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for key, uid, caption, line in zip(chunk["key"], chunk["uid"], chunk["caption"], meta):
                    blob = spill.read(uid, handles)
                    ext = image_ext(blob, default_ext)
                    formats[ext] = formats.get(ext, 0) + 1
                    for member, data in ((f"{key}.{ext}", blob), (f"{key}.txt", (caption or "").encode()), (f"{key}.json", line.encode())):
                        info = tarfile.TarInfo(member)
                        info.size, info.mtime, info.mode = len(data), 0, 0o444
                        tar.addfile(info, io.BytesIO(data))
            size = out.tell()
    finally:
        for f in handles.values():
            f.close()
    return size


def train_shards(lake: Lake, subset: str) -> tuple[list[str], int]:
    """The finished tars of a subset (URIs) and their sample count."""
    pattern, sizes = train_data(lake, subset)
    if not sizes:
        return [], 0
    import braceexpand

    return [u for part in pattern.split("::") for u in braceexpand.braceexpand(part)], sum(sizes)


def train_data(lake: Lake, subset: str) -> tuple[str, list[int]]:
    """What open_clip's `--train-data` takes for the subset's finished tars (a brace pattern in
    img2dataset's layout, `::`-joined URIs in the shards layout), and the samples of each tar."""
    from laion_assets.core.exports.img2dataset import flat_train_data

    flat = flat_train_data(lake, subset)
    if flat is not None:
        return flat
    root = LakeFiles(lake, export_folder(subset))
    urls, sizes = [], []
    for shard in root.folders():
        stats = LakeFiles(lake, export_folder(subset, shard)).read_json(STATS)
        if stats:
            urls += [root.uri(f"{shard}/{t['name']}") for t in stats["tars"]]
            sizes += [t["samples"] for t in stats["tars"]]
    return "::".join(urls), sizes
