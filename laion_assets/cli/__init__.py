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
    laion-assets serve             # the search page and clip-retrieval's API on 127.0.0.1
    laion-assets train-args --subset NAME         # an open_clip command for a webdataset export
    laion-assets --version
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import warnings

from laion_assets.cli import exports, lake, pipeline
from laion_assets.cli.options import CONFIG_ENV, LAKE_ENV, default_lake


def version() -> str:
    """The installed distribution's version; the package's own where it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("laion-assets")
    except PackageNotFoundError:
        from laion_assets import __version__

        return __version__


class VersionAction(argparse.Action):
    """`--version`, looked up only when asked: importlib.metadata scans site-packages (~50 ms
    that every command would pay with argparse's own version action)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laion-assets", description=__doc__.split("\n\n")[0],
        epilog=f"${LAKE_ENV} and ${CONFIG_ENV} set the default --lake and --config; DAGSTER_HOME the "
        "Dagster instance (else the dagster.yaml of the current folder or the repository). "
        "`laion-assets COMMAND --help` describes a command.",
    )
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for module in (pipeline, lake, exports):
        module.add_commands(sub, default_lake(), os.environ.get(CONFIG_ENV))
    return parser


def main(argv: list[str] | None = None) -> int:
    """SIGTERM stops like Ctrl-C from here on, imports (~2 s) included: exit 130, not 143."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        code = _main(argv)
    except BaseException as e:
        if not _interrupted(e):
            raise
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == 130 and argv is None:
        # Run as a program: an interrupt that landed in code an extension module ran while being
        # imported leaves CPython's "unhandled KeyboardInterrupt" mark set, and the process would
        # end by SIGINT (-2) after all, not with 130 (seen about once in eight early SIGTERMs).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    if argv is None:
        # Run as a program, the heap is thrown away whole next: without this the interpreter's
        # last collection walks every object Dagster, GX and torch made (~2.4 s of a run's exit).
        gc.freeze()
    return code


def _interrupted(exc: BaseException | None) -> bool:
    """A Ctrl-C or SIGTERM, also where Python wrapped it: the KeyboardInterrupt raised inside a
    `__set_name__` while Dagster's classes are being defined surfaces as a RuntimeError (3.11)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    from laion_assets.core.lake.errors import LaionAssetsError, explain

    try:
        return args.fn(args)
    except LaionAssetsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        err = explain(e)  # disk full, permissions, missing files, object store: one line
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2

