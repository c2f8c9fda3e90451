"""LAION scoring heads (aesthetic V1 linear, aesthetic V2 MLP, CLIP-based NSFW) from files.

A head file is a torch state_dict; the network it defines is read from its layer structure,
not assumed: the NSFW head for ViT-L/14 has four linear layers where the B/32 one has three,
and both are computed to their last layer. A file whose keys or shapes match none of the known
architectures is refused rather than half-run. Heads are small; they run in numpy on
L2-normalised image embeddings, in float64: float32 BLAS kernels round a row differently with
the rows batched around it (scores differed by ~1e-6 between two runs), float64 rounded to the
published float32 does not. Each head is tied to the embedding space it was trained on:
feeding another model's embeddings silently shifts scores off the published thresholds, so that
is refused unless explicitly allowed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from laion_assets.core.lake.errors import LaionAssetsError
from laion_assets.core.scores.config import HeadConfig

KNOWN = (
    "LAION aesthetic V1 (weight, bias), aesthetic V2 MLP (layers.0/2/4/6/7), "
    "CLIP-based NSFW (norm.mean, norm.variance, linear_1..linear_N)"
)


@dataclass(frozen=True)
class Head:
    name: str  # the output column, e.g. aesthetic, punsafe
    kind: str  # aesthetic_linear | aesthetic_mlp | nsfw
    path: str
    sha256: str
    trained_on: str
    dim: int
    steps: tuple  # ("normalize", mean, std) | ("linear", W, b) | ("relu",) | ("sigmoid",)

    @property
    def probability(self) -> bool:
        return self.kind == "nsfw"

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        """Scores for a (n, dim) float array; aesthetic is a 1–10 rating, nsfw a probability."""
        x = np.asarray(emb, dtype=np.float64)
        for op, *p in self.steps:
            if op == "normalize":
                x = (x - p[0]) / p[1]
            elif op == "linear":
                x = x @ p[0].T + p[1]
            elif op == "relu":
                x = np.maximum(x, 0)
            else:  # sigmoid
                x = 1.0 / (1.0 + np.exp(-x))
        return x[:, 0]

    def describe(self) -> dict:
        """What a recipe records about this head."""
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256, "trained_on": self.trained_on, "dim": self.dim}


def _linears(w: dict[str, np.ndarray], names: list[str]) -> list[tuple]:
    """Linear steps for `names` in order, checking that each layer feeds the next and ends in 1."""
    steps, width = [], None
    for n in names:
        weight, bias = w[f"{n}.weight"], w[f"{n}.bias"]
        if weight.ndim != 2 or bias.shape != (weight.shape[0],) or (width is not None and weight.shape[1] != width):
            raise ValueError(f"layer {n} has shape {weight.shape} after a {width}-wide layer")
        steps.append(("linear", weight, bias))
        width = weight.shape[0]
    if width != 1:
        raise ValueError(f"the last layer gives {width} outputs, not one score")
    return steps


def _numbered(keys: set[str], prefix: str) -> list[int] | None:
    """Sorted N of `<prefix>N.weight`/`.bias` pairs, if `keys` holds only those."""
    found = [re.fullmatch(rf"{re.escape(prefix)}(\d+)\.(weight|bias)", k) for k in keys]
    if not found or not all(found):
        return None
    numbers = sorted({int(m.group(1)) for m in found})
    return numbers if len(keys) == 2 * len(numbers) else None


def architecture(w: dict[str, np.ndarray]) -> tuple[str, list[tuple]]:
    """(kind, steps) of the network a state_dict defines; ValueError when it is none we know."""
    keys = set(w)
    if keys == {"weight", "bias"}:
        return "aesthetic_linear", _linears({"linear.weight": w["weight"], "linear.bias": w["bias"]}, ["linear"])
    if _numbered(keys, "layers.") == [0, 2, 4, 6, 7]:
        # improved-aesthetic-predictor: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear,
        # Linear (Sequential indices); no activations, as published
        return "aesthetic_mlp", _linears(w, [f"layers.{i}" for i in (0, 2, 4, 6, 7)])
    if {"norm.mean", "norm.variance"} <= keys:
        numbers = _numbered(keys - {"norm.mean", "norm.variance"}, "linear_")
        if numbers and len(numbers) >= 2 and numbers == list(range(1, len(numbers) + 1)):
            linears = _linears(w, [f"linear_{i}" for i in numbers])
            mean, var = w["norm.mean"], w["norm.variance"]
            if mean.shape != var.shape or mean.shape != (linears[0][1].shape[1],):
                raise ValueError(f"norm is {mean.shape}-wide but linear_1 takes {linears[0][1].shape[1]}")
            # Keras Normalization, then Linear+ReLU for every layer but the last, then sigmoid
            steps = [("normalize", mean, np.sqrt(var) + 1e-10)]
            for step in linears[:-1]:
                steps += [step, ("relu",)]
            return "nsfw", [*steps, linears[-1], ("sigmoid",)]
    raise ValueError(f"keys {sorted(keys)[:6]}{'...' if len(keys) > 6 else ''} match no known head ({KNOWN})")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_head(name: str, cfg: HeadConfig) -> Head:
    path = Path(cfg.path)
    if not path.is_file():
        raise LaionAssetsError(f"{name} head file {path} not found: fix scores.heads.{name}.path")
    import torch  # here, not at import: the CLI and UI start without loading torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights = {k: v.double().numpy() for k, v in state.items()}
    except Exception as e:
        raise LaionAssetsError(f"{name} head {path} is not a torch state_dict ({type(e).__name__}): use a LAION head .pth") from None
    try:
        kind, steps = architecture(weights)
    except ValueError as e:
        raise LaionAssetsError(f"{path} is not a LAION aesthetic or NSFW head this loader understands: {e}: check scores.heads.{name}.path") from None
    first = next(s for s in steps if s[0] == "linear")
    return Head(name, kind, str(path), file_sha256(path), cfg.trained_on, int(first[1].shape[1]), tuple(steps))


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
