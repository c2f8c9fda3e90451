"""The watermark classifier: LAION's network shape on a small timm model the test builds and
saves itself, loaded from a local checkpoint, run as a tower of the CLIP Encoder."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from laion_assets.core.embeddings.clip import load_model
from laion_assets.core.embeddings.config import SpaceConfig
from laion_assets.core.embeddings.encoder import Encoder
from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.scores import watermark
from laion_assets.core.scores.config import WatermarkConfig
from laion_assets_tests.conftest import shared_file

pytestmark = pytest.mark.shared  # some tests read LAION's real files in ../shared


def laion_watermark_net(model: str = "test_efficientnet") -> nn.Module:
    """LAION-5B-WatermarkDetection's network, written out here independently: timm model with
    num_classes=2 whose classifier becomes Linear(F, 625), ReLU, Dropout, Linear(625, 256),
    ReLU, Linear(256, 2)."""
    torch.manual_seed(1)
    net = timm.create_model(model, pretrained=False, num_classes=2)
    net.classifier = nn.Sequential(
        nn.Linear(net.num_features, 625), nn.ReLU(), nn.Dropout(p=0.3), nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2),
    )
    return net


def train_a_little(net: nn.Module) -> nn.Module:
    """A few SGD steps on random 'watermarked vs clean' batches: weights and BatchNorm
    statistics move, as in any trained model."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    net.train()
    for step in range(3):
        x, y = torch.randn(8, 3, 64, 64), torch.tensor([0, 1] * 4)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    folder = shared_file("data", "real-photos")
    return [p.read_bytes() for p in sorted(Path(folder).glob("*.jpg"))]


def expected_pwatermark(net: nn.Module, blobs: list[bytes]) -> np.ndarray:
    """LAION's inference: Resize((256, 256)), ToTensor, ImageNet Normalize, softmax[:, 0]."""
    tf = T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    import io

    x = torch.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    with torch.no_grad():
        return torch.softmax(net.eval()(x), dim=1)[:, 0].numpy()


def test_trained_checkpoint_runs_in_the_clip_pass(tmp_path, photos):
    net = train_a_little(laion_watermark_net())
    ckpt = tmp_path / "watermark_model.pt"
    torch.save(net.state_dict(), ckpt)
    cfg = WatermarkConfig(model="test_efficientnet", checkpoint=str(ckpt))

    tower = watermark.load(cfg, torch.device("cpu"))
    assert tower.trained and "WARNING" not in tower.describe()
    assert tower.identity == f"test_efficientnet/{tower.sha256[:16]}" == cfg.identity
    clip = load_model(SpaceConfig(model="tiny"), "cpu", "fp32")
    encoder = Encoder([clip, tower], batch_size=4, workers=2)
    vecs, pwatermark = encoder.encode(photos)  # each photo decoded once for both towers
    assert vecs.shape == (len(photos), clip.dim) and pwatermark.shape == (len(photos), 1)
    np.testing.assert_allclose(pwatermark[:, 0], expected_pwatermark(net, photos), atol=1e-4)
    assert np.ptp(pwatermark) > 1e-4  # a real, image-dependent score


def test_untrained_model_is_said_loudly(tmp_path, caplog):
    ckpt = tmp_path / "fresh.pt"
    torch.save(laion_watermark_net().state_dict(), ckpt)  # saved without any training
    tower = watermark.load(WatermarkConfig(model="test_efficientnet", checkpoint=str(ckpt)), torch.device("cpu"))
    assert not tower.trained
    assert "NOT a trained model" in tower.describe()["WARNING"] and "MEANINGLESS" in caplog.text
    tiny = watermark.load(WatermarkConfig(model="tiny"), torch.device("cpu"))
    assert not tiny.trained and tiny.identity == "tiny/random-seed0"


def test_bad_watermark_settings_fail_clearly(tmp_path):
    with pytest.raises(LaionAssetsError, match="watermark.checkpoint is not set"):
        watermark.load(WatermarkConfig(), torch.device("cpu"))
    with pytest.raises(LaionAssetsError, match="not found"):
        watermark.load(WatermarkConfig(checkpoint=str(tmp_path / "none.pt")), torch.device("cpu"))
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 4)}, other)
    with pytest.raises(LaionAssetsError, match="does not fit test_efficientnet with the laion classifier"):
        watermark.load(WatermarkConfig(model="test_efficientnet", checkpoint=str(other)), torch.device("cpu"))
    with pytest.raises(LaionAssetsError, match="timm has no model"):
        watermark.load(WatermarkConfig(model="efficientnet_q9", checkpoint=str(other)), torch.device("cpu"))
