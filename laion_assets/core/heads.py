"""LAION scoring heads (aesthetic V1 linear, aesthetic V2 MLP, CLIP-based NSFW) from files.

Heads are small; they run in numpy on L2-normalised image embeddings. Each head is tied to
the embedding space it was trained on: feeding another model's embeddings silently shifts the
scores off the published thresholds, so that is refused unless explicitly allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from laion_assets.core.config import HeadConfig
from laion_assets.core.errors import LaionAssetsError


@dataclass(frozen=True)
class Head:
    name: str  # the output column, e.g. aesthetic, punsafe
    kind: str  # aesthetic_linear | aesthetic_mlp | nsfw
    path: str
    trained_on: str
    dim: int
    weights: dict[str, np.ndarray]

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        """Scores for a (n, dim) float array; aesthetic is a 1–10 rating, nsfw a probability."""
        x = np.asarray(emb, dtype=np.float32)
        w = self.weights
        if self.kind == "aesthetic_linear":
            return (x @ w["weight"].T + w["bias"])[:, 0]
        if self.kind == "aesthetic_mlp":
            # Linear layers with dropout in between and no activations (as published).
            for i in (0, 2, 4, 6, 7):
                x = x @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
            return x[:, 0]
        x = (x - w["norm.mean"]) / (np.sqrt(w["norm.variance"]) + 1e-10)
        x = np.maximum(x @ w["linear_1.weight"].T + w["linear_1.bias"], 0)
        x = np.maximum(x @ w["linear_2.weight"].T + w["linear_2.bias"], 0)
        x = x @ w["linear_3.weight"].T + w["linear_3.bias"]
        return (1.0 / (1.0 + np.exp(-x)))[:, 0]


def _kind(keys: set[str]) -> str | None:
    if keys == {"weight", "bias"}:
        return "aesthetic_linear"
    if {"layers.0.weight", "layers.7.weight"} <= keys:
        return "aesthetic_mlp"
    if {"norm.mean", "norm.variance", "linear_1.weight", "linear_3.weight"} <= keys:
        return "nsfw"
    return None


def load_head(name: str, cfg: HeadConfig) -> Head:
    path = Path(cfg.path)
    if not path.is_file():
        raise LaionAssetsError(f"{name} head file {path} not found: fix scores.heads.{name}.path")
    import torch  # here, not at import: the CLI and UI start without loading torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LaionAssetsError(f"{name} head {path} is not a torch state_dict ({type(e).__name__}): use a LAION head .pth") from None
    weights = {k: v.float().numpy() for k, v in state.items()}
    kind = _kind(set(weights))
    if kind is None:
        raise LaionAssetsError(
            f"{path} is not a LAION aesthetic or NSFW head (keys {sorted(weights)[:5]}...): check scores.heads.{name}.path"
        )
    first = {"aesthetic_linear": "weight", "aesthetic_mlp": "layers.0.weight", "nsfw": "linear_1.weight"}
    dim = weights[first[kind]].shape[1]
    return Head(name, kind, str(path), cfg.trained_on, dim, weights)


def check_compatible(head: Head, dim: int | None, space: str, allow_space_mismatch: bool) -> None:
    """Refuse embeddings the head was not trained for (dimension always; space unless allowed)."""
    if dim is not None and head.dim != dim:
        raise LaionAssetsError(
            f"{head.name} head {head.path} expects {head.dim}-d embeddings but the model gives "
            f"{dim}-d ({space}): use the head trained for this model"
        )
    if head.trained_on != space and not allow_space_mismatch:
        raise LaionAssetsError(
            f"{head.name} head was trained on {head.trained_on} embeddings, not {space}: its scores "
            "would be off the published scale; use a matching model or set "
            "scores.allow_embedding_space_mismatch: true"
        )
