"""The README and the guide in docs/ say what the code does: the README fits on a few screens and
keeps its two commands, every relative link reaches a file, every `laion-assets` command and
option written in them exists in the CLI, and every config key they write exists in
PipelineConfig. Reads files and the parsers only: no servers, no pipeline."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from laion_assets.cli import build_parser
from laion_assets.core.config import MOVED, PipelineConfig

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```", re.M | re.S)


def text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def code(page: Path) -> list[str]:
    """Lines of code on a page: fenced blocks, and each `inline span`."""
    body = text(page)
    lines = [line for _, block in FENCE.findall(body) for line in block.splitlines()]
    return lines + re.findall(r"`([^`\n]+)`", FENCE.sub("", body))


def test_readme_fits_and_keeps_the_two_commands():
    lines = text(README).splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines: move detail into docs/"
    commands = [line.split("#")[0].strip() for line in lines]
    assert "make demo" in commands and "make test" in commands  # CI runs the README's test command


def test_every_docs_page_says_what_it_covers_and_the_index_lists_them():
    index = text(REPO / "docs" / "README.md")
    for page in DOCS:
        lines = text(page).splitlines()
        assert lines[0].startswith("# ") and lines[1] == "" and lines[2].strip(), f"{page.name}: title, then one line on what it covers"
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_reach_files(page):
    body = FENCE.sub("", text(page))
    for target in re.findall(r"\]\(([^)\s]+)\)", body):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        assert "#" not in target, f"{page.name}: link {target} has an anchor (headings move; link the page)"
        assert (page.parent / target).exists(), f"{page.name}: link {target} reaches no file"


def cli_commands() -> tuple[set[str], dict[str, set[str]]]:
    """The top-level options and each subcommand's options, from the real parser."""
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}
    return {o for a in parser._actions for o in a.option_strings}, options


def cli_problems(lines: list[str]) -> tuple[list[str], int]:
    """What in these lines of code names a command or option the CLI lacks; how many commands."""
    top, commands = cli_commands()
    problems, seen = [], 0
    for line in lines:
        for m in re.finditer(r"(?:^|[\s/(])laion-assets\s+(\S+)(.*)", line):
            word, rest = m.group(1), re.split(r"\s#|\||;|&&|\)", m.group(2))[0]
            if word.startswith("-"):
                problems += [] if word in top else [f"laion-assets {word}"]
                continue
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                continue  # a placeholder: COMMAND, <command>
            if word not in commands:
                problems.append(f"laion-assets {word}")
                continue
            problems += [f"laion-assets {word} {o}" for o in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest) if o not in commands[word]]
            seen += 1
    return problems, seen


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_cli_commands_and_options_exist(page):
    problems, seen = cli_problems(code(page))
    assert not problems, f"{page.name}: no such command or option: {problems}"
    if page.name in ("CLI.md", "EXPORTS.md"):
        assert seen >= 5  # the check reads these pages' commands at all


def field_model(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The config section a field holds (through Optional, tuples and dicts), and whether its
    keys are names (`spaces.<name>`, `heads.<column>`) rather than fields."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        found = [field_model(a) for a in args if a is not type(None)]
        return next((f for f in found if f[0] is not None), (None, False))
    if origin is dict:
        return field_model(args[1])[0], True
    if origin in (tuple, list):
        return field_model(args[0])
    return None, False


def key_exists(dotted: str) -> bool:
    """`download.concurrency`, `embeddings.spaces.<name>.model`, `curation.semantic[].subset`."""
    if dotted in MOVED:
        return True  # documented as moved; the loader names the new place
    model, parts = PipelineConfig, dotted.replace("[]", "").split(".")
    i = 0
    while i < len(parts):
        if model is None or parts[i] not in model.model_fields:
            return False
        model, keyed = field_model(model.model_fields[parts[i]].annotation)
        i += 2 if keyed else 1  # a named entry: any name (or <placeholder>) is fine
    return True


def yaml_keys_exist(model: type[BaseModel], data: dict, where: str) -> list[str]:
    missing = []
    for key, value in data.items():
        if key not in model.model_fields:
            missing.append(f"{where}{key}")
            continue
        inner, keyed = field_model(model.model_fields[key].annotation)
        if inner is None:
            continue
        entries = value.values() if keyed and isinstance(value, dict) else value if isinstance(value, list) else [value]
        for entry in entries:
            if isinstance(entry, dict):
                missing += yaml_keys_exist(inner, entry, f"{where}{key}.")
    return missing


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_config_examples_use_real_keys(page):
    for lang, block in FENCE.findall(text(page)):
        if lang == "yaml":
            assert not yaml_keys_exist(PipelineConfig, yaml.safe_load(block), ""), f"{page.name}: unknown config keys"


def test_configuration_page_names_real_keys():
    page = text(REPO / "docs" / "CONFIGURATION.md")
    sections = set(PipelineConfig.model_fields)
    dotted = {
        token for token in re.findall(r"`([a-z_]+(?:\.[a-z0-9_<>\[\]]+)+)`", page) if token.split(".")[0] in sections
    }
    assert len(dotted) >= 10  # the page names keys this way at all
    assert not sorted(k for k in dotted if not key_exists(k))
    defaults = next(block for lang, block in FENCE.findall(page) if lang == "yaml")
    assert set(yaml.safe_load(defaults)) == sections  # every section is documented


def test_the_checks_can_fail():
    assert not key_exists("download.concurency") and not key_exists("knn.space.name")
    assert key_exists("embeddings.spaces.<name>.batch_size") and key_exists("curation.semantic[].threshold")
    assert yaml_keys_exist(PipelineConfig, {"subsets": [{"name": "a", "min_simliarity": 0.3}]}, "") == ["subsets.min_simliarity"]
    assert yaml_keys_exist(PipelineConfig, {"scores": {"heads": {"aesthetic": {"pth": "x"}}}}, "") == ["scores.heads.pth"]
    assert cli_problems(["laion-assets run x --selct raw_urls", "laion-assets serch a", ".venv/bin/laion-assets serve --port 1"]) == (
        ["laion-assets run --selct", "laion-assets serch"], 2,
    )
