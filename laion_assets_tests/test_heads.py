import numpy as np
import pytest

from laion_assets.core.config import HeadConfig
from laion_assets.core.errors import LaionAssetsError
from laion_assets.core.heads import check_compatible, load_head
from laion_assets_tests.conftest import shared_file


def rating_vectors(space: str) -> np.ndarray:
    return np.stack([np.load(shared_file("data", "aesthetic-rating-vectors", f"{space}_embeddings", f"rating{i}.npy")).reshape(-1) for i in range(10)])


@pytest.mark.parametrize(
    "path, space",
    [
        (("laion-aesthetic-predictor", "sa_0_4_vit_b_32_linear.pth"), "vit_b_32"),
        (("laion-aesthetic-predictor", "sa_0_4_vit_l_14_linear.pth"), "vit_l_14"),
        (("improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth"), "vit_l_14"),
    ],
)
def test_aesthetic_scores_rise_across_rating_vectors(path, space):
    head = load_head("aesthetic", HeadConfig(path=str(shared_file("models", *path))))
    scores = head(rating_vectors(space))
    assert np.all(np.diff(scores) > 0), scores
    assert scores[-1] - scores[0] > 2  # a real spread, not noise


def test_nsfw_head_on_real_photo_embeddings():
    head = load_head("nsfw", HeadConfig(path=str(shared_file("models", "clip-based-nsfw-detector", "clip_ViT-B-32_openai_binary_nsfw_head.pth"))))
    emb = np.load(shared_file("data", "clip-vitb32-embeddings", "vitb32_image_embeddings.npz"))["embeddings"].astype(np.float32)
    punsafe = head(emb)
    assert punsafe.shape == (7,)
    assert np.all((punsafe >= 0) & (punsafe <= 1))
    assert np.all(punsafe < 0.5)  # ordinary photos from img2dataset's tests


def test_embedding_space_guard():
    head = load_head("aesthetic", HeadConfig(path=str(shared_file("models", "laion-aesthetic-predictor", "sa_0_4_vit_b_32_linear.pth"))))
    check_compatible(head, 512, "ViT-B-32/openai", False)
    with pytest.raises(LaionAssetsError, match="expects 512-d embeddings but the model gives 768-d"):
        check_compatible(head, 768, "ViT-L-14/openai", True)
    with pytest.raises(LaionAssetsError, match="trained on ViT-B-32/openai embeddings, not ViT-B-32/laion2b"):
        check_compatible(head, 512, "ViT-B-32/laion2b_s34b_b79k", False)
    check_compatible(head, 512, "ViT-B-32/laion2b_s34b_b79k", True)  # explicit override


def test_wrong_head_file_is_refused(tmp_path):
    import torch

    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(1, 512), "fc.bias": torch.zeros(1)}, other)
    with pytest.raises(LaionAssetsError, match="is not a LAION aesthetic or NSFW head"):
        load_head("aesthetic", HeadConfig(path=str(other)))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not torch")
    with pytest.raises(LaionAssetsError, match="not a torch state_dict"):
        load_head("nsfw", HeadConfig(path=str(junk)))
