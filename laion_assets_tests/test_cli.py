"""The command line a newcomer reads first: every command says what it does, every option what
it sets and its default, and `--version` answers."""

from __future__ import annotations

import argparse
import shlex
from importlib.metadata import version

import pytest

import laion_assets
from laion_assets.cli import build_parser, main
from laion_assets.cli.pipeline import demo_hint
from laion_assets.core.exports.knn import sync_index
from laion_assets_tests.synthetic import copy_lake


def test_every_command_and_option_is_described_with_its_default(capsys):
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"run", "demo", "search", "serve", "train-args", "maintain"} <= set(commands.choices)
    one_line = {a.dest: a.help for a in commands._choices_actions}
    undescribed, no_default = [], []
    for name, parser in commands.choices.items():
        assert parser.description and one_line[name] and "\n" not in one_line[name], name
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                undescribed.append(label)
            elif action.default is not None and action.default is not False and "%(default)s" not in action.help:
                no_default.append(label)
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        assert parser.description.split()[0] in capsys.readouterr().out
    assert not undescribed, f"options without help: {undescribed}"
    assert not no_default, f"options that hide their default: {no_default}"


def test_environment_defaults_are_named_and_shown(monkeypatch, capsys):
    monkeypatch.setenv("LAION_ASSETS_LAKE", "s3://bucket/lake")
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "$LAION_ASSETS_LAKE sets the default (default: s3://bucket/lake)" in out
    assert "$LAION_ASSETS_CONFIG sets the default (default: the built-in config)" in out


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"laion-assets {version('laion-assets')}"
    assert version("laion-assets") == laion_assets.__version__, "pyproject.toml and laion_assets.__version__ disagree"


def test_the_demo_hint_gives_the_ports_it_used_and_a_search_that_works(planted, tmp_path, capsys):
    sync_index(copy_lake(planted, tmp_path / "lake"), planted["config"], "similar")
    default = demo_hint("data/lake", "data", 8765, 3000)
    assert "  make ui PORT=3000   # then open http://127.0.0.1:3000\n" in default
    assert default.splitlines()[-3:] == [
        "  .venv/bin/laion-assets sample-server --port 8765",
        "Search the demo's kNN indexes (tiny random models: the neighbours mean nothing):",
        '  .venv/bin/laion-assets search "a red car"',
    ]

    hint = demo_hint(str(tmp_path / "lake"), str(tmp_path / "data"), 18765, 3123)
    assert f"LAION_ASSETS_LAKE={tmp_path}/lake make ui PORT=3123   # then open http://127.0.0.1:3123" in hint
    assert f"sample-server --port 18765 --data {tmp_path}/data" in hint
    search = shlex.split(hint.splitlines()[-1])
    assert search[:2] == [".venv/bin/laion-assets", "search"]
    assert main(search[1:]) == 0  # no --config: the index names its model
    assert capsys.readouterr().out.splitlines()[1].split()[2] == str(planted["text_uid"])
