"""Images an img2dataset download already holds, turned into `images` rows without a request:
img2dataset's outcome mapped to the lake's statuses (its own text stays in `error`, and in
raw_urls' `img2dataset_*` columns), its sizes and hash, and each stored image checked to
decode, as stored: another size or format than the lake's config is kept and counted.

Two passes over the stored images keep memory flat in the shard size: `check` decodes each
image (on every core: Pillow releases the GIL while decoding) and returns the rows without
bytes, for the gate; `batches` reads the bytes again for the publish (from a tar, at the
offsets the check found) and refuses any that changed in between.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import polars as pl
import pyarrow as pa
from PIL import Image

from laion_assets.core.images.config import ImageConfig
from laion_assets.core.images.download import IMAGES_SCHEMA
from laion_assets.core.images.imaging import (
    _DECODERS,
    PIL_FORMAT,
    perceptual_hash,
    target_size,
)
from laion_assets.core.ingest.img2dataset import PREFIX, I2dShard, stored_images, stored_images_at
from laion_assets.core.lake.errors import LaionAssetsError

EXT = {v: k for k, v in PIL_FORMAT.items()} | {"MPO": "jpg"}
# img2dataset's resizer errors (resizer.py) by the lake status of the same cause
RESIZE_ERRORS = {"image too small": "too_small", "aspect ratio too large": "bad_aspect_ratio", "image area too large": "too_large"}
_HTTP = re.compile(r"^HTTP Error (\d{3})")
BATCH = 512


def lake_status(status: str | None, error: str | None) -> tuple[str, int | None]:
    """The lake's status (and HTTP status) for img2dataset's `status` and `error_message`."""
    if status == "success":
        return "success", None
    error = error or ""
    if status == "failed_to_resize":
        return RESIZE_ERRORS.get(error, "failed_decode"), None
    if m := _HTTP.match(error):
        return "http_error", int(m.group(1))
    if "X-Robots-Tag" in error:
        return "opted_out", None
    return "failed_download", None


def check_stored(data: bytes) -> dict:
    """Decode stored bytes (JPEGs at a reduced DCT scale, at least 64 px a side: every byte is
    still entropy-decoded, and the pHash is taken from it); sizes, format, pHash or the error."""
    try:
        img = Image.open(io.BytesIO(data), formats=_DECODERS)
        width, height, fmt = *img.size, img.format
        if fmt in ("JPEG", "MPO"):
            img.draft("L", (64, 64))
        img.load()
        return {"width": width, "height": height, "ext": EXT.get(fmt, fmt.lower()), "phash": perceptual_hash(img), "decode_error": None}
    except Exception as e:  # truncated or corrupt bytes raise many kinds
        return {"width": None, "height": None, "ext": None, "phash": None, "decode_error": f"{type(e).__name__}: {e}"}


def _checked(shard: I2dShard, wanted: set[str]) -> Iterator[dict]:
    """One dict per stored image of a wanted key: its checks and the sha256 of its bytes."""
    def one(item: tuple[str, bytes, int | None]) -> dict:
        key, data, offset = item
        return {"key": key, "image_sha256": hashlib.sha256(data).hexdigest(), "stored": len(data), "stored_at": offset, **check_stored(data)}

    items = (item for item in stored_images(shard) if item[0] in wanted)
    with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="adopt-check") as pool:
        while chunk := list(islice(items, 256)):
            yield from pool.map(one, chunk)


def check(shard: I2dShard, raw: pl.DataFrame, icfg: ImageConfig) -> pl.DataFrame:
    """The images rows of a shard without their bytes, one per raw_urls row (`raw`: uid, url
    and the `img2dataset_*` columns), with `stored` (bytes) and `as_configured` (stored at the
    size and format the lake's config would have made) beside them for the gate and stats."""
    key, status, error = PREFIX + "key", PREFIX + "status", PREFIX + "error_message"
    ok = raw.filter(pl.col(status) == "success")
    checked = pl.DataFrame(list(_checked(shard, set(ok[key].to_list()))), schema={
        "key": pl.String, "image_sha256": pl.String, "stored": pl.Int64, "stored_at": pl.Int64, "width": pl.Int32, "height": pl.Int32,
        "ext": pl.String, "phash": pl.String, "decode_error": pl.String,
    })
    mapped = [lake_status(s, e) for s, e in zip(raw[status].to_list(), raw[error].to_list())]
    rows = raw.select(
        "uid", "url", pl.col(key).alias("key"), pl.col(error).alias("error"),
        status=pl.Series([m[0] for m in mapped], dtype=pl.String), http_status=pl.Series([m[1] for m in mapped], dtype=pl.Int32),
        original_width=_col(raw, "original_width", pl.Int32), original_height=_col(raw, "original_height", pl.Int32),
        sha256=_col(raw, "sha256", pl.String), md5=_col(raw, "md5", pl.String),
    ).join(checked, on="key", how="left")
    unreadable = pl.col("decode_error").is_not_null() | pl.col("stored").is_null()
    rows = rows.with_columns(
        error=pl.when((pl.col("status") == "success") & unreadable).then(pl.format(
            "img2dataset stored it, but {}", pl.col("decode_error").fill_null(pl.format("{} holds no {}.{}", pl.lit(shard.container), "key", pl.lit(shard.encode_format))),
        )).otherwise("error"),
        status=pl.when((pl.col("status") == "success") & unreadable).then(pl.lit("failed_decode")).otherwise("status"),
    ).with_columns(
        [pl.when(pl.col("status") == "success").then(c).alias(c) for c in ("image_sha256", "stored", "width", "height", "ext", "phash")]
    )
    return rows.with_columns(as_configured=_as_configured(rows, icfg))


def _col(raw: pl.DataFrame, name: str, dtype) -> pl.Expr:
    return pl.col(PREFIX + name).cast(dtype) if PREFIX + name in raw.columns else pl.lit(None, dtype)


def _as_configured(rows: pl.DataFrame, icfg: ImageConfig) -> pl.Series:
    """Whether each stored image has the format and size the lake's config would have stored."""
    out = []
    for ext, w, h, ow, oh in rows.select("ext", "width", "height", "original_width", "original_height").iter_rows():
        if ext is None:
            out.append(None)
            continue
        size = (icfg.size, icfg.size) if icfg.resize_mode in ("center_crop", "border") else target_size(ow or w, oh or h, icfg)
        out.append(ext == icfg.format and (w, h) == size)
    return pl.Series(out, dtype=pl.Boolean)


def batches(shard: I2dShard, rows: pl.DataFrame) -> Iterator[pa.RecordBatch]:
    """The images rows with their bytes, in IMAGES_SCHEMA: stored images in the container's
    order, then the rows without one. Bytes that no longer match the checked ones are refused."""
    table = rows.select(
        "uid", "url", "status", "error", retryable=pl.lit(False), http_status="http_status",
        content_type=pl.lit(None, pl.String), attempts=pl.lit(None, pl.Int32), bytes_downloaded=pl.lit(None, pl.Int64),
        original_width="original_width", original_height="original_height", width="width", height="height",
        sha256="sha256", duration_s=pl.lit(None, pl.Float32), md5="md5", sha1=pl.lit(None, pl.String), phash="phash",
        image_sha256="image_sha256", key="key", stored_at="stored_at", stored="stored",
    )
    stored = table.filter(pl.col("status") == "success").sort("stored_at", nulls_last=True, maintain_order=True)
    by_key = {k: i for i, k in enumerate(stored["key"].to_list())}
    sums, columns = stored["image_sha256"].to_list(), stored.drop("key", "stored_at", "stored").to_arrow()
    order, blobs = [], []

    def flush() -> list[pa.RecordBatch]:
        part = columns.take(order).append_column("image", pa.array(blobs, pa.binary()))
        order.clear()
        blobs.clear()
        return part.select(IMAGES_SCHEMA.names).cast(IMAGES_SCHEMA).to_batches()

    for key, data in stored_images_at(shard, stored.select("key", "stored_at", "stored").iter_rows()):
        i = by_key.pop(key, None)
        if i is None:
            continue
        if hashlib.sha256(data).hexdigest() != sums[i]:
            raise LaionAssetsError(f"{shard.container}: {key}.{shard.encode_format} changed while it was adopted: adopt the shard again")
        order.append(i)
        blobs.append(data)
        if len(order) == BATCH:
            yield from flush()
    if by_key:
        raise LaionAssetsError(f"{shard.container}: {len(by_key)} images checked a moment ago are gone (e.g. {next(iter(by_key))}): adopt the shard again")
    if order:
        yield from flush()
    rest = table.filter(pl.col("status") != "success").drop("key", "stored_at", "stored").with_columns(image=pl.lit(None, pl.Binary))
    if rest.height:
        yield from rest.to_arrow().select(IMAGES_SCHEMA.names).cast(IMAGES_SCHEMA).to_batches()
