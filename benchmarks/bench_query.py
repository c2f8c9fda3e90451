"""Search query encoding: what one text or image query costs before the index is searched, through
the `QueryEncoder` that `laion-assets search`, `serve` and `/knn-service` use, beside the same
text encoded the way a shard's captions are (a batch padded to 256 rows, what every query paid
before it was encoded alone). bench_knn.py measures the index lookup after it.

The model is the real open_clip architecture loaded through `load_model` from a checkpoint:
`--checkpoint` if given, else one written with seeded random weights (no download here).

    .venv/bin/python benchmarks/bench_query.py                      # ViT-B-32
    .venv/bin/python benchmarks/bench_query.py --model ViT-L-14 --queries 5
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from laion_assets.core.embeddings.config import SpaceConfig
from laion_assets.core.embeddings.encoder import Encoder
from laion_assets.core.exports.search import QueryEncoder

CAPTIONS = ["a red car on a road", "a cat asleep on a chair", "a mountain lake at dawn", "two dogs on a beach"]


def timed(fn, n: int) -> float:
    """Median seconds of `n` calls (after one warm-up call)."""
    fn(0)
    took = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        took.append(time.perf_counter() - start)
    return statistics.median(took)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32", help="an open_clip model name")
    ap.add_argument("--checkpoint", help="its weights; default: seeded random weights written to a temp file")
    ap.add_argument("--queries", type=int, default=10, help="timed queries of each kind")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            torch.manual_seed(0)
            checkpoint = str(Path(tmp) / "random.pt")
            torch.save(open_clip.create_model(args.model).state_dict(), checkpoint)
        query = QueryEncoder(SpaceConfig(model=args.model, checkpoint=checkpoint), args.device)
        started = time.perf_counter()
        clip = query.encoder().clip
        load = time.perf_counter() - started

        rng = np.random.default_rng(0)
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(out, "JPEG")
        image = out.getvalue()
        padded = Encoder(clip, batch_size=1, workers=1)  # captions of a shard: padded text batches

        text = timed(lambda i: query(text=CAPTIONS[i % len(CAPTIONS)]), args.queries)
        picture = timed(lambda i: query(image=image), args.queries)
        before = timed(lambda i: padded.texts([CAPTIONS[i % len(CAPTIONS)]]), max(1, min(3, args.queries)))

    print(f"{args.model} on {args.device}, {torch.get_num_threads()} torch threads, model load {load:.1f} s")
    print(f"  text query   {text * 1000:8.1f} ms  (median of {args.queries})")
    print(f"  image query  {picture * 1000:8.1f} ms")
    print(f"  text padded to {padded.text_batch_size} rows (a query before it was encoded alone): "
          f"{before * 1000:.1f} ms = {before / text:.0f}x the text query")


if __name__ == "__main__":
    main()
