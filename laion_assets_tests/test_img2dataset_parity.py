"""img2dataset itself beside our images stage, on the same images and inputs served from
127.0.0.1: every case img2dataset's own tests cover (tests/test_resizer.py, test_main.py,
test_downloader.py: resize mode x resize_only_if_bigger x skip_reencode x format x size; the
three filters; every input format; box blurring; the X-Robots-Tag route) must give the same
success or failure, the same sizes, the same border colour (and the same hashes of the
downloaded bytes).

Both sides run in this process (~4 min on 2 busy cores, most of it the 78 resize cases):
img2dataset's own Reader, Downloader and Resizer on one shard per case (and its `download()`
once, on a .txt list), beside our reader and our stage's shard loop (ShardDownloader, decoding
on threads) and, for the blur, the images stage itself. The differences README's "Coming from
img2dataset" names are checked as documented.
"""

from __future__ import annotations

import gzip
import io
import random
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from img2dataset import download
from img2dataset.blurrer import BoundingBoxBlurrer
from img2dataset.downloader import Downloader
from img2dataset.reader import Reader
from img2dataset.resizer import Resizer
from img2dataset.writer import ParquetSampleWriter
from PIL import Image

from laion_assets.core import stages
from laion_assets.core.images.config import DownloadConfig, ImageConfig
from laion_assets.core.images.download import I2D_STATUS, ShardDownloader
from laion_assets.core.images.imaging import ImageProcessor
from laion_assets.core.ingest import registry
from laion_assets.core.ingest.reader import normalize, read_shard_file
from laion_assets.core.lake.delta import Lake
from laion_assets_tests.conftest import make_config, shared_file

pytestmark = [pytest.mark.shared, pytest.mark.slow]  # img2dataset's own test photos, from ../shared

DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]  # img2dataset's default opt-out
# img2dataset's error_message for what our status names
ERRORS = {
    "opted_out": "Use of image disallowed by X-Robots-Tag directive",
    "too_small": "image too small",
    "too_large": "image area too large",
    "bad_aspect_ratio": "aspect ratio too large",
}
# tests/test_resizer.py's cases: (resize_mode, resize_only_if_bigger, skip_reencode)
MODES = [
    ("border", False, False), ("border", False, True), ("border", True, False),
    ("keep_ratio", False, False), ("keep_ratio", True, False), ("keep_ratio", True, True),
    ("keep_ratio_largest", False, False), ("keep_ratio_largest", True, False), ("keep_ratio_largest", True, True),
    ("center_crop", False, False), ("center_crop", True, False),
    ("no", False, False), ("no", False, True),
]
# img2dataset's tests use png "quality" 9, its zlib level: 1 decides the same sizes 5x sooner
FORMATS = [(95, "jpg"), (95, "webp"), (1, "png")]
INPUT_FORMATS = ["txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl", "jsonl.gz", "parquet"]


class _Handler(SimpleHTTPRequestHandler):
    """/allowed/<photo> and /disallowed/<photo>, the latter with the X-Robots-Tag header of
    img2dataset's test server."""

    def translate_path(self, path: str) -> str:
        return super().translate_path(path.replace("/allowed/", "/", 1).replace("/disallowed/", "/", 1))

    def end_headers(self) -> None:
        if self.path.startswith("/disallowed/"):
            self.send_header("X-Robots-Tag", "noai, noimageai, noindex, noimageindiex, nofollow")
        super().end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """img2dataset's resize_test_image folder (its seven photos, named W_H.jpg)."""
    folder = shared_file("data", "real-photos")
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.jpg"))}


@pytest.fixture(scope="module")
def base_url(photos):
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(shared_file("data", "real-photos"))))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def ours(opts: dict) -> ImageConfig:
    """Our images config for img2dataset's options (README's table, as code)."""
    names = {"image_size": "size", "encode_format": "format", "encode_quality": "quality"}
    cfg = {names.get(k, k): v for k, v in opts.items()}
    if cfg.get("format") == "png":
        cfg.pop("quality")  # img2dataset's png "quality" is zlib effort; our png has no setting
    return ImageConfig(**cfg)


def lake_run(rows: list[tuple], icfg: ImageConfig) -> dict[str, dict]:
    """Our images stage's shard loop over (uid, url[, boxes]) rows: url -> row."""
    chunks: list[pa.Table] = []
    dcfg = DownloadConfig(allowed_networks=("127.0.0.1/32",), retries=0, opt_out_directives=tuple(DIRECTIVES))
    ShardDownloader(dcfg, icfg, decode="thread", workers=2).run(rows, len(rows), chunks.append)
    return {r["url"]: r for t in chunks for r in t.to_pylist()}


def i2d_run(folder: Path, urls: list[str], opts: dict, boxes: list | None = None) -> dict[str, dict]:
    """img2dataset's own Downloader and Resizer on one shard of `urls`: url -> its parquet row,
    the stored bytes under 'image'."""
    folder.mkdir(parents=True)
    columns = {"url": urls} | ({"bboxes": boxes} if boxes is not None else {})
    shard = folder / "shard.feather"
    with pa.OSFile(str(shard), "wb") as f, pa.ipc.new_file(f, pa.table(columns).schema) as w:
        w.write_table(pa.table(columns))
    opts = {"resize_mode": "no", "resize_only_if_bigger": False, **opts}
    resizer = Resizer(blurrer=BoundingBoxBlurrer() if boxes is not None else None, **opts)
    Downloader(
        ParquetSampleWriter, resizer, thread_count=8, save_caption=False, extract_exif=False,
        output_folder=str(folder), column_list=list(columns), timeout=10, number_sample_per_shard=len(urls),
        oom_shard_count=5, compute_hash="sha256", verify_hash_type=None, encode_format=opts.get("encode_format", "jpg"),
        retries=0, user_agent_token=None, disallowed_header_directives=DIRECTIVES,
        blurring_bbox_col="bboxes" if boxes is not None else None,
    ).download_shard((0, str(shard)))
    rows = pq.read_table(folder / "00000.parquet").to_pylist()
    return {r["url"]: {**r, "image": r[opts.get("encode_format", "jpg")]} for r in rows}


def pixels(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def assert_same(theirs: dict[str, dict], mine: dict[str, dict], originals: dict[str, bytes], opts: dict) -> None:
    """Row by row: img2dataset's status and error, sizes, format, whether the original bytes
    were kept, and the border's colour."""
    assert set(mine) == set(theirs)
    for url, t in theirs.items():
        o, case = mine[url], f"{url} {opts}"
        assert I2D_STATUS[o["status"]] == t["status"], f"{case}: ours {o['status']} ({o['error']}), img2dataset {t['status']} ({t['error_message']})"
        if t["status"] != "success":
            assert ERRORS[o["status"]] == t["error_message"], case
            continue
        size = (t["width"], t["height"])
        assert (o["width"], o["height"]) == size == pixels(t["image"]).size == pixels(o["image"]).size, case
        assert (o["original_width"], o["original_height"]) == (t["original_width"], t["original_height"]), case
        assert o["sha256"] == t["sha256"], case  # of the downloaded bytes
        assert pixels(o["image"]).format == pixels(t["image"]).format, case
        original = originals[url.rsplit("/", 1)[1]]
        assert (o["image"] == original) == (t["image"] == original), f"{case}: original bytes kept by one side only"
        w, h = t["original_width"], t["original_height"]
        if opts.get("resize_mode") == "border" and size == (opts["image_size"],) * 2 and w != h:
            corner = (0, 0)  # the padding starts at the top left of a picture that is not square
            theirs_rgb = pixels(t["image"]).convert("RGB").getpixel(corner)
            assert np.allclose(pixels(o["image"]).convert("RGB").getpixel(corner), theirs_rgb, atol=8), case
            assert np.allclose(theirs_rgb, (255, 255, 255), atol=8), case


def test_resize_matrix_matches_img2dataset(photos, base_url, tmp_path):
    """test_resizer.py's 13 mode cases x 3 formats x sizes 256 and 512, each photo fetched
    from an allowed and an opted-out route (test_downloader.py's X-Robots-Tag header)."""
    urls = [f"{base_url}/{route}/{name}" for route in ("allowed", "disallowed") for name in photos]
    rows = list(enumerate(urls))
    cases = 0
    for (mode, only_if_bigger, skip), (quality, fmt), size in (
        (m, f, s) for m in MODES for f in FORMATS for s in (256, 512)
    ):
        opts = dict(image_size=size, resize_mode=mode, resize_only_if_bigger=only_if_bigger,
                    skip_reencode=skip, encode_quality=quality, encode_format=fmt)
        theirs = i2d_run(tmp_path / f"{cases}", urls, opts)
        assert_same(theirs, lake_run(rows, ours(opts)), photos, opts)
        cases += 1
    assert cases == 78


@pytest.mark.parametrize("filters", [
    dict(min_image_size=200, max_aspect_ratio=1.5),  # test_resizer_filter: 2 kept, 2 too small, 3 too wide
    dict(max_image_area=60000),  # 2 kept, 5 too large
    dict(max_image_area=100_000, max_aspect_ratio=1.5),  # both fail: the area is checked first
])
def test_filters_match_img2dataset(photos, base_url, tmp_path, filters):
    urls = [f"{base_url}/allowed/{name}" for name in photos]
    opts = dict(image_size=256, resize_mode="no", resize_only_if_bigger=True, **filters)
    theirs = i2d_run(tmp_path / "i2d", urls, opts)
    assert_same(theirs, lake_run(list(enumerate(urls)), ours(opts)), photos, opts)
    assert {t["error_message"] for t in theirs.values()} - {None} <= set(ERRORS.values())


def test_border_colour_is_configurable(photos):
    blue = ours(dict(image_size=600, resize_mode="border")).model_copy(update={"border_color": (0, 0, 255)})
    out = ImageProcessor(blue)(photos["524_316.jpg"])
    assert pixels(out.image).getpixel((0, 0)) == pytest.approx((0, 0, 255), abs=8)


def _input_file(folder: Path, fmt: str, test_list: list[tuple[str, str]]) -> Path:
    """An input file as img2dataset's test fixtures write it (pandas, its index included)."""
    path = folder / f"url_list.{fmt}"
    df = pd.DataFrame(test_list, columns=["caption", "url"])
    gz = "gzip" if fmt.endswith(".gz") else None
    base = fmt.removesuffix(".gz")
    if base == "txt":
        text = "".join(url + "\n" for _, url in test_list)
        path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    elif base in ("csv", "tsv"):
        df.to_csv(path, sep="\t" if base == "tsv" else ",", compression=gz)
    elif base == "json":
        df.to_json(path, compression=gz)
    elif base == "jsonl":
        df.to_json(path, orient="records", lines=True, compression=gz)
    else:
        df.to_parquet(path)
    return path


def i2d_download(path: Path, fmt: str, out: Path, whole: bool) -> list[dict]:
    """img2dataset over one input file: its `download()` (whole), or the Reader and Downloader
    that `download()` wires together, in this process (its process pool and logger process
    spawn fresh interpreters: ~25 s a call on 2 cores)."""
    if whole:
        download(str(path), image_size=256, output_folder=str(out), thread_count=8, input_format=fmt,
                 output_format="parquet", url_col="url", caption_col="caption", resize_mode="keep_ratio",
                 extract_exif=False, compute_hash="md5")
    else:
        (out / "_tmp").mkdir(parents=True)
        reader = Reader(str(path), fmt, "url", "caption", None, None, None, 10_000, set(), str(out / "_tmp"))
        downloader = Downloader(
            ParquetSampleWriter, Resizer(256, "keep_ratio", False), thread_count=8, save_caption=True,
            extract_exif=False, output_folder=str(out), column_list=reader.column_list, timeout=10,
            number_sample_per_shard=10_000, oom_shard_count=5, compute_hash="md5", verify_hash_type=None,
            encode_format="jpg", retries=0, user_agent_token=None, disallowed_header_directives=DIRECTIVES,
        )
        for shard in reader:
            downloader.download_shard(shard)
    return pq.read_table(out / "00000.parquet").to_pylist()


@pytest.mark.parametrize("fmt", INPUT_FORMATS)
def test_every_input_format_matches_img2dataset(photos, base_url, tmp_path, fmt):
    """test_main.py's input formats, read by img2dataset (its `download()` for .txt, its
    default) and by our reader, then downloaded by both. As in img2dataset's fixtures, URLs are
    drawn at random from the photos (so a URL may repeat) and half the rows are opted out; the
    first caption is empty. A repeated row (same URL and caption: any repeated URL in a .txt
    list, which has no captions) is downloaded again by img2dataset and kept out as
    duplicate_uid by the lake."""
    rng = random.Random(fmt)
    picks = [rng.choice(list(photos)) for _ in range(5)]
    picks[4] = picks[3]  # one repeat for sure
    test_list = [(f"caption {i}" if i else "", f"{base_url}/{route}/{name}")
                 for route in ("allowed", "disallowed") for i, name in enumerate(picks)]
    path = _input_file(tmp_path, fmt, test_list)
    theirs = i2d_download(path, fmt, tmp_path / "i2d", whole=fmt == "txt")

    read = normalize(read_shard_file(str(path)), str(path))
    assert read.input_rows == len(theirs) == len(test_list)
    mine = lake_run(list(read.rows.select("uid", "url").iter_rows()), ImageConfig(size=256, resize_mode="keep_ratio"))
    kept = {(r["url"], r["caption"] or None) for r in read.rows.iter_rows(named=True)}
    repeats = [(r["url"], r["caption"] or None) for r in read.rejected.iter_rows(named=True)]
    assert set(read.rejected["reason"]) <= {"duplicate_uid"}
    assert read.kept_out["duplicate_uid"] >= (2 if fmt.startswith("txt") else 0)
    seen = [(t["url"], t.get("caption") or None) for t in theirs]  # a .txt list has no caption column
    assert sorted(seen, key=repr) == sorted([*kept, *repeats], key=repr)  # every row img2dataset read: kept, or kept out as a repeat
    for t in theirs:
        o = mine[t["url"]]
        assert I2D_STATUS[o["status"]] == t["status"], t["url"]
        if t["status"] == "success":
            assert (o["width"], o["height"], o["md5"]) == (t["width"], t["height"], t["md5"])
        else:
            assert ERRORS[o["status"]] == t["error_message"]


BOXES = [[0.1, 0.2, 0.4, 0.6], [0.55, 0.5, 0.9, 0.95]]


@pytest.mark.parametrize("mode", ["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"])
@pytest.mark.parametrize("size, only_if_bigger", [(600, False), (600, True), (256, False)])
def test_bbox_blur_matches_img2dataset(photos, base_url, tmp_path, mode, size, only_if_bigger):
    """test_main.py's test_blur_and_resize (size 600, every mode, with and without
    resize_only_if_bigger) plus a shrink to 256: same sizes; without a resize the same pixels;
    with one (where the two resizers differ a little), where img2dataset's blur changed the
    picture ours is much closer to its blurred picture than to its unblurred one."""
    url = f"{base_url}/allowed/524_316.jpg"
    opts = dict(image_size=size, resize_mode=mode, resize_only_if_bigger=only_if_bigger, encode_format="png", encode_quality=1)
    theirs = i2d_run(tmp_path / "blur", [url], opts, boxes=[BOXES])[url]
    plain = i2d_run(tmp_path / "plain", [url], opts)[url]
    mine = lake_run([(0, url, BOXES)], ours(opts).model_copy(update={"bbox_col": "bboxes"}))[url]
    assert mine["status"] == theirs["status"] == "success"
    a, b, c = (np.asarray(pixels(r["image"]).convert("RGB"), dtype=np.int16) for r in (mine, theirs, plain))
    assert a.shape == b.shape
    if (theirs["width"], theirs["height"]) == (theirs["original_width"], theirs["original_height"]):
        assert np.abs(a - b).max() <= 2  # the JPEG decoders' rounding only
    blurred = np.abs(b - c).max(axis=2) > 16  # where img2dataset's blur changed the picture
    assert blurred.mean() > 0.05
    assert np.abs(a - b)[blurred].mean() < 0.25 * np.abs(b - c)[blurred].mean()


def test_blur_through_the_images_stage(photos, base_url, tmp_path):
    """bbox_col end to end: the boxes travel from the input file through raw_urls to the
    decode worker processes, and the stored picture is img2dataset's blurred one."""
    url = f"{base_url}/allowed/321_421.jpg"
    src = tmp_path / "in" / "part-0.parquet"
    src.parent.mkdir()
    pq.write_table(pa.table({"url": [url, f"{base_url}/allowed/123_456.jpg"], "caption": ["a", "b"], "faces": [BOXES, []]}), src)
    lake = Lake(tmp_path / "lake")
    registry.register(lake, [str(src)])
    cfg = make_config(images=ImageConfig(size=256, resize_mode="no", format="png", bbox_col="faces"))
    stages.run_raw_urls(lake, cfg, "part-0")
    stages.run_images(lake, cfg, "part-0")
    stored = {r["url"]: r for r in lake.read_shard(stages.IMAGES, "part-0").iter_rows(named=True)}
    theirs = i2d_run(tmp_path / "i2d", [url], dict(image_size=256, encode_format="png", encode_quality=1), boxes=[BOXES])[url]
    a, b = (np.asarray(pixels(r["image"]).convert("RGB"), dtype=np.int16) for r in (stored[url], theirs))
    assert np.abs(a - b).max() <= 2
    unblurred = stored[f"{base_url}/allowed/123_456.jpg"]
    assert unblurred["status"] == "success"


def _jpeg(size: tuple[int, int], orientation: int = 1) -> bytes:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    exif = img.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def test_the_differences_readme_names(tmp_path):
    """README's "Where the results differ on purpose", each checked against img2dataset (the
    repeated row is in test_every_input_format_matches_img2dataset)."""
    # EXIF orientation: applied here, ignored by img2dataset
    rotated = _jpeg((400, 200), orientation=6)  # shown 200 wide, 400 high
    _, w, h, *_ = Resizer(100, "keep_ratio", False)(io.BytesIO(rotated))
    mine = ImageProcessor(ours(dict(image_size=100, resize_mode="keep_ratio")))(rotated)
    assert (w, h) == (200, 100) and (mine.width, mine.height) == (100, 200)

    # blur with skip_reencode and no resize: img2dataset keeps the unblurred original
    photo = _jpeg((300, 200))
    kept, *_ = Resizer(256, "no", False, skip_reencode=True, blurrer=BoundingBoxBlurrer())(io.BytesIO(photo), BOXES)
    blurred = ImageProcessor(ours(dict(image_size=256, skip_reencode=True)))(photo, BOXES)
    assert kept == photo and blurred.image != photo and blurred.status == "success"

    # skip_reencode on an image already at the target size: kept here, re-encoded by img2dataset
    exact = _jpeg((256, 300))
    again, *_ = Resizer(256, "keep_ratio", False, skip_reencode=True)(io.BytesIO(exact))
    assert again != exact and ImageProcessor(ours(dict(image_size=256, skip_reencode=True)))(exact).image == exact

    # a .txt line is the URL as written; img2dataset reads the file as CSV and a comma splits it
    urls = tmp_path / "urls.txt"
    urls.write_text("https://a.example/x,y.jpg\nhttps://a.example/z.jpg\n")
    assert normalize(read_shard_file(str(urls)), str(urls)).rows["url"].to_list() == ["https://a.example/x,y.jpg", "https://a.example/z.jpg"]
    reader = Reader(str(urls), "txt", "url", None, None, None, None, 10_000, set(), str(tmp_path))
    with pytest.raises(pa.ArrowInvalid, match="Expected 1 columns, got 2"):
        list(reader)
