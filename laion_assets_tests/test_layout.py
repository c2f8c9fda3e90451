"""The code layout a newcomer relies on (docs/ARCHITECTURE.md, "Code map"): `core/` is grouped
by the stage each module serves, in the asset graph's order, and a lower folder never imports a
higher one, so a stage's code can be read without the stages after it. Checked on the source, so
a move that breaks the map fails here, not in a reader's head."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "laion_assets"
CORE = PACKAGE / "core"
# core's folders from the bottom of the asset graph to the top; `stages/` coordinates them all
ORDER = ["lake", "ingest", "images", "embeddings", "scores", "subsets", "curation", "exports", "ui", "stages"]
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules of ours that `path` imports (`from laion_assets.core import x` counts as x)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("laion_assets"):
            subs = {f"{node.module}.{a.name}" for a in node.names}
            known = {m for m in subs if (PACKAGE.parent / m.replace(".", "/")).with_suffix(".py").exists()
                     or (PACKAGE.parent / m.replace(".", "/")).is_dir()}
            found |= known or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("laion_assets")}
    return found


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["laion_assets", "core"] else None


def _is_section(module: str) -> bool:
    """A config section (`core/<folder>/config.py`): a leaf any layer may read."""
    return _folder(module) is not None and module.endswith(".config")


def test_core_folders_follow_the_asset_graph():
    assert sorted(p.name for p in CORE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(ORDER)
    loose = sorted(p.name for p in CORE.glob("*.py") if p.name not in ("__init__.py", "config.py"))
    assert not loose, f"modules outside a stage folder: {loose}"


def test_a_lower_folder_never_imports_a_higher_one():
    wrong = []
    for path in CORE.rglob("*.py"):
        me = _module(path)
        mine = _folder(me)
        for target in _imports(path):
            theirs = _folder(target)
            if _is_section(me):  # sections build on the common base only
                if target != "laion_assets.core.lake.config":
                    wrong.append(f"{me} -> {target} (a config section imports only lake.config)")
            elif theirs and mine and ORDER.index(theirs) > ORDER.index(mine) and not _is_section(target):
                wrong.append(f"{me} -> {target}")
    assert not wrong, "imports against the asset graph's order:\n" + "\n".join(sorted(wrong))


def test_core_knows_nothing_of_dagster():
    def forbidden(name: str) -> bool:
        return name.split(".")[0] == "dagster" or name.startswith("laion_assets.defs")

    offenders = [
        _module(p) for p in CORE.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
        if (isinstance(n, ast.ImportFrom) and forbidden(n.module or ""))
        or (isinstance(n, ast.Import) and any(forbidden(a.name) for a in n.names))
    ]
    assert not offenders, f"core modules importing Dagster or defs: {offenders}"


def test_no_import_cycles():
    """Among imports made when a module loads (lazy imports inside functions are how a module
    breaks a cycle on purpose, and they are few)."""
    graph = {_module(p): _imports(p, top_level_only=True) for p in PACKAGE.rglob("*.py")}
    done, path, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in path:
            cycles.append(" -> ".join(path[path.index(node):] + [node]))
            return
        if node in done:
            return
        path.append(node)
        for nxt in graph.get(node, ()):
            if nxt in graph:
                visit(nxt)
        path.pop()
        done.add(node)

    for module in sorted(graph):
        visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_past_400_lines():
    long = {_module(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concern: {long}"
