"""`search`, `serve`, `train-args`: use a lake's exports and kNN indexes."""

from __future__ import annotations

from pathlib import Path

from laion_assets.cli.options import add_lake


def _config(args):
    """A config is read only when given: the index names its query model."""
    if not args.config:
        return None
    from laion_assets.core.config import load_config

    return load_config(args.config)


def _searcher(args, cfg=None):
    from laion_assets.core.exports.search import Searcher
    from laion_assets.core.lake.delta import Lake

    return Searcher(Lake(args.lake), cfg or _config(args), device=args.device)


def cmd_search(args) -> int:
    from laion_assets.core.lake.errors import LaionAssetsError

    image = None
    if args.image:
        try:
            image = Path(args.image).read_bytes()
        except OSError as e:
            raise LaionAssetsError(f"cannot read image {args.image}: {e.strerror}") from None
    hits = _searcher(args).search(args.query, image, args.subset, args.k, deduplicate=not args.all_copies)
    print(f"{'rank':>4} {'score':>7}  {'uid':>20}  url  caption")
    for hit in hits:
        copies = f"  (+{hit.copies} of the same image)" if hit.copies else ""
        print(f"{hit.rank:>4} {hit.score:>7.4f}  {hit.uid:>20}  {hit.url}  {hit.caption or ''}{copies}")
    return 0


def cmd_serve(args) -> int:
    from laion_assets.core.exports.serve import serve

    cfg = _config(args)
    serve(_searcher(args, cfg), args.port, args.host, cfg.download if cfg else None)
    return 0


def cmd_train_args(args) -> int:
    from laion_assets.core.exports.training import train_command
    from laion_assets.core.lake.delta import Lake

    print(train_command(Lake(args.lake), args.subset, args.model, args.batch_size, args.workers, args.epochs))
    return 0


def add_commands(sub, env_lake: str, env_config: str | None) -> None:
    """`search`, `serve` and `train-args`: use a lake's exports and kNN indexes."""
    search = sub.add_parser(
        "search", help="search a subset's kNN index by text and/or image",
        description="Embed the query with the CLIP model the subset's kNN index was built with (its manifest names it: "
        "no config needed) and print the nearest images: rank, cosine score, uid, url, caption. A text and an image "
        "together search their normalised sum. Each call loads the model (seconds): for many queries, `serve`.",
    )
    search.add_argument("query", nargs="?", help="text query, e.g. \"a red car\"")
    search.add_argument("--image", help="image file to search with (with a text query: both)")
    search.add_argument("--subset", help="subset to search (default: the first one with an index)")
    search.add_argument("-k", type=int, default=10, help="number of results (default: %(default)s)")
    search.add_argument("--all-copies", action="store_true", help="list every hit of the same image (sha256); by default they are collapsed into the first")
    serve = sub.add_parser(
        "serve", help="the search page and clip-retrieval's API on http://127.0.0.1:PORT",
        description="Serve the search page (text box, image upload, a grid of results with thumbnails), its JSON "
        "API and clip-retrieval's back-end API (/knn-service, /indices-list, /metadata) on 127.0.0.1, over every "
        "subset with a kNN index; query models load once, at start. image_url queries are fetched with the SSRF "
        "guard of the config's download section (--config; without one no private address is allowed).",
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind, e.g. 0.0.0.0 for every interface (default: %(default)s, this machine only)")
    for p, fn in ((search, cmd_search), (serve, cmd_serve)):
        add_lake(p, env_lake)
        p.add_argument(
            "--config", help="only to override the query model the index names (an index from before indexes named "
            "it), and for serve's image_url fetches (its download section): a pipeline config YAML whose space of that "
            "name is the same model ($LAION_ASSETS_CONFIG is not read)",
        )
        p.add_argument("--device", default="cpu", help="where the query model runs: cpu, cuda, auto (default: %(default)s)")
        p.set_defaults(fn=fn)

    train = sub.add_parser(
        "train-args", help="print an open_clip training command for a subset's webdataset export",
        description="Print the open_clip command that trains on a subset's webdataset export, as it runs: "
        "--train-data (one brace pattern over every tar), --train-num-samples, --workers no more than the tars, a "
        "--batch-size every worker can fill, and a --precision the device this runs on supports (amp_bf16 or amp on a "
        "GPU, fp32 on CPU). What it lowered is said on stderr.",
    )
    train.add_argument("--subset", required=True, help="the exported subset (materialize webdataset_SUBSET first)")
    train.add_argument("--model", default="ViT-B-32", help="open_clip model name, or local-dir:FOLDER (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=256, help="per GPU, lowered for a small export (default: %(default)s)")
    train.add_argument("--workers", type=int, default=4, help="data loader workers, at most the number of tars (default: %(default)s)")
    train.add_argument("--epochs", type=int, help="epochs (default: open_clip's)")
    add_lake(train, env_lake)
    train.set_defaults(fn=cmd_train_args)
