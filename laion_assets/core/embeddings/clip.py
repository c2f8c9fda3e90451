"""open_clip models: loading by name + pretrained tag, local checkpoint, or the tiny offline
preset, and what makes their forward pass cheaper without changing it (fused attention, an
image tower whose last block computes only the class token it pools). Batched encoding is in
`encoder`.
"""

from __future__ import annotations

import difflib
import logging
import types
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from laion_assets.core.embeddings.config import TINY_PRESETS, SpaceConfig
from laion_assets.core.lake.errors import LaionAssetsError

log = logging.getLogger(__name__)

TINY_WARNING = (
    "embedding model '{model}' is a randomly initialised open_clip model (seed 0) for offline "
    "demos and tests: its embeddings, similarities and scores are MEANINGLESS"
)
# The tiny presets' configs are the JSON files beside this module: registered as one folder,
# as each registration re-reads every config open_clip knows (~150 files).
open_clip.add_model_config(Path(__file__).parent)


@dataclass
class ClipModel:
    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    name: str
    pretrained: str | None
    space: str
    dim: int
    device: torch.device
    precision: str

    @property
    def meaningless(self) -> bool:
        return self.name in TINY_PRESETS

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The image tower on a normalised batch: (n, dim) L2-normalised embeddings."""
        return F.normalize(self.model.encode_image(batch).float(), dim=-1)

    def describe(self) -> dict:
        return {
            "model": self.name, "pretrained": self.pretrained or "", "embedding_space": self.space,
            "embedding_dim": self.dim, "device": str(self.device), "precision": self.precision,
        }


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise LaionAssetsError(f"embeddings.device is {choice} but no CUDA device is available: use auto or cpu")
    return torch.device(choice)


def _precision(choice: str, device: torch.device) -> str:
    if choice != "auto":
        if device.type == "cpu" and choice == "fp16":
            raise LaionAssetsError("embeddings.precision fp16 needs a GPU: use fp32 or bf16 on CPU")
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def embed_dim(cfg: SpaceConfig) -> int:
    """The width of a space's vectors, from open_clip's model config (no weights loaded): what
    adopted vectors must have."""
    config = open_clip.get_model_config(TINY_PRESETS.get(cfg.model, cfg.model))
    if config is None:
        raise LaionAssetsError(f"open_clip has no model '{cfg.model}': see open_clip.list_models()")
    return int(config["embed_dim"])


def load_model(cfg: SpaceConfig, device: str = "auto", precision: str = "auto") -> ClipModel:
    """Load one space's model; every failure is a one-line LaionAssetsError."""
    device = _device(device)
    precision = _precision(precision, device)
    name = TINY_PRESETS.get(cfg.model, cfg.model)
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise LaionAssetsError(
            f"open_clip has no model '{cfg.model}'"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + ": see open_clip.list_models(), or use 'tiny' offline"
        )
    pretrained = None
    if cfg.model in TINY_PRESETS:
        log.warning(TINY_WARNING.format(model=cfg.model))
    elif cfg.checkpoint:
        if not Path(cfg.checkpoint).is_file():
            raise LaionAssetsError(f"checkpoint {cfg.checkpoint} not found: fix embeddings.checkpoint")
        pretrained = cfg.checkpoint
    elif cfg.pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if cfg.pretrained not in tags:
            raise LaionAssetsError(
                f"open_clip has no pretrained '{cfg.pretrained}' for {name} (known: "
                f"{', '.join(tags[:8]) or 'none'}): fix embeddings.pretrained"
            )
        pretrained = cfg.pretrained
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the tiny preset (and any random init) is reproducible
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        hint = (
            "no network here? download the weights elsewhere and set embeddings.checkpoint"
            if not cfg.checkpoint
            else "is it a checkpoint for this model?"
        )
        raise LaionAssetsError(f"could not load {name} ({pretrained}): {first}: {hint}") from None
    model.eval()
    fuse_attention(model)
    prune_last_block(model)
    return ClipModel(
        model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name),
        name=cfg.model, pretrained=pretrained if not cfg.checkpoint else None, space=cfg.identity,
        dim=int(model.visual.output_dim),
        device=device, precision=precision,
    )


# -- fused attention -----------------------------------------------------------------------

def _sdpa_attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
    """ResidualAttentionBlock.attention via in-projection matmuls + F.scaled_dot_product_attention.
    Self-attention (k_x None) or queries from `q_x` over keys = values = `k_x`."""
    if v_x is not k_x or self.training:
        return self._mha_attention(q_x, k_x, v_x, attn_mask)
    a = self.attn
    n, lq, width = q_x.shape
    heads, hd = a.num_heads, width // a.num_heads
    w, b = a.in_proj_weight, a.in_proj_bias
    if k_x is None:
        qkv = F.linear(q_x, w, b).view(n, lq, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:
        q = F.linear(q_x, w[:width], None if b is None else b[:width]).view(n, lq, heads, hd).transpose(1, 2)
        kv = F.linear(k_x, w[width:], None if b is None else b[width:]).view(n, k_x.shape[1], 2, heads, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.linear(x.transpose(1, 2).reshape(n, lq, width), a.out_proj.weight, a.out_proj.bias)


def fuse_attention(model: torch.nn.Module) -> int:
    """Route open_clip's batch-first nn.MultiheadAttention blocks through fused SDPA (same
    maths: max abs diff ~1e-6 in fp32). Returns the number of blocks changed."""
    changed = 0
    for block in model.modules():
        attn = getattr(block, "attn", None)
        if (
            type(block).__name__ == "ResidualAttentionBlock"
            and isinstance(attn, torch.nn.MultiheadAttention)
            and attn.batch_first and attn._qkv_same_embed_dim and attn.in_proj_weight is not None
            and not hasattr(block, "ln_1_kv") and not hasattr(block, "_mha_attention")
        ):
            block._mha_attention = block.attention
            block.attention = types.MethodType(_sdpa_attention, block)
            changed += 1
    return changed


def _transformer_class_token_out(self, x, attn_mask=None):
    """open_clip Transformer.forward whose last block computes the class token only: its keys
    and values still come from every token, but the query, out-projection and MLP run on one
    token instead of all (50 for ViT-B/32: ~7 % of the tower's FLOPs)."""
    *blocks, last = self.resblocks
    for block in blocks:
        x = block(x, attn_mask=attn_mask)
    h = last.ln_1(x)
    x = x[:, :1] + last.ls_1(last.attention(q_x=h[:, :1], k_x=h, v_x=h))
    return x + last.ls_2(last.mlp(last.ln_2(x)))


def prune_last_block(model: torch.nn.Module) -> bool:
    """When the image tower pools the class token and nothing else (open_clip ViTs with
    pool_type 'tok': the OpenAI and LAION ViT-B/L/H), every other token's output of the last
    block is computed and thrown away; skip that work. Same maths (fp32 max abs diff ~1e-6).
    Returns whether the tower was changed."""
    visual = getattr(model, "visual", None)
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not blocks or getattr(transformer, "_class_token_out", False):
        return False
    last = blocks[-1]
    if not (
        getattr(visual, "pool_type", None) == "tok" and getattr(visual, "attn_pool", 0) is None
        and not getattr(visual, "output_tokens", True) and getattr(transformer, "batch_first", False)
        and type(last).__name__ == "ResidualAttentionBlock" and not hasattr(last, "ln_1_kv")
        and hasattr(last, "_mha_attention")  # fused by fuse_attention
    ):
        return False
    transformer.forward = types.MethodType(_transformer_class_token_out, transformer)
    transformer._class_token_out = True
    return True
