"""The open_clip training command for a subset's webdataset export, made to run as printed:
open_clip refuses more data-loader workers than tars ("number of shards must be >= total
workers"), a batch no worker can fill trains nothing, and `amp` needs a GPU."""

from __future__ import annotations

import os
import shlex
import sys

from laion_assets.core.exports.freshness import refuse_stale_export
from laion_assets.core.exports.webdataset import train_data
from laion_assets.core.lake.delta import Lake
from laion_assets.core.lake.errors import LaionAssetsError


def precision() -> tuple[str, str]:
    """The precision open_clip should use here, and the device it was chosen for."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return ("amp_bf16", name) if torch.cuda.is_bf16_supported() else ("amp", name)
    return "fp32", "cpu (no CUDA device)"


def fitting(sizes: list[int], batch_size: int, workers: int) -> tuple[int, int]:
    """Workers no more than the tars (nor the cores); a batch the worker with the fewest samples
    can fill (each worker reads every `workers`-th tar of a shuffled list: at worst the smallest)."""
    workers = max(0, min(workers, len(sizes), os.cpu_count() or 1))
    per_worker = sorted(sizes)[: max(1, len(sizes) // max(1, workers))]
    return max(1, min(batch_size, sum(per_worker))), workers


def train_command(lake: Lake, subset: str, model: str, batch_size: int, workers: int, epochs: int | None) -> str:
    data, sizes = train_data(lake, subset)
    if not sizes or not sum(sizes):
        raise LaionAssetsError(f"subset '{subset}' has no webdataset export in {lake.uri}: materialize webdataset_{subset} first")
    refuse_stale_export(lake, subset)  # never hand a trainer rows the subset no longer has
    batch, loaders = fitting(sizes, batch_size, workers)
    chosen, device = precision()
    notes = [f"precision {chosen} for {device}"]
    if loaders < workers:
        notes.append(f"--workers {loaders}: the export has {len(sizes)} tars, this machine {os.cpu_count()} cores")
    if batch < batch_size:
        notes.append(f"--batch-size {batch}: a worker may get only {batch} samples")
    print("# " + "; ".join(notes), file=sys.stderr)
    args = [
        sys.executable, "-m", "open_clip_train.main", "--model", model, "--dataset-type", "webdataset",
        "--train-data", data, "--train-num-samples", str(sum(sizes)), "--batch-size", str(batch),
        "--workers", str(loaders), "--precision", chosen,
    ]
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    return shlex.join(args)
