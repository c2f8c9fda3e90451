import numpy as np
import pytest
import torch

from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.scores.config import HeadConfig
from laion_assets.core.scores.heads import check_compatible, load_head
from laion_assets_tests.conftest import BUNDLED, SHARED, shared_file

pytestmark = pytest.mark.shared  # some tests read LAION's real files in ../shared


def head_file(folder: str, name: str):
    """LAION's head file: the copy shipped in models/ (the demo's three), else ../shared's."""
    bundled = BUNDLED / folder / name
    return bundled if bundled.is_file() else shared_file("models", folder, name)


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
    head = load_head("aesthetic", HeadConfig(path=str(head_file(*path))))
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


# -- every head file computes what it defines: against an independent torch forward pass ----

class KerasNormalization(torch.nn.Module):
    """The autokeras Normalization layer the NSFW heads start with (models/README.md)."""

    def __init__(self, mean, variance):
        super().__init__()
        self.mean, self.variance = mean, variance

    def forward(self, x):
        return (x - self.mean) / (self.variance.sqrt() + 1e-10)


def reference_network(name: str, state: dict) -> torch.nn.Module:
    """The architecture documented in ../shared/models/README.md, as plain torch modules,
    loaded with the file's tensors."""
    from torch import nn

    def linears(module: nn.Sequential) -> nn.Sequential:  # linear_N -> Sequential index
        keys = [k for k in module.state_dict()]
        ours = sorted((k for k in state if k.startswith("linear_")), key=lambda k: (int(k.split(".")[0][7:]), k))
        module.load_state_dict(dict(zip(sorted(keys, key=lambda k: (int(k.split(".")[0]), k)), (state[k] for k in ours))))
        return module

    if name.startswith("sa_0_4"):
        net = nn.Sequential(nn.Linear(state["weight"].shape[1], 1))
        net.load_state_dict({"0.weight": state["weight"], "0.bias": state["bias"]})
    elif name.startswith("sac+logos"):
        net = nn.Sequential(
            nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )
        net.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    elif "B-32" in name:  # norm, 512 -> 32 -> 32 -> 1, ReLU between, sigmoid
        mlp = linears(nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid()))
        net = nn.Sequential(KerasNormalization(state["norm.mean"], state["norm.variance"]), mlp)
    else:  # L-14: norm, 768 -> 64 -> 512 -> 256 -> 1, ReLU between, sigmoid
        mlp = linears(nn.Sequential(
            nn.Linear(768, 64), nn.ReLU(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
            nn.Linear(256, 1), nn.Sigmoid(),
        ))
        net = nn.Sequential(KerasNormalization(state["norm.mean"], state["norm.variance"]), mlp)
    return net.eval()


HEAD_FILES = [
    ("laion-aesthetic-predictor", "sa_0_4_vit_b_32_linear.pth"),
    ("laion-aesthetic-predictor", "sa_0_4_vit_b_16_linear.pth"),
    ("laion-aesthetic-predictor", "sa_0_4_vit_l_14_linear.pth"),
    ("improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth"),
    ("clip-based-nsfw-detector", "clip_ViT-B-32_openai_binary_nsfw_head.pth"),
    ("clip-based-nsfw-detector", "clip_ViT-L-14_openai_binary_nsfw_head.pth"),
]


@pytest.mark.parametrize("folder, name", HEAD_FILES, ids=[n for _, n in HEAD_FILES])
def test_head_matches_an_independent_forward_pass(folder, name):
    import hashlib

    path = head_file(folder, name)
    head = load_head("score", HeadConfig(path=str(path)))
    state = torch.load(path, map_location="cpu", weights_only=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, head.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # heads take L2-normalised embeddings
    if "B-32" in name or "b_32" in name:
        real = np.load(shared_file("data", "clip-vitb32-embeddings", "vitb32_image_embeddings.npz"))["embeddings"]
        x = np.concatenate([x, real.astype(np.float32)])
    with torch.no_grad():
        expected = reference_network(name, state)(torch.from_numpy(x))[:, 0].numpy()
    got = head(x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert expected.std() > 1e-3  # a spread of scores, not a constant both sides agree on
    assert head.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    if head.kind == "nsfw":
        assert ((got > 0) & (got < 1)).all()


def test_l14_nsfw_head_runs_all_four_layers():
    """The L/14 file has one more layer than the B/32 one; stopping at linear_3 would give a
    256-wide activation, not punsafe."""
    path = head_file("clip-based-nsfw-detector", "clip_ViT-L-14_openai_binary_nsfw_head.pth")
    head = load_head("punsafe", HeadConfig(path=str(path), trained_on="ViT-L-14/openai"))
    assert [p[0].shape for op, *p in head.steps if op == "linear"] == [(64, 768), (512, 64), (256, 512), (1, 256)]
    assert [op for op, *_ in head.steps] == ["normalize", "linear", "relu", "linear", "relu", "linear", "relu", "linear", "sigmoid"]


H14_WIDTHS = [1024, 1024, 2048, 1024, 256, 128, 16, 1]


@pytest.mark.parametrize(
    "shapes, message",
    [
        # the ViT-H/14 NSFW head's layout: its ReLU/Dropout positions cannot be read from a
        # state_dict and its output has no sigmoid, so it is refused, not run as an aesthetic MLP
        ({f"layers.{i}.{p}": ((H14_WIDTHS[n + 1], H14_WIDTHS[n]) if p == "weight" else (H14_WIDTHS[n + 1],))
          for n, i in enumerate((0, 3, 6, 9, 12, 15, 16)) for p in ("weight", "bias")}, "match no known head"),
        ({"norm.mean": (8,), "norm.variance": (8,), "linear_1.weight": (4, 8), "linear_1.bias": (4,), "linear_3.weight": (1, 4), "linear_3.bias": (1,)}, "match no known head"),
        ({"norm.mean": (8,), "norm.variance": (8,), "linear_1.weight": (4, 8), "linear_1.bias": (4,), "linear_2.weight": (1, 5), "linear_2.bias": (1,)}, "has shape"),
        ({"norm.mean": (8,), "norm.variance": (8,), "linear_1.weight": (4, 8), "linear_1.bias": (4,), "linear_2.weight": (2, 4), "linear_2.bias": (2,)}, "2 outputs"),
        ({"norm.mean": (6,), "norm.variance": (6,), "linear_1.weight": (4, 8), "linear_1.bias": (4,), "linear_2.weight": (1, 4), "linear_2.bias": (1,)}, "norm is"),
        ({"weight": (1, 8), "bias": (1,), "extra": (3,)}, "match no known head"),
    ],
    ids=["h14-layout", "gap-in-layers", "chain-mismatch", "two-outputs", "norm-width", "extra-key"],
)
def test_heads_of_unknown_structure_are_refused(tmp_path, shapes, message):
    path = tmp_path / "head.pth"
    torch.save({k: torch.zeros(s) for k, s in shapes.items()}, path)
    with pytest.raises(LaionAssetsError, match=message):
        load_head("punsafe", HeadConfig(path=str(path)))


def test_shipped_heads_are_laions_files():
    """models/ holds LAION's files unchanged: each matches the sha256 its README gives (and
    ../shared's copy, where it is beside the checkout), next to its project's license."""
    import hashlib
    import re

    listed = dict(re.findall(r"\| `([^`]+\.pth)` \|.*\| `([0-9a-f]{64})` \|", (BUNDLED / "README.md").read_text()))
    shipped = sorted(str(p.relative_to(BUNDLED)) for p in BUNDLED.rglob("*.pth"))
    assert sorted(listed) == shipped and len(shipped) == 3
    for name, sha in listed.items():
        path = BUNDLED / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, name
        assert any(f.name.lower().startswith("license") for f in path.parent.iterdir()), f"no license beside {name}"
        shared = SHARED / "models" / name
        if shared.is_file():
            assert shared.read_bytes() == path.read_bytes(), name


def test_a_rows_score_does_not_depend_on_the_rows_batched_with_it():
    """What made two runs of one shard differ by ~1e-6: float32 BLAS rounds a row differently
    in batches of other sizes. Every row scored alone, in one batch, or in odd slices of a
    shuffled order gives the same float32 bytes."""
    head = load_head("punsafe", HeadConfig(path=str(head_file("clip-based-nsfw-detector", "clip_ViT-L-14_openai_binary_nsfw_head.pth"))))
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, head.dim)).astype(np.float16).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    whole = head(emb).astype(np.float32)
    order = rng.permutation(len(emb))
    sliced = np.empty_like(whole)
    for start, stop in ((0, 1), (1, 8), (8, 45), (45, 173), (173, 300)):
        sliced[order[start:stop]] = head(emb[order[start:stop]]).astype(np.float32)
    alone = np.array([head(emb[i:i + 1])[0] for i in range(len(emb))], np.float32)
    assert whole.tobytes() == sliced.tobytes() == alone.tobytes()
