"""Config of the images stage: how URLs are fetched and how images are checked and stored."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from laion_assets.core.lake.config import Section

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]
Channel = Annotated[int, Field(ge=0, le=255)]


class DownloadConfig(Section):
    """How the images stage fetches URLs."""

    concurrency: int | None = Field(None, ge=1, description="total requests in flight; default 64 per core, at most 512")
    per_host: int = Field(16, ge=1, description="requests in flight per host")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0, description="max wait between two reads")
    total_timeout_s: float = Field(30.0, gt=0, description="whole request incl. body")
    retries: int = Field(1, ge=0, description="extra tries for timeouts, resets, 429 and 5xx")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay, doubled each try")
    max_redirects: int = Field(5, ge=0)
    max_retry_after_s: float = Field(
        5.0, ge=0, description="longest Retry-After waited for; a longer one fails at once (retryable)"
    )
    max_body_bytes: int = Field(32 * 2**20, ge=1024)
    user_agent_token: str | None = Field(None, description="your token in the User-Agent")
    user_agent_url: str = "https://github.com/laion-ai/laion_assets"
    opt_out_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    allowed_networks: tuple[str, ...] = Field(
        (), description="CIDRs exempt from the SSRF guard, e.g. 127.0.0.1/32 for a local server"
    )
    dns_cache_ttl_s: int = Field(300, ge=0)
    min_success_rate: float = Field(0.5, ge=0, le=1, description="quality gate on each shard")
    chunk_rows: int = Field(256, ge=1, description="rows per staged chunk (resume granularity)")
    max_pending_mb: int = Field(256, ge=1, description="downloaded bodies waiting for decode, MiB")
    max_unstaged_rows: int = Field(
        2048, ge=1, description="fetched rows not yet staged; with `concurrency` in flight, what a kill costs a rerun"
    )
    url_blocklist: str | None = Field(None, description="file of URLs or sha256(url) hex, one a line")
    image_blocklist: str | None = Field(None, description="file of sha256 hex of image bytes")
    only_subset: str | None = Field(
        None, description="fetch only the rows that can pass this subset: its rules that need no image, on metadata and adopted spaces"
    )


class ImageConfig(Section):
    """How downloaded images are checked, resized and re-encoded."""

    size: int = Field(256, ge=8)
    resize_mode: ResizeMode = "keep_ratio"
    resize_only_if_bigger: bool = Field(
        False, description="leave images not bigger than `size` as they are (not enlarged, cropped or padded)"
    )
    border_color: tuple[Channel, Channel, Channel] = Field(
        (255, 255, 255), description="RGB padding of resize_mode border (img2dataset's white)"
    )
    downscale_filter: Literal["area", "bicubic", "lanczos"] = Field(
        "area", description="filter to shrink (area = img2dataset's INTER_AREA); enlarging uses lanczos"
    )
    format: Literal["jpg", "webp", "png"] = "jpg"
    quality: int = Field(95, ge=1, le=100)
    skip_reencode: bool = Field(False, description="store original bytes when already small enough")
    min_image_size: int = Field(0, ge=0, description="smallest side, pixels")
    max_aspect_ratio: float | None = Field(None, ge=1)
    max_image_area: int | None = Field(None, ge=1, description="filter: max width*height")
    bbox_col: str | None = Field(
        None, description="raw_urls column of boxes to blur, [x_min, y_min, x_max, y_max] relative (img2dataset's)"
    )
    max_decode_pixels: int = Field(
        89_478_485, ge=1, description="decompression-bomb guard, pixels (Pillow's default)"
    )
