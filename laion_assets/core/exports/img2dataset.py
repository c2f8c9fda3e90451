"""A subset's webdataset export in img2dataset's own output layout (`export.layout: img2dataset`,
the default): one folder per subset, its tars numbered across the subset's shards, so one brace
pattern `{00000..N}.tar` covers the subset:

    webdataset/<subset>/00000.tar             {key}.jpg (the stored format), {key}.txt, {key}.json
    webdataset/<subset>/00000.parquet         every subset row of that tar: img2dataset's fields + ours
    webdataset/<subset>/00000_stats.json      img2dataset's per-tar stats (count, successes, status_dict...)
    webdataset/<subset>/sizes.json            samples per tar: what open_clip reads
    webdataset/<subset>/_shards/<shard>.json  what a shard's tars were made from (fingerprint, subset version)

Shards take consecutive tar numbers in shard-key order, ceil(rows / samples_per_tar) each; a
shard's rows are in uid order and keyed like img2dataset's (tar number, then the position in
the tar: 9 digits for 10,000 samples a tar). A shard is rewritten when its fingerprint (its
subset and images files, the export settings, its first tar number) changed; a shard whose tar
count changed moves the shards after it, and the export that sees this rewrites them too.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets import __version__
from laion_assets.core.config import PipelineConfig
from laion_assets.core.exports.webdataset import LAYOUT, ExportReport, _spill_images, _write_tar, export_folder
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.files import LakeFiles, shard_fingerprint
from laion_assets.core.lake.tables import IMAGES, subset_table

SIZES = "sizes.json"
RECORDS = "_shards"
# img2dataset's per-sample fields (downloader.py), first in every json and parquet row
I2D_FIELDS = ("url", "caption", "key", "status", "error_message", "width", "height", "original_width", "original_height", "exif", "sha256")
_TAR_FILE = re.compile(r"(\d{5,})(\.tar|\.parquet|_stats\.json)")


def tar_plan(lake: Lake, subset: str, per_tar: int) -> dict[str, tuple[int, int]]:
    """Each shard of the subset -> (first tar number, tars), in shard-key order."""
    plan, first = {}, 0
    for shard, rows in sorted(_row_counts(lake, subset_table(subset)).items()):
        plan[shard] = (first, -(-rows // per_tar))
        first += plan[shard][1]
    return plan


def _row_counts(lake: Lake, table: str) -> dict[str, int]:
    """Rows per shard from the Delta log's file statistics (no data read), or a scan of the
    shard column where a file has none."""
    actions = pl.from_arrow(pa.table(lake.table(table).get_add_actions(flatten=True)))
    if actions.height and actions["num_records"].null_count() == 0:
        return dict(actions.group_by("partition.shard").agg(pl.col("num_records").sum()).iter_rows())
    return dict(lake.scan(table).group_by("shard").len().collect().iter_rows())


def key_digits(per_tar: int) -> int:
    """Positions in a tar take ceil(log10(samples_per_tar)) digits after the 5 of the tar number."""
    return math.ceil(math.log10(per_tar))


def export_shard_flat(lake: Lake, cfg: PipelineConfig, subset: str, shard: str) -> ExportReport:
    """Write (or keep) the tars of one subset shard, and those of shards it moved."""
    files = LakeFiles(lake, export_folder(subset))
    per_tar = cfg.export.samples_per_tar
    plan = tar_plan(lake, subset, per_tar)
    records = {name.split("/", 1)[1].removesuffix(".json"): files.read_json(name) for name in files.names(RECORDS)}
    report, moved = None, 0
    for s, (first, tars) in plan.items():
        rec = records.get(s)
        placed = rec is not None and rec["first_tar"] == first and len(rec["tars"]) == tars
        if s != shard and placed:
            continue  # its own export keeps it current
        fingerprint = _fingerprint(lake, subset, s, per_tar, first)
        current = rec is not None and rec["fingerprint"] == fingerprint and all(files.exists(t["name"]) for t in rec["tars"])
        if not current:
            rec = records[s] = _write_shard(lake, cfg, files, subset, s, first, fingerprint)
            moved += s != shard
        if s == shard:
            report = _report(rec, files, rewritten=not current)
    for s in set(records) - set(plan):
        files.delete(f"{RECORDS}/{s}.json")
        del records[s]
    total = sum(tars for _, tars in plan.values())
    for name in files.names():
        if (m := _TAR_FILE.fullmatch(name)) and int(m.group(1)) >= total:
            files.delete(name)
    _drop_shard_folders(lake, subset)
    files.write_json(SIZES, {t["name"]: t["samples"] for rec in records.values() for t in rec["tars"]})
    if report is None:  # no row of the subset in this shard
        report = ExportReport(subset, shard, 0, [], False, 0, 0, lake.table(subset_table(subset)).version(), "", files.uri())
    report.moved_shards = moved
    return report


def _fingerprint(lake: Lake, subset: str, shard: str, per_tar: int, first: int) -> str:
    return shard_fingerprint(lake, [subset_table(subset), IMAGES], shard, LAYOUT, per_tar, first, "img2dataset")


def current_record(lake: Lake, cfg: PipelineConfig, subset: str, shard: str) -> dict | None:
    """The shard's record when its tars hold the subset and images as they are now, at the tar
    numbers the subset's shards give it now, and are all there; else None."""
    per_tar = cfg.export.samples_per_tar
    files = LakeFiles(lake, export_folder(subset))
    rec = files.read_json(f"{RECORDS}/{shard}.json") if lake.exists(subset_table(subset)) else None
    place = tar_plan(lake, subset, per_tar).get(shard) if rec else None
    if place is None or rec["fingerprint"] != _fingerprint(lake, subset, shard, per_tar, place[0]):
        return None
    return rec if all(files.exists(t["name"]) for t in rec["tars"]) else None


def _write_shard(lake: Lake, cfg: PipelineConfig, files: LakeFiles, subset: str, shard: str, first: int, fingerprint: str) -> dict:
    start = time.time()
    per_tar, digits = cfg.export.samples_per_tar, key_digits(cfg.export.samples_per_tar)
    table = subset_table(subset)
    subset_version = lake.table(table).version()
    files.delete(f"{RECORDS}/{shard}.json")  # from here until the end the shard is not a finished export
    rows = lake.read_shard(table, shard).drop("shard").sort("uid")
    position = pl.int_range(pl.len(), dtype=pl.Int64)
    key = ((first + position // per_tar) * 10**digits + position % per_tar).cast(pl.String).str.zfill(5 + digits)
    tars, formats = [], {}
    with tempfile.TemporaryDirectory(prefix="laion-export-") as tmp:
        spill = _spill_images(lake, shard, rows["uid"].to_list(), per_tar, Path(tmp))
        stored = pl.col("uid").is_in(list(spill.offsets))
        rows = rows.with_columns(
            key=key,
            status=pl.when(stored).then(pl.lit("success")).otherwise(pl.lit("failed_to_download")),
            error_message=pl.when(stored).then(None).otherwise(pl.lit("no stored image in the images table")).cast(pl.String),
            exif=pl.lit(None, pl.String),  # the lake keeps no EXIF; img2dataset writes null when it has none
            shard=pl.lit(shard),
            *(pl.col(c).cast(pl.Int32) for c in ("width", "height", "original_width", "original_height")),  # img2dataset's int32
        )
        rows = rows.select(*I2D_FIELDS, pl.exclude(I2D_FIELDS))
        for t, offset in enumerate(range(0, rows.height, per_tar)):
            chunk = rows.slice(offset, per_tar)
            name = f"{first + t:05d}"
            samples = chunk.filter(pl.col("status") == "success")
            size = _write_tar(files, f"{name}.tar", samples, spill, cfg.images.format, formats)
            with files.open_output(f"{name}.parquet") as out:
                pq.write_table(_plain_strings(chunk.to_arrow()), out.stream, compression="zstd")
            failed = chunk.height - samples.height
            files.write_json(f"{name}_stats.json", {
                "count": chunk.height, "successes": samples.height, "failed_to_download": failed, "failed_to_resize": 0,
                "duration": time.time() - start, "start_time": start, "end_time": time.time(),
                "status_dict": {k: v for k, v in (("success", samples.height), ("no stored image in the images table", failed)) if v},
            })
            tars.append({"name": f"{name}.tar", "samples": samples.height, "bytes": size})
    record = {
        "subset": subset, "shard": shard, "fingerprint": fingerprint, "subset_version": subset_version,
        "subset_files": shard_fingerprint(lake, [table], shard), "first_tar": first, "samples": sum(t["samples"] for t in tars), "missing_images": spill.missing,
        "formats": formats, "tars": tars, "bytes": sum(t["bytes"] for t in tars), "samples_per_tar": per_tar,
        "layout": LAYOUT, "code_version": __version__, "duration_s": round(time.time() - start, 3),
    }
    files.write_json(f"{RECORDS}/{shard}.json", record)
    return record


def _plain_strings(table: pa.Table) -> pa.Table:
    """Strings as img2dataset's parquet has them (`string`, where polars gives `large_string`)."""
    return table.cast(pa.schema([f.with_type(pa.string()) if f.type == pa.large_string() else f for f in table.schema]))


def _report(rec: dict, files: LakeFiles, rewritten: bool) -> ExportReport:
    return ExportReport(
        rec["subset"], rec["shard"], rec["samples"], [t["name"] for t in rec["tars"]], rewritten,
        rec["missing_images"], rec["bytes"], rec["subset_version"], rec["fingerprint"], files.uri(),
    )


def _drop_shard_folders(lake: Lake, subset: str) -> None:
    """Remove the per-shard folders of the `shards` layout (a lake exported before)."""
    for folder in LakeFiles(lake, export_folder(subset)).folders():
        if folder != RECORDS:
            old = LakeFiles(lake, export_folder(subset, folder))
            old.fs.delete_dir(old.root)  # the folder too: an object store keeps an emptied one as a marker


def flat_train_data(lake: Lake, subset: str) -> tuple[str, list[int]] | None:
    """The brace pattern over the subset's tars and their sample counts (None: not this layout)."""
    files = LakeFiles(lake, export_folder(subset))
    sizes = files.read_json(SIZES)
    if sizes is None:
        return None
    names = sorted(sizes)
    if not names:
        return files.uri(), []
    last = names[-1].removesuffix(".tar")
    pattern = files.uri(names[0]) if len(names) == 1 else files.uri(f"{{{'0' * len(last)}..{last}}}.tar")
    return pattern, [sizes[n] for n in names]
