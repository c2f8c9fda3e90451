import io

import pytest
from PIL import Image

from laion_assets.core.images.config import ImageConfig
from laion_assets.core.images.imaging import ImageProcessor
from laion_assets_tests.conftest import shared_file

pytestmark = pytest.mark.shared  # some tests read LAION's real files in ../shared


def photo(name="208_495") -> bytes:
    return shared_file("data", "real-photos", f"{name}.jpg").read_bytes()


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("keep_ratio", (256, 609)),  # smallest side 256
        ("keep_ratio_largest", (108, 256)),  # largest side 256
        ("center_crop", (256, 256)),
        ("border", (256, 256)),
        ("no", (208, 495)),
    ],
)
def test_resize_modes_on_a_real_photo(mode, expected):
    res = ImageProcessor(ImageConfig(size=256, resize_mode=mode))(photo())
    assert res.status == "success", res.error
    assert (res.original_width, res.original_height) == (208, 495)
    assert (res.width, res.height) == expected == size_of(res.image)


@pytest.mark.parametrize("fmt, pil", [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_encode_formats(fmt, pil):
    res = ImageProcessor(ImageConfig(size=64, format=fmt))(photo())
    assert Image.open(io.BytesIO(res.image)).format == pil


def test_broken_bodies_fail_cleanly():
    proc = ImageProcessor(ImageConfig())
    html = proc(b"<!DOCTYPE html><html><body>nope</body></html>")
    assert (html.status, html.error) == ("failed_decode", "not an image: HTML/XML document")
    data = photo()
    truncated = proc(data[: len(data) // 2])
    assert truncated.status == "failed_decode" and "truncated" in truncated.error


def test_filters_are_statuses_not_drops():
    data = photo("123_456")
    assert ImageProcessor(ImageConfig(min_image_size=200))(data).status == "too_small"
    assert ImageProcessor(ImageConfig(max_aspect_ratio=2.0))(data).status == "bad_aspect_ratio"
    assert ImageProcessor(ImageConfig(max_image_area=10_000))(data).status == "too_large"


def test_decompression_bomb_guard():
    res = ImageProcessor(ImageConfig(max_decode_pixels=10_000))(photo())
    assert res.status == "failed_decode" and "bomb" in res.error


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (400, 200), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    res = ImageProcessor(ImageConfig(size=100, resize_mode="keep_ratio"))(buf.getvalue())
    assert (res.width, res.height) == (100, 200)  # displayed portrait


def test_transparent_png_on_white_and_skip_reencode():
    img = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    res = ImageProcessor(ImageConfig(size=50, resize_mode="no"))(buf.getvalue())
    assert Image.open(io.BytesIO(res.image)).getpixel((10, 10)) == (255, 255, 255)
    small = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(small, "JPEG")
    kept = ImageProcessor(ImageConfig(size=64, skip_reencode=True))(small.getvalue())
    assert kept.image == small.getvalue()


def test_blur_boxes_a_row_cannot_use_fail_that_row():
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(buf, "PNG")
    proc = ImageProcessor(ImageConfig(size=64, bbox_col="faces"))
    assert proc(buf.getvalue(), "[[0.1, 0.1, 0.5, 0.5]]").status == "success"  # a csv column holds JSON text
    bad = proc(buf.getvalue(), [[0.1, 0.2, 0.3]])
    assert bad.status == "failed_decode" and bad.error.startswith("faces: a box must be 4 numbers")
