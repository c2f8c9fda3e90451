"""CLIP-H/14 (ViT-H-14, laion2b_s32b_b79k, 1024-d), the model LAION names first, as a space end
to end: loaded from a local checkpoint (the real architecture, random weights: none can be
downloaded here), 1024-d embeddings, its NSFW head, a subset, its kNN index and a search."""

from __future__ import annotations

import gc
import io

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from laion_assets.core import stages
from laion_assets.core.config import PipelineConfig
from laion_assets.core.embeddings import vectors
from laion_assets.core.embeddings.config import SpaceConfig
from laion_assets.core.exports.knn import sync_index
from laion_assets.core.exports.search import Searcher
from laion_assets.core.lake.delta import Lake
from laion_assets_tests.test_heads import h14_state

SHARD = "h14-shard"
TAG = "laion2b_s32b_b79k"


def test_a_checkpoint_named_with_its_tag_is_that_tags_space(tmp_path):
    named = SpaceConfig(model="ViT-H-14", pretrained=TAG, checkpoint=str(tmp_path / "open_clip_pytorch_model.bin"))
    assert named.identity == "ViT-H-14/laion2b_s32b_b79k"  # heads trained on it accept it
    bare = SpaceConfig(model="ViT-H-14", checkpoint=str(tmp_path / "finetuned.pt"))
    assert bare.identity == "ViT-H-14/finetuned.pt"  # an unnamed checkpoint is its own space


def publish_images(lake: Lake, captions: list[str]) -> None:
    """raw_urls and images of a few decodable JPEGs (what the images stage would have stored)."""
    rng = np.random.default_rng(0)
    blobs = []
    for _ in captions:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(out, "JPEG")
        blobs.append(out.getvalue())
    uids = list(range(1, len(captions) + 1))
    urls = [f"http://127.0.0.1:9/{u}.jpg" for u in uids]
    lake.publish_shard(stages.RAW_URLS, SHARD, pl.DataFrame({"uid": uids, "url": urls, "caption": captions}))
    lake.publish_shard(stages.IMAGES, SHARD, pl.DataFrame({
        "uid": uids, "url": urls, "status": ["success"] * len(uids), "image": blobs,
        "original_width": [128] * len(uids), "original_height": [96] * len(uids), "width": [128] * len(uids),
        "height": [96] * len(uids), "sha256": [f"{u:064x}" for u in uids], "bytes_downloaded": [len(b) for b in blobs],
    }, schema_overrides={c: pl.Int32 for c in ("original_width", "original_height", "width", "height")}))


@pytest.mark.slow
def test_vit_h14_space_from_a_local_checkpoint_end_to_end(tmp_path):
    import open_clip

    from laion_assets.core.embeddings.clip import load_model
    from laion_assets.core.embeddings.encoder import Encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-H-14")  # the real architecture (986M parameters), random weights
    checkpoint = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, checkpoint)  # 2 GB, not 4
    del model
    gc.collect()
    head = tmp_path / "h14_nsfw.pth"
    torch.save(h14_state(), head)

    cfg = PipelineConfig.model_validate({
        "embeddings": {"spaces": {"h14": {"model": "ViT-H-14", "pretrained": TAG, "checkpoint": str(checkpoint)}}, "batch_size": 2, "workers": 1},
        "scores": {"heads": {"punsafe": {"path": str(head), "trained_on": f"ViT-H-14/{TAG}"}}},
        "subsets": [{"name": "h14_all", "below": {"punsafe": 100.0}}],
        "knn": {"subsets": ["h14_all"]},
    })
    assert cfg.head_space("punsafe") == "h14"  # the head declared for H/14 is fed the H/14 space
    lake = Lake(tmp_path / "lake")
    captions = ["a red car on a road", "a cat asleep on a chair", "a mountain lake at dawn"]
    publish_images(lake, captions)

    out = stages.run_embeddings(lake, cfg, SHARD, lambda spaces: Encoder([load_model(cfg.embeddings.spaces[s], "cpu") for s in spaces], 2, 1, text_batch_size=4))  # 3 captions, not 256 rows through the H/14 text tower
    assert out["h14"].rows == 3
    gc.collect()  # the encoder's 4 GB go before the search loads the model again
    emb = lake.read_shard("embeddings/h14", SHARD)
    img = vectors.from_column(emb["image_embedding"])
    assert img.shape == (3, 1024) and vectors.from_column(emb["text_embedding"]).shape == (3, 1024)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=2e-3)
    assert set(emb["embedding_space"]) == {f"ViT-H-14/{TAG}"}

    scores = stages.run_scores(lake, cfg, SHARD)
    assert scores.stats["heads"]["punsafe"]["kind"] == "nsfw_h14" and scores.stats["heads"]["punsafe"]["dim"] == 1024
    subset = stages.run_subset(lake, cfg, cfg.subsets[0], SHARD)
    assert subset.rows == 3
    assert sync_index(lake, cfg, "h14_all").rows == 3

    # the search page's searcher: the index names its model, loaded from the same checkpoint
    hits = Searcher(lake, device="cpu").search(text=captions[1], subset="h14_all", k=3)
    assert sorted(h.uid for h in hits) == [1, 2, 3]
