"""open_clip loading and the Encoder: real forward passes of the tiny config (seeded random
init, no network), preprocessing against the OpenAI golden tensor."""

from __future__ import annotations

import io
import logging

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from laion_assets.core.embeddings.clip import TINY_WARNING, fuse_attention, load_model, prune_last_block
from laion_assets.core.embeddings.config import TINY_PRESETS, SpaceConfig
from laion_assets.core.embeddings.encoder import TENSOR_PATH_TOLERANCE, Encoder, Preprocess
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets_tests.conftest import shared_file

pytestmark = pytest.mark.shared  # some tests read LAION's real files in ../shared

TINY = SpaceConfig(model="tiny")
TINY_NAME = TINY_PRESETS["tiny"]  # the open_clip config behind the tiny preset


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """The real photos as stored bytes, plus a grayscale PNG, an RGBA PNG and an image
    smaller than the crop (CenterCrop pads it)."""
    folder = shared_file("data", "real-photos")
    blobs = [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]
    base = Image.open(io.BytesIO(blobs[0])).convert("RGB")
    for mode, fmt, size in (("L", "PNG", (300, 260)), ("RGBA", "PNG", (260, 300)), ("RGB", "JPEG", (90, 60))):
        buf = io.BytesIO()
        base.resize(size).convert(mode).save(buf, fmt)
        blobs.append(buf.getvalue())
    return blobs


def _golden():
    folder = shared_file("data", "clip-preprocess-golden")
    return (folder / "franz-kafka.jpg").read_bytes(), np.load(folder / "expected_preprocessed_image.npy")


# -- preprocessing -------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["openai-transform", "ViT-B-32", "tiny"])
def test_preprocess_matches_golden_both_paths(source, tiny):
    blob, golden = _golden()
    if source == "openai-transform":
        transform = open_clip.image_transform(224, is_train=False)
    elif source == "ViT-B-32":
        transform = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)[2]
    else:
        transform = tiny.preprocess
    prep = Preprocess(transform)
    assert prep.exact_split and prep.resize == 224 and prep.crop == (224, 224)
    full = prep.full(blob).numpy()[None]
    fast = prep.finish(torch.from_numpy(prep.pixels(blob).copy())[None]).numpy()
    assert full.shape == fast.shape == golden.shape
    assert np.abs(full - golden).max() <= 1e-4
    assert np.abs(fast - golden).max() <= 1e-4


def test_fast_path_equals_model_transform_on_real_photos(tiny, photos):
    prep = Preprocess(tiny.preprocess)
    fast = prep.finish(torch.stack([torch.from_numpy(prep.pixels(b).copy()) for b in photos]))
    full = torch.stack([tiny.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in photos])
    assert fast.is_contiguous()
    assert (fast - full).abs().max().item() <= 1e-4


def test_tensor_path_for_gpu_decode_is_close(tiny):
    """The nvJPEG path's resize, run on CPU here: approximate, within the documented bound."""
    from torchvision.io import ImageReadMode, decode_jpeg

    blob, golden = _golden()
    prep = Preprocess(tiny.preprocess)
    img = decode_jpeg(torch.frombuffer(bytearray(blob), dtype=torch.uint8), mode=ImageReadMode.RGB)
    x = prep.finish(prep.gpu_resize(img)[None]).numpy()
    diff = np.abs(x - golden)
    assert diff.max() <= TENSOR_PATH_TOLERANCE and diff.mean() < 0.01


def test_unsplittable_transform_falls_back_to_per_image(tiny, photos):
    odd = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Lambda(lambda x: x * 0.5)])
    clip = _with(tiny, preprocess=odd)
    enc = Encoder(clip, batch_size=3, workers=2)
    assert not enc.prep.exact_split
    expect = torch.nn.functional.normalize(
        clip.model.encode_image(torch.stack([odd(Image.open(io.BytesIO(b)).convert("RGB")) for b in photos])), dim=-1
    ).detach().numpy()
    np.testing.assert_allclose(enc.images(photos), expect, atol=1e-5)


# -- loading -------------------------------------------------------------------------------

def test_tiny_preset_describe_and_warning(caplog):
    with caplog.at_level(logging.WARNING):
        clip = load_model(TINY)
    assert TINY_WARNING.format(model="tiny") in caplog.text
    assert clip.meaningless
    assert clip.describe() == {
        "model": "tiny", "pretrained": "", "embedding_space": "tiny/random-seed0",
        "embedding_dim": 512, "device": "cpu", "precision": "fp32",
    }


def test_local_checkpoint_loads_the_files_weights(tmp_path, photos):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # not the loader's seed 0: the weights must come from the file
        source, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME, pretrained=None)
    source.eval()
    path = tmp_path / "tiny-finetuned.pt"
    torch.save({"state_dict": source.state_dict()}, path)

    clip = load_model(SpaceConfig(model=TINY_NAME, checkpoint=str(path)))
    assert clip.describe()["embedding_space"] == f"{TINY_NAME}/tiny-finetuned.pt"
    assert clip.pretrained is None and not clip.meaningless
    enc = Encoder(clip, batch_size=4, workers=2)
    with torch.inference_mode():
        x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in photos])
        img = torch.nn.functional.normalize(source.encode_image(x), dim=-1).numpy()
        txt = torch.nn.functional.normalize(source.encode_text(clip.tokenizer(["a cat", "a dog"])), dim=-1).numpy()
    np.testing.assert_allclose(enc.images(photos), img, atol=1e-5)
    np.testing.assert_allclose(enc.texts(["a cat", "a dog"]), txt, atol=1e-5)
    seed0 = Encoder(load_model(SpaceConfig(model=TINY_NAME, pretrained=None)), 4).images(photos[:2])
    assert np.abs(seed0 - img[:2]).max() > 1e-2


def test_bad_checkpoint_and_names_are_clear_errors(tmp_path):
    with pytest.raises(LaionAssetsError, match=r"open_clip has no model 'ViT-B-33' \(did you mean .*ViT-B-32"):
        load_model(SpaceConfig(model="ViT-B-33"))
    with pytest.raises(LaionAssetsError, match=r"no pretrained 'no-such-tag' for ViT-B-32 \(known: .*openai"):
        load_model(SpaceConfig(model="ViT-B-32", pretrained="no-such-tag"))
    with pytest.raises(LaionAssetsError, match="checkpoint .* not found"):
        load_model(SpaceConfig(model=TINY_NAME, checkpoint=str(tmp_path / "missing.pt")))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(LaionAssetsError, match=f"could not load {TINY_NAME}.*is it a checkpoint for this model"):
        load_model(SpaceConfig(model=TINY_NAME, checkpoint=str(junk)))
    with pytest.raises(LaionAssetsError, match="fp16 needs a GPU"):
        load_model(TINY, device="cpu", precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(LaionAssetsError, match="no CUDA device"):
            load_model(TINY, device="cuda")


@pytest.mark.parametrize("model,tag", [("ViT-L-14", "openai"), ("ViT-H-14", "laion2b_s32b_b79k")])
def test_large_models_selectable_by_config(model, tag):
    """Names and tags pass validation (loading them needs the weights: not here)."""
    cfg = SpaceConfig(model=model, pretrained=tag)
    assert model in open_clip.list_models()
    assert tag in open_clip.list_pretrained_tags_by_model(model)
    assert cfg.identity == f"{model}/{tag}"


# -- encoding ------------------------------------------------------------------------------

def test_images_normalised_deterministic_and_batch_independent(tiny, photos):
    a = Encoder(tiny, batch_size=4, workers=2).images(photos)
    assert a.shape == (len(photos), 512) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, Encoder(tiny, batch_size=4, workers=2).images(photos))
    np.testing.assert_array_equal(a, Encoder(load_model(TINY), batch_size=4, workers=1).images(iter(photos)))
    np.testing.assert_allclose(a, Encoder(tiny, batch_size=1, workers=3, prefetch=1).images(photos), atol=1e-5)
    assert Encoder(tiny, 4).images([]).shape == (0, 512)


def test_fused_attention_matches_stock_open_clip(tiny, photos):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        stock = open_clip.create_model(TINY_NAME, pretrained=None).eval()
    x = Preprocess(tiny.preprocess)
    batch = x.finish(torch.stack([torch.from_numpy(x.pixels(b).copy()) for b in photos]))
    tokens = tiny.tokenizer(["a photo of a cat", "", "two dogs"])
    with torch.inference_mode():
        np.testing.assert_allclose(tiny.model.encode_image(batch), stock.encode_image(batch), atol=1e-5)
        np.testing.assert_allclose(tiny.model.encode_text(tokens), stock.encode_text(tokens), atol=1e-5)
    assert fuse_attention(tiny.model) == 0  # already fused: idempotent
    assert fuse_attention(stock) == 4  # 2 vision + 2 text blocks


def _stock_tiny():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.create_model(TINY_NAME, pretrained=None).eval()


def test_last_block_computes_only_the_pooled_token(tiny):
    """The loaded tower (equal outputs: test above) skips the last block's work on the tokens
    it does not pool; towers that pool other tokens are left alone."""
    from torch.utils.flop_counter import FlopCounterMode

    stock = _stock_tiny()
    fuse_attention(stock)
    x = torch.zeros(2, 3, 224, 224)

    def flops(model) -> int:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model.encode_image(x)
        return counter.get_total_flops()

    full, pruned = flops(stock), flops(tiny.model)
    assert pruned < full
    assert prune_last_block(tiny.model) is False  # already done: idempotent
    avg = _stock_tiny()
    avg.visual.pool_type = "avg"  # pools every token: nothing to skip
    fuse_attention(avg)
    assert prune_last_block(avg) is False and flops(avg) == full


def test_texts_bulk_with_none_and_similarity(tiny, photos):
    enc = Encoder(tiny, batch_size=2)
    captions = ["a photo of a cat", None, "two dogs on a beach", "", "a cat"] * 60  # > one text batch
    t = enc.texts(captions)
    assert t.shape == (len(captions), 512)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(t[1], t[3])  # None embeds as ''
    np.testing.assert_allclose(t[0], enc.texts(["a photo of a cat"])[0], atol=1e-5)
    np.testing.assert_allclose(t[:5], t[5:10], atol=1e-5)
    assert enc.texts([]).shape == (0, 512)
    img = enc.images(photos[:5])
    sim = (img * t[:5]).sum(axis=1)
    with torch.inference_mode():
        expect = torch.nn.functional.cosine_similarity(torch.from_numpy(img), torch.from_numpy(t[:5])).numpy()
    np.testing.assert_allclose(sim, expect, atol=1e-5)


def test_gpu_decode_request_without_cuda_falls_back(tiny, photos, caplog):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the fallback is for CPU-only machines")
    with caplog.at_level(logging.WARNING):
        enc = Encoder(tiny, batch_size=4, gpu_decode=True)
    assert not enc.gpu_decode and "gpu_decode needs CUDA" in caplog.text
    np.testing.assert_array_equal(enc.images(photos), Encoder(tiny, batch_size=4).images(photos))


@pytest.mark.slow
def test_compiled_encoder_matches_eager(tiny, photos):
    """torch.compile (inductor, frozen weights) incl. the padded short last batch."""
    enc = Encoder(tiny, batch_size=4, compile=True)
    got = enc.images(photos)  # 10 photos: batches of 4, 4, 2 (padded)
    assert enc.compile, "compile fell back to eager"
    np.testing.assert_allclose(got, Encoder(tiny, batch_size=4).images(photos), atol=1e-4)


def test_compile_failure_falls_back_to_eager(tiny, photos, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    enc = Encoder(tiny, batch_size=4, compile=True)
    with caplog.at_level(logging.WARNING):
        got = enc.images(photos)
    assert "torch.compile failed (no compiler here)" in caplog.text and not enc.compile
    np.testing.assert_array_equal(got, Encoder(tiny, batch_size=4).images(photos))


def _with(clip, **changes):
    from dataclasses import replace

    return replace(clip, **changes)


def test_a_search_query_encodes_its_text_alone(monkeypatch):
    """A shard's captions go through the text tower in padded batches of 256; a search query is
    one text and must not pay for 255 blank ones (~80 s a query for ViT-H/14 on a CPU)."""
    from laion_assets.core.exports.search import QueryEncoder

    query = QueryEncoder(TINY, "cpu")
    clip = query.encoder().clip
    rows, encode_text = [], clip.model.encode_text
    monkeypatch.setattr(clip.model, "encode_text", lambda tokens, **kw: rows.append(len(tokens)) or encode_text(tokens, **kw))
    v = query(text="a photo of a cat")
    assert rows == [1]
    stage = Encoder(clip, batch_size=2).texts(["a photo of a cat"])[0]
    np.testing.assert_allclose(v, stage, atol=1e-5)  # the same vector the stage stores for that caption
