"""`run`, `backfill`, `demo`, `sample-server`: shards through the pipeline, through Dagster
(same assets, same resources, runs recorded in the instance the UI reads)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from laion_assets.cli.options import LAKE_ENV, add_config, add_lake, default_lake
from laion_assets.cli.shard_runs import (
    INTERRUPTED,
    UP_TO_DATE,
    RunSummary,
    StageLine,
    execute_shard,
    lake_wide_to_run,
    remove_garbage,
    skip_up_to_date,
    summarize,
)

REPO = Path(__file__).resolve().parent.parent.parent
CLI = ".venv/bin/laion-assets"  # as `make install` puts it
DATA = "data"
DEMO_PORT = 8765
UI_PORT = 3000  # `make ui`'s default PORT


def dagster_instance():
    """The Dagster instance of DAGSTER_HOME; the repo's dagster.yaml when unset. Its storages
    are created or migrated under the instance lock (cli/locks.py): processes starting at once
    on a fresh home would otherwise each stamp its own alembic head."""
    from dagster import DagsterInstance

    from laion_assets.cli.locks import instance_lock
    from laion_assets.core.lake.errors import LaionAssetsError

    if not os.environ.get("DAGSTER_HOME"):
        home = Path.cwd() if (Path.cwd() / "dagster.yaml").is_file() else REPO
        if not (home / "dagster.yaml").is_file():
            raise LaionAssetsError("set DAGSTER_HOME to a folder with a dagster.yaml (see docs/CLI.md)")
        os.environ["DAGSTER_HOME"] = str(home)
    with instance_lock(os.environ["DAGSTER_HOME"]):
        return DagsterInstance.get()  # creates (or migrates) a sqlite instance's databases


def run_pipeline(
    inputs: list[str], lake: str, config: str | None, select: str | None, instance=None,
    retry_failures: bool = False, force: bool = False, summary: RunSummary | None = None,
    adopt: tuple[str, str | None] | None = None,
) -> RunSummary:
    """Check and register the shard files, then materialize per shard the selected assets that
    are not already published and up to date (`force`: all of them), then the lake-wide ones.

    Bad input (a file that cannot be read or has no URL column, an unknown asset) raises
    LaionAssetsError before anything is registered; files skipped in a folder are listed.
    Ctrl-C or SIGTERM stops it within seconds: KeyboardInterrupt, `summary` holding what was done.
    A stage failing on the machine or store (disk full...) stops it too: its InfrastructureError.
    `adopt` (an img2dataset folder, a key prefix) registers that folder's shards instead.
    With steps run in this process and great-expectations not imported yet, it is imported
    meanwhile in a child process that runs the gates (core/lake/gate_process.py)."""
    from laion_assets.core.lake import gate_process

    in_process = (os.environ.get("LAION_ASSETS_EXECUTOR") or "in_process") == "in_process"  # Settings' default, without importing Dagster yet
    ahead = in_process and "great_expectations" not in sys.modules  # else the gates are as quick here
    with gate_process.started() if ahead else contextlib.nullcontext():
        return _run_pipeline(inputs, lake, config, select, instance, retry_failures, force, summary, adopt)


def _run_pipeline(inputs, lake, config, select, instance, retry_failures, force, summary, adopt) -> RunSummary:
    from laion_assets.cli.locks import held, instance_lock, shard_lock
    from laion_assets.core.config import load_config
    from laion_assets.core.lake.delta import Lake
    from laion_assets.core.lake.store import require_credentials
    from laion_assets.defs.backfills import ensure_pools, register_adopted, register_shards, select_assets
    from laion_assets.defs.definitions import LAKE_JOB, SHARD_JOB, build_defs
    from laion_assets.defs.keys import lake_paths
    from laion_assets.defs.recovery import Interrupts, recover_dead_runs
    from laion_assets.defs.resources import Settings
    from laion_assets.defs.runs import run_shard

    settings = Settings(lake=lake, inputs=inputs[0] if inputs else "data/input", config=config)
    defs = build_defs(settings)  # validates the config file first
    cfg = load_config(config)
    for uri in (lake, *inputs):
        require_credentials(uri)
    lk = Lake(lake)
    lk.ensure_writable()
    graph = defs.resolve_asset_graph()
    # the UI's own jobs, with an asset selection: runs started here re-execute from the UI
    job, lake_job = defs.resolve_job_def(SHARD_JOB), defs.resolve_job_def(LAKE_JOB)
    shard_keys, lake_keys = set(job.asset_layer.executable_asset_keys), set(lake_job.asset_layer.executable_asset_keys)
    paths = lake_paths(graph)
    chosen = select_assets(shard_keys | lake_keys, select, paths)
    instance = instance or dagster_instance()
    home = instance.root_directory
    summary = summary if summary is not None else RunSummary()
    with instance_lock(home):  # several runs at once: partitions and pools added once
        keys = register_adopted(lk, *adopt, instance) if adopt else register_shards(lk, inputs, instance)
        ensure_pools(defs, instance)
        summary.notes += recover_dead_runs(instance)

    order = [k for k in graph.toposorted_asset_keys if k in chosen and k in shard_keys]
    lake_order = [k for k in graph.toposorted_asset_keys if k in chosen and k in lake_keys]

    def run_one(key: str) -> None:
        to_run = skip_up_to_date(lk, cfg, order, paths, key, force, retry_failures, summary)
        if not to_run:
            print(f"shard {key}: every selected stage is up to date", flush=True)
            return
        print(f"shard {key}: running {', '.join(paths[k] for k in to_run)}", flush=True)
        execute_shard(job, graph, paths, instance, key, to_run, retry_failures, summary)
        if summary.infrastructure:  # disk full, read-only lake, store down: the next shard would fail too
            raise summary.infrastructure
        if interrupts.seen() or any(line.detail.startswith(INTERRUPTED) for line in summary.lines):
            raise KeyboardInterrupt

    run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    with Interrupts() as interrupts:
        # A shard another run is computing is done last: waited for, then found up to date.
        busy = []
        for key in keys if order else []:
            lock = shard_lock(home, lk.uri, key)
            if not lock.try_acquire():
                busy.append((key, lock))
                continue
            with held(lock):
                run_one(key)
        for key, lock in busy:
            lock.acquire(f"shard {key}: another laion-assets run is computing it")
            with held(lock):
                run_one(key)
        # Lake-wide assets read every shard: once, after the shards, if one of them went through
        # all its selected stages (or only lake-wide assets were selected).
        failed = {line.shard for line in summary.lines if line.status not in ("materialized", UP_TO_DATE)}
        if lake_order and (not order or set(keys) - failed):
            lock = shard_lock(home, lk.uri, "(lake)")
            lock.acquire("lake: another laion-assets run is running the lake-wide assets")
            with held(lock):  # taken first: what another run just made is found up to date
                lake_run = lake_wide_to_run(lk, cfg, lake_order, graph, paths, force, summary)
                if lake_run:
                    summary.running = ("(lake)", [paths[k] for k in lake_run])
                    print(f"lake: running {', '.join(summary.running[1])}", flush=True)
                    summarize(summary, "(lake)", lake_run, graph, paths, run_shard(instance, lake_job, None, lake_run, run_config))
                    summary.running = None
                else:
                    print("lake: every selected lake-wide asset is up to date", flush=True)
            if summary.infrastructure:
                raise summary.infrastructure
            if interrupts.seen() or any(line.detail.startswith(INTERRUPTED) for line in summary.lines):
                raise KeyboardInterrupt
        elif lake_order:
            summary.lines += [StageLine("(lake)", paths[k], "skipped", detail="no shard went through") for k in lake_order]
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


def report_run(lake: str, run) -> int:
    """Run `run(summary)` and end as every pipeline command ends: the per-stage summary and the
    lake's tables; on an infrastructure error the summary so far, then main's one line (exit 2);
    on Ctrl-C or SIGTERM the interrupted summary and exit 130."""
    from laion_assets.core.lake.errors import InfrastructureError

    summary = RunSummary()
    try:
        run(summary)
    except InfrastructureError:  # the one line and exit 2 (main), after what was done
        print("\nper-stage summary (stopped):")
        summary.print()
        raise
    except KeyboardInterrupt:
        summary.interrupted()
        print("\nper-stage summary (interrupted):")
        summary.print()
        print("interrupted: rerun the same command to resume (staged chunks and published stages are kept)", file=sys.stderr)
        return 130
    print("\nper-stage summary:")
    summary.print()
    _print_tables(lake)
    return 0 if summary.ok else 1


def cmd_run(args) -> int:
    return report_run(args.lake, lambda summary: run_pipeline(
        args.inputs, args.lake, args.config, args.select, retry_failures=args.retry_failures, force=args.force, summary=summary,
    ))


def cmd_backfill(args) -> int:
    """Register shard files and queue one backfill of their shard stages for the daemon."""
    from laion_assets.cli.locks import instance_lock
    from laion_assets.defs.backfills import backfill_shards

    instance = dagster_instance()
    with instance_lock(instance.root_directory):  # registers like `run`: one process at a time
        backfill_id, keys = backfill_shards(args.inputs, args.lake, args.config, args.select, instance)
    print(f"backfill {backfill_id}: {len(keys)} shards queued for the daemon")
    print("follow it in the UI (Overview > Backfills); lake-wide assets follow by their own automation")
    return 0


def demo_hint(lake: str, data: str, sample_port: int, ui_port: int) -> str:
    """The demo's closing lines: commands to look at its result, with the ports it used (the
    shard's URLs name the sample port) and its lake and data folder where not the defaults."""
    import shlex

    own_lake = lake != default_lake()
    lake_env = f"{LAKE_ENV}={shlex.quote(lake)} " if own_lake else ""
    lake_arg = f" --lake {shlex.quote(lake)}" if own_lake else ""
    data_arg = f" --data {shlex.quote(data)}" if data != DATA else ""
    return (
        "\nSee the same runs, checks and lineage in the UI:\n"
        f"  {lake_env}make ui PORT={ui_port}   # then open http://127.0.0.1:{ui_port}\n"
        f"To materialize the demo shard again from the UI, serve the sample meanwhile (its URLs name port {sample_port}):\n"
        f"  {CLI} sample-server --port {sample_port}{data_arg}\n"
        "Search the demo's kNN indexes (tiny random models: the neighbours mean nothing):\n"
        f'  {CLI} search "a red car"{lake_arg}'
    )


def cmd_demo(args) -> int:
    from laion_assets.core.ingest.sample import SampleServer, write_demo_shard

    root = Path(args.data) / "demo"
    with SampleServer(root / "site", port=args.port) as server:
        shard = write_demo_shard(root, server.base_url, n_generated=300)
        print(f"sample shard {shard} served from {server.base_url}")
        summary = run_pipeline([str(shard)], args.lake, args.config, None)
        sample_port = server.httpd.server_address[1]
    print("\nper-stage summary:")
    summary.print()
    _print_tables(args.lake)
    print(demo_hint(args.lake, args.data, sample_port, args.ui_port))
    return 0 if summary.ok else 1


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


def add_commands(sub, env_lake: str, env_config: str | None) -> None:
    run = sub.add_parser(
        "run", help="register shard files and materialize the selected assets, through Dagster",
        description="Check and register the shard files, then materialize per shard the selected assets that are "
        "not already published and up to date, then the lake-wide ones (curation, kNN indexes, summary). The runs "
        "are Dagster runs, recorded in the instance the UI reads. Ctrl-C stops within seconds; the same command "
        "resumes.",
    )
    run.add_argument("inputs", nargs="+", help="shard files or folders (.parquet/.csv/.tsv/.jsonl[.gz]; s3:// too)")
    add_lake(run, env_lake)
    run.add_argument("--select", help="comma-separated asset keys or lake paths, or prefixes of either, e.g. raw_urls,images,embeddings (default: all)")
    add_config(run, env_config)
    run.add_argument("--retry-failures", action="store_true", help="images: re-fetch only the retryable failures")
    run.add_argument("--force", action="store_true", help="redo the selected stages even when published and up to date")
    run.set_defaults(fn=cmd_run)

    backfill = sub.add_parser(
        "backfill", help="register shard files and queue them as one backfill for the daemon",
        description="Register the shard files and queue one Dagster backfill of their shard stages; dagster-daemon "
        "runs it (follow it in the UI, Overview > Backfills). Lake-wide assets follow by their own automation.",
    )
    backfill.add_argument("inputs", nargs="+", help="shard files or folders (as for run)")
    add_lake(backfill, env_lake, note=" (the one the code location uses)")
    backfill.add_argument("--select", help="comma-separated shard asset keys or lake paths, or prefixes of either (default: all)")
    add_config(backfill, env_config, note=" (to check the selection)")
    backfill.set_defaults(fn=cmd_backfill)

    demo = sub.add_parser(
        "demo", help="build the bundled sample, serve it on 127.0.0.1 and run every stage",
        description="The offline demo: writes a LAION-style sample (photos, generated images, broken links) under "
        "DATA/demo, serves it on 127.0.0.1:PORT, runs every stage on it with the demo config (tiny random CLIP "
        "models: their scores are MEANINGLESS), then prints the tables and the commands to look at the result.",
    )
    add_lake(demo, env_lake)
    demo.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="pipeline config YAML (default: %(default)s)")
    demo.add_argument("--data", default=DATA, help="folder for the sample site and its input shard (default: %(default)s)")
    demo.add_argument(
        "--port", type=int, default=DEMO_PORT,
        help="sample server port; the shard's URLs name it, so sample-server must serve on it later (default: %(default)s)",
    )
    demo.add_argument(
        "--ui-port", type=int, default=UI_PORT, help="the UI's port, for the closing hint: as in `make ui PORT=...` (default: %(default)s)",
    )
    demo.set_defaults(fn=cmd_demo)

    sample = sub.add_parser(
        "sample-server", help="serve the demo sample on 127.0.0.1 (to materialize the demo shard again from the UI)",
        description="Serve DATA/demo/site on 127.0.0.1:PORT until Ctrl-C. The demo shard's URLs name the port the "
        "demo served on: give the same one (the demo's closing hint prints the command).",
    )
    sample.add_argument("--data", default=DATA, help="the demo's --data folder (default: %(default)s)")
    sample.add_argument("--port", type=int, default=DEMO_PORT, help="port to serve on: the demo's --port (default: %(default)s)")
    sample.set_defaults(fn=cmd_sample_server)
