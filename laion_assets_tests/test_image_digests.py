"""The images stage records what the lake-wide curation needs and cannot recompute later (the
stored image is re-encoded): md5, sha1 and sha256 of the original bytes, and a pHash of the
decoded picture that stays close across sizes and encodings of the same photo."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from laion_assets.core.images.config import ImageConfig
from laion_assets.core.ingest.sample import _photo
from laion_assets_tests.test_download import download


@pytest.mark.parametrize("decode", ["process", "thread"])
def test_digests_of_the_original_bytes_and_a_perceptual_hash(testsite, decode):  # noqa: F811
    site, base = testsite
    root = site.root
    photo = _photo("astronaut").convert("RGB")
    photo.resize((640, 640)).save(root / "big.jpg", quality=92)
    photo.resize((300, 300)).save(root / "small.webp", quality=60)
    _photo("coffee").convert("RGB").save(root / "other.png")
    (root / "broken.jpg").write_bytes((root / "big.jpg").read_bytes()[:300])
    names = ["big.jpg", "small.webp", "other.png", "broken.jpg"]
    rows, _, _ = download([f"{base}/img/{n}" for n in names], i=ImageConfig(size=128, resize_mode="center_crop"), decode=decode)
    got = {Path(r["url"]).name: r for r in rows.iter_rows(named=True)}
    for name in names:
        body = (root / name).read_bytes()
        assert got[name]["md5"] == hashlib.md5(body).hexdigest()
        assert got[name]["sha1"] == hashlib.sha1(body).hexdigest()
        assert got[name]["sha256"] == hashlib.sha256(body).hexdigest()
    assert got["broken.jpg"]["status"] == "failed_decode" and got["broken.jpg"]["phash"] is None

    def distance(a: str, b: str) -> int:
        return (int(got[a]["phash"], 16) ^ int(got[b]["phash"], 16)).bit_count()

    assert distance("big.jpg", "small.webp") <= 4  # same photo, other size and codec
    assert distance("big.jpg", "other.png") > 16


def test_phash_is_imagehash_phash_bit_for_bit():
    import imagehash

    from laion_assets.core.images.imaging import perceptual_hash

    rng = np.random.default_rng(0)
    images = [_photo(n).convert("RGB") for n in ("astronaut", "coffee", "camera", "coins", "chelsea")]
    images += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 90), (40, 40), (300, 200))]
    for img in images:
        small = img.reduce(min(img.size) // 64) if min(img.size) >= 128 else img
        assert perceptual_hash(img) == str(imagehash.phash(small))
