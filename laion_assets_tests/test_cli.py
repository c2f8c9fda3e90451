"""The command line a newcomer reads first: every command says what it does, every option what
it sets and its default, and `--version` answers."""

from __future__ import annotations

import argparse
from importlib.metadata import version

import pytest

import laion_assets
from laion_assets.cli import build_parser, main


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
