"""open_clip models: loading by name + pretrained tag, local checkpoint, or the tiny offline
preset; batched, L2-normalised image and text embeddings.

Images are decoded and preprocessed on worker threads while the model runs the previous
batch (threads, not processes: deltalake panics in forked children).
"""

from __future__ import annotations

import difflib
import io
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from laion_assets.core.config import EmbeddingConfig
from laion_assets.core.errors import LaionAssetsError

log = logging.getLogger(__name__)

TINY_NAME = "tiny_clip"
TINY_WARNING = (
    "embedding model 'tiny' is a randomly initialised open_clip model (seed 0) for offline "
    "demos and tests: its embeddings, similarities and scores are MEANINGLESS"
)
open_clip.add_model_config(Path(__file__).with_name(f"{TINY_NAME}.json"))


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
        return self.space.startswith("tiny/")

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


def load_model(cfg: EmbeddingConfig) -> ClipModel:
    """Load the configured model; every failure is a one-line LaionAssetsError."""
    device = _device(cfg.device)
    precision = _precision(cfg.precision, device)
    name = TINY_NAME if cfg.model == "tiny" else cfg.model
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise LaionAssetsError(
            f"open_clip has no model '{cfg.model}'"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + ": see open_clip.list_models(), or use 'tiny' offline"
        )
    pretrained = None
    if cfg.model == "tiny":
        log.warning(TINY_WARNING)
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
    return ClipModel(
        model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name),
        name=cfg.model, pretrained=pretrained if not cfg.checkpoint else None, space=cfg.space,
        dim=int(model.visual.output_dim),
        device=device, precision=precision,
    )


class Encoder:
    """Batched encoding for one loaded model."""

    def __init__(self, clip: ClipModel, batch_size: int, workers: int | None = None):
        self.clip = clip
        self.batch_size = batch_size
        self.workers = workers or max(1, (os.cpu_count() or 1))

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.clip.precision)
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.clip.device.type, dtype=dtype)

    def _prep(self, blob: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(blob)) as img:
            return self.clip.preprocess(img.convert("RGB"))

    def _batches(self, blobs: Iterable[bytes], pool: ThreadPoolExecutor) -> Iterator[torch.Tensor]:
        """Preprocessed batches, with the next two batches' decoding already under way."""
        window: deque = deque()
        it = iter(blobs)
        limit = 3 * self.batch_size

        def fill() -> None:
            while len(window) < limit:
                try:
                    window.append(pool.submit(self._prep, next(it)))
                except StopIteration:
                    return

        fill()
        while window:
            batch = [window.popleft().result() for _ in range(min(self.batch_size, len(window)))]
            fill()
            yield torch.stack(batch)

    @torch.inference_mode()
    def images(self, blobs: Iterable[bytes]) -> np.ndarray:
        """(n, dim) float32, L2-normalised."""
        out = []
        pin = self.clip.device.type == "cuda"
        with ThreadPoolExecutor(self.workers, thread_name_prefix="clip-prep") as pool:
            for batch in self._batches(blobs, pool):
                if pin:
                    batch = batch.pin_memory()
                batch = batch.to(self.clip.device, non_blocking=True)
                with self._autocast():
                    emb = self.clip.model.encode_image(batch)
                out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.clip.dim), np.float32)

    @torch.inference_mode()
    def texts(self, captions: list[str | None]) -> np.ndarray:
        """(n, dim) float32, L2-normalised; captions tokenised in bulk, a missing one as ''."""
        out = []
        bs = max(self.batch_size, 256)  # text is cheap: bigger batches
        for start in range(0, len(captions), bs):
            tokens = self.clip.tokenizer([c or "" for c in captions[start : start + bs]])
            with self._autocast():
                emb = self.clip.model.encode_text(tokens.to(self.clip.device))
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.clip.dim), np.float32)
