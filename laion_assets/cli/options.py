"""Options several commands share, with one help text each: where the lake is and which
pipeline config to read, and the environment variables that set their defaults."""

from __future__ import annotations

import os

LAKE_ENV, CONFIG_ENV = "LAION_ASSETS_LAKE", "LAION_ASSETS_CONFIG"


def default_lake() -> str:
    """The default --lake."""
    return os.environ.get(LAKE_ENV, "data/lake")


def add_lake(parser, default: str, note: str = "") -> None:
    parser.add_argument(
        "--lake", default=default,
        help=f"lake root: a folder or s3://bucket/prefix{note}; ${LAKE_ENV} sets the default (default: %(default)s)",
    )


def add_config(parser, default: str | None, note: str = "") -> None:
    shown = "%(default)s" if default else "the built-in config"
    parser.add_argument(
        "--config", default=default,
        help=f"pipeline config YAML{note}; ${CONFIG_ENV} sets the default (default: {shown})",
    )
