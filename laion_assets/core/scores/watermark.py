"""The watermark classifier: pwatermark from the pixels (not from CLIP embeddings).

LAION-5B's pwatermark came from LAION-5B-WatermarkDetection: timm ``efficientnet_b3a`` whose
classifier is replaced by Linear(1536, 625), ReLU, Dropout, Linear(625, 256), ReLU,
Linear(256, 2); images resized to 256x256, ImageNet mean/std; pwatermark = softmax(logits)[0].
We build the same network for any timm model (the head's input is the model's feature width)
and load a local state_dict. It is an Encoder tower, so it runs in the embeddings pass on the
image that pass decodes anyway.

No weights can be downloaded here, so a model may be untrained (the `tiny` preset, or a file
saved from a fresh model): every BatchNorm still holds its initial statistics (mean 0, variance
1) after construction and loses them in the first training step, which we check and report
loudly: its pwatermark is meaningless.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.scores.config import WatermarkConfig
from laion_assets.core.scores.heads import file_sha256

log = logging.getLogger(__name__)

TINY = "test_efficientnet"  # timm's smallest EfficientNet, for offline tests and demos
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
UNTRAINED_WARNING = "watermark model {name} is NOT a trained model (its BatchNorm statistics were never updated): pwatermark is MEANINGLESS"


def build(model: str, classifier: str = "laion") -> nn.Module:
    """The network (random weights, seed 0): a timm model with LAION's classifier head."""
    import timm

    name = TINY if model == "tiny" else model
    if not timm.is_model(name):
        raise LaionAssetsError(f"timm has no model '{model}': fix watermark.model (LAION's is efficientnet_b3a)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with warnings.catch_warnings():  # efficientnet_b3a is an old alias of efficientnet_b3
            warnings.simplefilter("ignore")
            net = timm.create_model(name, pretrained=False, num_classes=2)
        if classifier == "laion":
            head = nn.Sequential(
                nn.Linear(net.num_features, 625), nn.ReLU(), nn.Dropout(p=0.3),
                nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2),
            )
            *parents, attr = net.pretrained_cfg.get("classifier", "classifier").split(".")
            owner = net
            for p in parents:
                owner = getattr(owner, p)
            setattr(owner, attr, head)
    return net.eval()


def untrained(net: nn.Module) -> bool:
    """True when no BatchNorm has moved from its initial statistics (a never-trained network)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    return bool(norms) and all(
        torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) and torch.equal(m.running_var, torch.ones_like(m.running_var))
        for m in norms
    )


@dataclass
class WatermarkModel:
    """An Encoder tower: `forward` gives (n, 1) pwatermark."""

    net: nn.Module
    preprocess: T.Compose
    name: str
    identity: str  # model/sha256 prefix of the checkpoint (or random-seed0): recorded per row
    checkpoint: str | None
    sha256: str | None
    trained: bool
    device: torch.device
    precision: str = "fp32"
    dim: int = 1

    @property
    def meaningless(self) -> bool:
        return not self.trained

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.net(batch).float(), dim=1)[:, :1]

    def describe(self) -> dict:
        out = {"model": self.name, "watermark_model": self.identity, "checkpoint": self.checkpoint or "", "sha256": self.sha256 or "", "trained": self.trained}
        if not self.trained:
            out["WARNING"] = UNTRAINED_WARNING.format(name=self.identity)
        return out


def load(cfg: WatermarkConfig, device: torch.device) -> WatermarkModel:
    net = build(cfg.model, cfg.classifier)
    sha = None
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        if not path.is_file():
            raise LaionAssetsError(f"watermark checkpoint {path} not found: fix watermark.checkpoint")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise LaionAssetsError(f"watermark checkpoint {path} does not fit {cfg.model} with the {cfg.classifier} classifier: {first}") from None
        sha = file_sha256(path)
    elif cfg.model != "tiny":
        raise LaionAssetsError("watermark.checkpoint is not set: point it at LAION's watermark_model_v1.pt (or use model: tiny offline)")
    model = WatermarkModel(
        net=net.to(device).eval(),
        preprocess=T.Compose([T.Resize((cfg.image_size, cfg.image_size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
        name=cfg.model, identity=cfg.identity, checkpoint=cfg.checkpoint, sha256=sha, trained=not untrained(net), device=device,
    )
    if not model.trained:
        log.warning(UNTRAINED_WARNING.format(name=model.identity))
    return model
