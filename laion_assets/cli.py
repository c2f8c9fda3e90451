"""`laion-assets`: run the pipeline without the UI, through Dagster (same assets, same
resources, runs recorded in the instance the UI reads).

    laion-assets run <input files or folders> [--lake URI] [--select ASSETS] [--config FILE]
    laion-assets backfill <inputs> # register shards and queue them for dagster-daemon
    laion-assets check-store       # is the lake's object store safe for concurrent writers?
    laion-assets remove-shard KEY  # delete a shard from the lake and the UI's partitions
    laion-assets demo              # bundled sample end to end, then where to look
    laion-assets sample-server     # serve the demo sample again (to materialize from the UI)
    laion-assets migrate-embeddings --space b32   # a lake from before embedding spaces
    laion-assets maintain          # remove leftover staging, compact and vacuum (the nightly job)
    laion-assets adopt             # a lake from before fingerprints: record what is published
    laion-assets search "a red car" [--image FILE] [--subset NAME] [-k N]
    laion-assets serve             # the search page on 127.0.0.1
    laion-assets train-args --subset NAME         # open_clip flags for a webdataset export
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from laion_assets.shard_runs import (
    INTERRUPTED,
    UP_TO_DATE,
    RunSummary,
    StageLine,
    execute_shard,
    remove_garbage,
    skip_up_to_date,
    summarize,
)

REPO = Path(__file__).resolve().parent.parent
DEMO_PORT = 8765


def _instance():
    """The Dagster instance of DAGSTER_HOME; the repo's dagster.yaml when unset."""
    from dagster import DagsterInstance

    from laion_assets.core.lake.errors import LaionAssetsError

    if not os.environ.get("DAGSTER_HOME"):
        home = Path.cwd() if (Path.cwd() / "dagster.yaml").is_file() else REPO
        if not (home / "dagster.yaml").is_file():
            raise LaionAssetsError("set DAGSTER_HOME to a folder with a dagster.yaml (see README)")
        os.environ["DAGSTER_HOME"] = str(home)
    return DagsterInstance.get()


def run_pipeline(
    inputs: list[str], lake: str, config: str | None, select: str | None, instance=None,
    retry_failures: bool = False, force: bool = False, summary: RunSummary | None = None,
) -> RunSummary:
    """Check and register the shard files, then materialize per shard the selected assets that
    are not already published and up to date (`force`: all of them), then the lake-wide ones.

    Bad input (a file that cannot be read or has no URL column, an unknown asset) raises
    LaionAssetsError before anything is registered; files skipped in a folder are listed.
    Ctrl-C or SIGTERM stops it within seconds: KeyboardInterrupt, `summary` holding what was done."""

    from laion_assets.core.config import load_config
    from laion_assets.core.lake.delta import Lake
    from laion_assets.defs.backfills import ensure_pools, register_shards, select_assets
    from laion_assets.defs.definitions import LAKE_JOB, SHARD_JOB, build_defs
    from laion_assets.defs.recovery import Interrupts, process_tags, recover_dead_runs
    from laion_assets.defs.resources import Settings
    from laion_assets.defs.runs import run_shard

    settings = Settings(lake=lake, inputs=inputs[0] if inputs else "data/input", config=config)
    defs = build_defs(settings)  # validates the config file first
    cfg = load_config(config)
    lk = Lake(lake)
    lk.ensure_writable()
    graph = defs.resolve_asset_graph()
    # the UI's own jobs, with an asset selection: runs started here re-execute from the UI
    job, lake_job = defs.resolve_job_def(SHARD_JOB), defs.resolve_job_def(LAKE_JOB)
    shard_keys, lake_keys = set(job.asset_layer.executable_asset_keys), set(lake_job.asset_layer.executable_asset_keys)
    chosen = select_assets(shard_keys | lake_keys, select)
    instance = instance or _instance()
    keys = register_shards(lk, inputs, instance)
    ensure_pools(defs, instance)
    summary = summary if summary is not None else RunSummary()
    summary.notes += recover_dead_runs(instance)

    order = [k for k in graph.toposorted_asset_keys if k in chosen and k in shard_keys]
    lake_order = [k for k in graph.toposorted_asset_keys if k in chosen and k in lake_keys]

    run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    with Interrupts() as interrupts:
        for key in keys:
            if not order:
                break
            to_run = skip_up_to_date(lk, cfg, order, key, force, retry_failures, summary)
            if not to_run:
                print(f"shard {key}: every selected stage is up to date", flush=True)
                continue
            print(f"shard {key}: running {', '.join(k.to_user_string() for k in to_run)}", flush=True)
            execute_shard(job, graph, instance, key, to_run, retry_failures, summary)
            if interrupts.seen() or any(line.detail.startswith(INTERRUPTED) for line in summary.lines):
                raise KeyboardInterrupt
        # Lake-wide assets read every shard: once, after the shards, if one of them went through
        # all its selected stages (or only lake-wide assets were selected).
        failed = {line.shard for line in summary.lines if line.status not in ("materialized", UP_TO_DATE)}
        if lake_order and (not order or set(keys) - failed):
            print(f"lake: running {', '.join(k.to_user_string() for k in lake_order)}", flush=True)
            summarize(summary, "(lake)", lake_order, graph, run_shard(instance, lake_job, None, lake_order, run_config, tags=process_tags()))
            if interrupts.seen() or any(line.detail.startswith(INTERRUPTED) for line in summary.lines):
                raise KeyboardInterrupt
        elif lake_order:
            summary.lines += [StageLine("(lake)", k.to_user_string(), "skipped", detail="no shard went through") for k in lake_order]
    summary.notes += remove_garbage(lk, cfg, {line.asset for line in summary.lines if line.status == "materialized"})
    return summary


def _print_tables(lake: str) -> None:
    import polars as pl

    from laion_assets.core.lake.delta import Lake

    lk = Lake(lake)
    print("\nDelta tables (read them with pl.read_delta(path) or duckdb's delta_scan(path)):")
    names = [name for name in lk.tables() if not name.startswith("_")]
    width = max([len(name) for name in names] + [28])
    for name in names:
        rows = lk.scan(name).select(pl.len()).collect().item()
        print(f"  {name:<{width}} {rows:>7} rows  {lk.table_uri(name)}")


def cmd_run(args) -> int:
    summary = RunSummary()
    try:
        run_pipeline(args.inputs, args.lake, args.config, args.select, retry_failures=args.retry_failures, force=args.force, summary=summary)
    except KeyboardInterrupt:
        print("\nper-stage summary (interrupted):")
        summary.print()
        print("interrupted: rerun the same command to resume (staged chunks and published stages are kept)", file=sys.stderr)
        return 130
    print("\nper-stage summary:")
    summary.print()
    _print_tables(args.lake)
    return 0 if summary.ok else 1


def cmd_backfill(args) -> int:
    """Register shard files and queue one backfill of their shard stages for the daemon."""
    from laion_assets.defs.backfills import backfill_shards

    backfill_id, keys = backfill_shards(args.inputs, args.lake, args.config, args.select, _instance())
    print(f"backfill {backfill_id}: {len(keys)} shards queued for the daemon")
    print("follow it in the UI (Overview > Backfills); lake-wide assets follow by their own automation")
    return 0


def cmd_check_store(args) -> int:
    """Probe the lake's object store for the conditional writes Delta commits rely on."""
    from laion_assets.core.lake.delta import Lake
    from laion_assets.core.lake.store import check_conditional_writes

    print(check_conditional_writes(Lake(args.lake)))
    return 0


def cmd_demo(args) -> int:
    from laion_assets.core.ingest.sample import SampleServer, write_demo_shard

    root = Path(args.data) / "demo"
    with SampleServer(root / "site", port=args.port) as server:
        shard = write_demo_shard(root, server.base_url, n_generated=300)
        print(f"sample shard {shard} served from {server.base_url}")
        summary = run_pipeline([str(shard)], args.lake, args.config, None)
    print("\nper-stage summary:")
    summary.print()
    _print_tables(args.lake)
    print(
        "\nSee the same runs, checks and lineage in the UI:\n"
        "  make ui            # then open http://127.0.0.1:3000\n"
        "To materialize the demo shard again from the UI, serve the sample meanwhile:\n"
        "  .venv/bin/laion-assets sample-server"
    )
    return 0 if summary.ok else 1


def cmd_migrate_embeddings(args) -> int:
    from laion_assets.core import stages
    from laion_assets.core.config import load_config
    from laion_assets.core.lake.delta import Lake
    from laion_assets.core.lake.errors import LaionAssetsError
    from laion_assets.core.lake.migrate import migrate_embeddings
    from laion_assets.core.stages import fingerprints

    cfg = load_config(args.config)
    spaces = cfg.embeddings.spaces
    if args.space not in spaces:
        raise LaionAssetsError(f"space '{args.space}' is not in embeddings.spaces of the config ({', '.join(spaces)})")
    lake = Lake(args.lake)
    result = migrate_embeddings(lake, args.space, spaces[args.space].identity, force=args.force)
    print(f"moved the embeddings table to {result['table']} ({result['rows']} rows)" if result["moved"] else result["reason"])
    if result["moved"]:  # moved, not made: recorded as up to date, so `run` does not embed them again
        fingerprints.adopt(lake, cfg, stages.embeddings_table(args.space))
    return 0


def cmd_remove_shard(args) -> int:
    """Delete shards from every table of the lake, the registry and the Dagster partitions."""
    from laion_assets.core.ingest import registry
    from laion_assets.core.lake.delta import Lake
    from laion_assets.defs.partitions import shards

    lk = Lake(args.lake)
    instance = _instance()
    for key in args.shards:
        deleted = registry.remove_shard(lk, key)
        instance.delete_dynamic_partition(shards.name, key)
        rows = ", ".join(f"{name} {n}" for name, n in deleted.items()) or "no rows"
        print(f"shard {key} removed (rows per table, files per export folder): {rows}; partition deleted")
    return 0


def cmd_adopt(args) -> int:
    """Record a lake's published shards as made from the current config and code."""
    from laion_assets.core.config import load_config
    from laion_assets.core.lake.delta import Lake
    from laion_assets.core.stages import fingerprints

    cfg, lake = load_config(args.config), Lake(args.lake)
    tables = [t for t in lake.tables() if not t.startswith("_") and fingerprints.stage_of(t) in fingerprints.CODE_VERSIONS]
    for table in tables:
        print(f"  {table:<28} {fingerprints.adopt(lake, cfg, table):>6} shards recorded as up to date")
    return 0


def cmd_maintain(args) -> int:
    """The lake_maintenance job, through Dagster (recorded in the instance like the schedule's)."""
    from laion_assets.defs.definitions import build_defs
    from laion_assets.defs.resources import Settings

    defs = build_defs(Settings(lake=args.lake, config=args.config))
    result = defs.resolve_job_def("lake_maintenance").execute_in_process(instance=_instance(), raise_on_error=False)
    print("lake maintained: staging leftovers removed, tables compacted and vacuumed" if result.success else "maintenance failed (see the run's logs)")
    return 0 if result.success else 1


def cmd_sample_server(args) -> int:
    from laion_assets.core.ingest.sample import SampleServer
    from laion_assets.core.lake.errors import LaionAssetsError

    site = Path(args.data) / "demo" / "site"
    if not site.is_dir():
        raise LaionAssetsError("no demo sample yet: run `make demo` first")
    with SampleServer(site, port=args.port) as server:
        print(f"serving {site} at {server.base_url} (Ctrl-C to stop)")
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass
    return 0


def _searcher(args):
    from laion_assets.core.config import load_config
    from laion_assets.core.exports.search import Searcher
    from laion_assets.core.lake.delta import Lake

    return Searcher(Lake(args.lake), load_config(args.config), device=args.device)


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

    from laion_assets.core.exports.webdataset import train_shards
    from laion_assets.core.lake.delta import Lake
    from laion_assets.core.lake.errors import LaionAssetsError

    urls, samples = train_shards(Lake(args.lake), args.subset)
    if not urls:
        raise LaionAssetsError(f"subset '{args.subset}' has no webdataset export in {args.lake}: materialize webdataset/{args.subset} first")
    print(f"--dataset-type webdataset --train-data {shlex.quote('::'.join(urls))} --train-num-samples {samples}")
    return 0


def add_search_commands(sub, env_lake: str, env_config: str | None) -> None:
    """`search`, `serve` and `train-args`: use a lake's exports and kNN indexes."""
    search = sub.add_parser("search", help="search a subset's kNN index by text and/or image")
    search.add_argument("query", nargs="?", help="text query, e.g. \"a red car\"")
    search.add_argument("--image", help="image file to search with (with a text query: both)")
    search.add_argument("--subset", help="subset to search (default: the first one with an index)")
    search.add_argument("-k", type=int, default=10, help="results (default %(default)s)")
    serve = sub.add_parser("serve", help="the search page on http://127.0.0.1:PORT")
    serve.add_argument("--port", type=int, default=8000)
    for p, fn in ((search, cmd_search), (serve, cmd_serve)):
        p.add_argument("--lake", default=env_lake)
        p.add_argument("--config", default=env_config, help="pipeline config YAML (the one the index was built with)")
        p.add_argument("--device", default="cpu", help="where the query model runs: cpu, cuda, auto (default %(default)s)")
        p.set_defaults(fn=fn)
    train = sub.add_parser("train-args", help="print open_clip's --train-data/--train-num-samples for an export")
    train.add_argument("--subset", required=True)
    train.add_argument("--lake", default=env_lake)
    train.set_defaults(fn=cmd_train_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="laion-assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env_lake = os.environ.get("LAION_ASSETS_LAKE", "data/lake")
    env_config = os.environ.get("LAION_ASSETS_CONFIG")

    run = sub.add_parser("run", help="register shard files and materialize the selected assets")
    run.add_argument("inputs", nargs="+", help="shard files or folders (.parquet/.csv/.tsv/.jsonl[.gz]; s3:// too)")
    run.add_argument("--lake", default=env_lake, help="lake root: folder or s3://bucket/prefix (default %(default)s)")
    run.add_argument("--select", help="comma-separated asset keys, e.g. raw_urls,images (default: all)")
    run.add_argument("--config", default=env_config, help="pipeline config YAML (default: built-in)")
    run.add_argument("--retry-failures", action="store_true", help="images: re-fetch only retryable failures")
    run.add_argument("--force", action="store_true", help="redo the selected stages even when published and up to date")
    run.set_defaults(fn=cmd_run)

    backfill = sub.add_parser("backfill", help="register shard files and queue them as one backfill for the daemon")
    backfill.add_argument("inputs", nargs="+", help="shard files or folders (as for run)")
    backfill.add_argument("--lake", default=env_lake, help="lake root (must be the one the code location uses)")
    backfill.add_argument("--select", help="comma-separated shard asset keys or prefixes (default: all)")
    backfill.add_argument("--config", default=env_config, help="pipeline config YAML (to check the selection)")
    backfill.set_defaults(fn=cmd_backfill)

    store = sub.add_parser("check-store", help="check that the lake's object store is safe for concurrent writers")
    store.add_argument("--lake", default=env_lake, help="lake root, e.g. s3://bucket/prefix")
    store.set_defaults(fn=cmd_check_store)

    demo = sub.add_parser("demo", help="build the bundled sample, serve it on 127.0.0.1 and run every stage")
    demo.add_argument("--lake", default=env_lake)
    demo.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    demo.add_argument("--data", default="data")
    demo.add_argument("--port", type=int, default=DEMO_PORT)
    demo.set_defaults(fn=cmd_demo)

    migrate = sub.add_parser(
        "migrate-embeddings", help="move a lake's single `embeddings` table to embeddings/<space> (no recompute)",
    )
    migrate.add_argument("--space", required=True, help="the configured space those vectors belong to, e.g. b32")
    migrate.add_argument("--lake", default=env_lake)
    migrate.add_argument("--config", default=env_config, help="pipeline config YAML declaring the space")
    migrate.add_argument("--force", action="store_true", help="move even if the vectors' model differs from the space's")
    migrate.set_defaults(fn=cmd_migrate_embeddings)

    adopt = sub.add_parser(
        "adopt", help="record the published shards as made from the current config (a lake from before fingerprints): nothing is recomputed",
    )
    adopt.add_argument("--lake", default=env_lake)
    adopt.add_argument("--config", default=env_config)
    adopt.set_defaults(fn=cmd_adopt)

    maintain = sub.add_parser("maintain", help="remove leftover staging, compact and vacuum every table (honours the retention)")
    maintain.add_argument("--lake", default=env_lake)
    maintain.add_argument("--config", default=env_config, help="pipeline config YAML (maintenance: retention, file size)")
    maintain.set_defaults(fn=cmd_maintain)

    remove = sub.add_parser("remove-shard", help="delete shards from the lake, the registry and the UI's partitions")
    remove.add_argument("shards", nargs="+", help="shard keys (input file names without extensions)")
    remove.add_argument("--lake", default=env_lake, help="lake root: folder or s3://bucket/prefix (default %(default)s)")
    remove.set_defaults(fn=cmd_remove_shard)

    serve = sub.add_parser("sample-server", help="serve the demo sample on 127.0.0.1")
    serve.add_argument("--data", default="data")
    serve.add_argument("--port", type=int, default=DEMO_PORT)
    serve.set_defaults(fn=cmd_sample_server)

    add_search_commands(sub, env_lake, env_config)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    from laion_assets.core.lake.errors import LaionAssetsError, explain

    try:
        return args.fn(args)
    except LaionAssetsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        err = explain(e)  # disk full, permissions, missing files, object store: one line
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
