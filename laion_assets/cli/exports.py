"""`search`, `serve`, `train-args`: use a lake's exports and kNN indexes."""

from __future__ import annotations

from pathlib import Path

from laion_assets.cli.options import add_lake


def _searcher(args):
    """The index names its query model; a config is read only when given, as an override."""
    from laion_assets.core.exports.search import Searcher
    from laion_assets.core.lake.delta import Lake

    cfg = None
    if args.config:
        from laion_assets.core.config import load_config

        cfg = load_config(args.config)
    return Searcher(Lake(args.lake), cfg, device=args.device)


def cmd_search(args) -> int:
    from laion_assets.core.lake.errors import LaionAssetsError

    image = None
    if args.image:
        try:
            image = Path(args.image).read_bytes()
        except OSError as e:
            raise LaionAssetsError(f"cannot read image {args.image}: {e.strerror}") from None
    hits = _searcher(args).search(args.query, image, args.subset, args.k)
    print(f"{'rank':>4} {'score':>7}  {'uid':>20}  url  caption")
    for hit in hits:
        print(f"{hit.rank:>4} {hit.score:>7.4f}  {hit.uid:>20}  {hit.url}  {hit.caption or ''}")
    return 0


def cmd_serve(args) -> int:
    from laion_assets.core.exports.serve import serve

    serve(_searcher(args), args.port)
    return 0


def cmd_train_args(args) -> int:
    import shlex

    from laion_assets.core.exports import freshness
    from laion_assets.core.exports.webdataset import train_shards
    from laion_assets.core.lake.delta import Lake
    from laion_assets.core.lake.errors import LaionAssetsError

    lake = Lake(args.lake)
    urls, samples = train_shards(lake, args.subset)
    if not urls:
        raise LaionAssetsError(f"subset '{args.subset}' has no webdataset export in {args.lake}: materialize webdataset_{args.subset} first")
    freshness.refuse_stale_export(lake, args.subset)
    print(f"--dataset-type webdataset --train-data {shlex.quote('::'.join(urls))} --train-num-samples {samples}")
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
    serve = sub.add_parser(
        "serve", help="the search page on http://127.0.0.1:PORT",
        description="Serve the search page (text box, image upload, a grid of results with thumbnails) and its JSON "
        "API on 127.0.0.1, over every subset with a kNN index; query models load once, at start.",
    )
    serve.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default: %(default)s)")
    for p, fn in ((search, cmd_search), (serve, cmd_serve)):
        add_lake(p, env_lake)
        p.add_argument(
            "--config", help="only to override the query model the index names (an index from before indexes named "
            "it): a pipeline config YAML whose space of that name is the same model ($LAION_ASSETS_CONFIG is not read)",
        )
        p.add_argument("--device", default="cpu", help="where the query model runs: cpu, cuda, auto (default: %(default)s)")
        p.set_defaults(fn=fn)

    train = sub.add_parser(
        "train-args", help="print open_clip's --train-data/--train-num-samples for a webdataset export",
        description="Print the open_clip training flags for a subset's webdataset export: --dataset-type webdataset, "
        "--train-data with every tar (:: separated), --train-num-samples.",
    )
    train.add_argument("--subset", required=True, help="the exported subset (materialize webdataset_SUBSET first)")
    add_lake(train, env_lake)
    train.set_defaults(fn=cmd_train_args)
