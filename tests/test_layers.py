"""The architecture test: every import between the package's rooms follows an allowed arrow.

The rooms and their arrows are the README's Architecture section, written here as a table:
a room may import itself and the rooms it lists, nothing else of stabilitylab. Imports are
read with ast (module level and inside functions alike), so a lazy import inside a function
is an arrow too. A new room fails the test until it gets a row: its place is a decision.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOTTOM = {"records", "config"}  # torch-free contract layer: names and configs
ALLOWED: dict[str, set[str]] = {
    "records": set(),  # imports nothing at all
    "lazy": set(),
    "config": set(),
    "store": {"records"},  # the run store knows no model, no torch
    "experiment": BOTTOM,
    "shards": BOTTOM,  # pre-tokenized token files, read in place; data opens them
    "data": BOTTOM | {"shards"},
    "model": BOTTOM,  # never the store, formats or train
    "formats": BOTTOM | {"model"},
    "analysis": BOTTOM | {"lazy", "model", "formats", "store", "data"},
    "train": BOTTOM | {"model", "formats", "analysis", "data", "experiment", "store", "monitor"},  # via LoopMonitor
    "targets": BOTTOM | {"model", "formats", "analysis", "data", "experiment", "store", "train"},
    "analyze": BOTTOM | {"model", "formats", "analysis", "store", "targets"},
    "monitor": BOTTOM | {"model", "formats", "analysis", "store"},
    "testing": BOTTOM | {"model", "formats", "analysis", "store", "targets"},
    "cli": BOTTOM | {"lazy", "model", "formats", "analysis", "data", "experiment", "store", "train", "targets",
                     "analyze", "monitor"},
    "__init__": {"lazy"},
    "__main__": {"cli"},
}
# single files allowed one arrow their room may not take, each with its end date
EXCEPTIONS = {("stabilitylab/model/imports.py", "formats")}  # the deprecated re-export of parcae_lm: next release
APPS_ALLOWED = BOTTOM | {"store", "analysis"}  # the dashboard reads the lab through the store


def room_of(module: str) -> str:
    """'stabilitylab.train.trainer' → 'train'; 'stabilitylab' → '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of `package` in a file, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..a import b
                anchor = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{a.name}" if a.name != "*" else base) for a in node.names]
    return [(line, m) for line, m in found if m == package or m.startswith(package + ".")]


def violations(root: Path, allowed: dict[str, set[str]], exceptions: frozenset = frozenset()) -> list[str]:
    """Every import in the package at `root` that its room's row does not allow (but for the
    (file, room) pairs in `exceptions`)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        room = room_of(module)
        if room not in allowed:
            out.append(f"{path.relative_to(root.parent)}: room {room!r} has no row in the architecture table")
            continue
        for line, target in imported_modules(path, module, root.name):
            to = room_of(target)
            # `from stabilitylab import records` names a room as an attribute of the package
            if (path.relative_to(root.parent).as_posix(), to) in exceptions:
                continue
            if to != room and to not in allowed[room] and not (target == root.name and room == "__init__"):
                out.append(f"{path.relative_to(root.parent)}:{line}: {room} → {to} ({target})")
    return out


def app_violations(apps: Path, package: str, allowed: set[str]) -> list[str]:
    out = []
    for path in sorted(apps.rglob("*.py")):
        for line, target in imported_modules(path, path.stem, package):
            if target == package or room_of(target) not in allowed:
                out.append(f"{path.relative_to(apps.parent)}:{line}: apps → {target}")
    return out


def test_every_import_in_the_package_follows_an_allowed_arrow():
    found = violations(REPO / "stabilitylab", ALLOWED, EXCEPTIONS)
    assert not found, "\n".join(found)


def test_the_dashboard_imports_only_the_store_analysis_and_the_contract_layer():
    found = app_violations(REPO / "apps", "stabilitylab", APPS_ALLOWED)
    assert not found, "\n".join(found)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


TREE = {
    "pkg/__init__.py": "",
    "pkg/records.py": "LOSS = 'loss'\n",
    "pkg/model/__init__.py": "from pkg.records import LOSS\n",
    "pkg/model/looped.py": "from . import blocks\n",
    "pkg/model/blocks.py": "",
    "pkg/train/trainer.py": "from pkg.model import looped\n",
}
RULES = {"__init__": set(), "records": set(), "model": {"records"}, "train": {"model", "records"}}


def test_the_checker_passes_a_tree_whose_arrows_all_point_down(tmp_path):
    assert violations(write_tree(tmp_path, TREE), RULES) == []


@pytest.mark.parametrize("upward", [
    "from pkg.train import trainer\n",  # model → train
    "import pkg.train.trainer\n",
    "def f():\n    from pkg.train.trainer import x\n",  # a lazy import is an arrow too
    "from ..train import trainer\n",  # relative
])
def test_the_checker_fails_on_an_upward_import(tmp_path, upward):
    root = write_tree(tmp_path, {**TREE, "pkg/model/looped.py": upward})
    found = violations(root, RULES)
    assert len(found) == 1 and "model → train" in found[0] and "looped.py" in found[0]


def test_the_checker_fails_on_a_room_without_a_row(tmp_path):
    root = write_tree(tmp_path, {**TREE, "pkg/newroom.py": "from pkg import records\n"})
    assert violations(root, RULES) == ["pkg/newroom.py: room 'newroom' has no row in the architecture table"]


def test_the_checker_fails_on_a_dashboard_import_of_the_trainer(tmp_path):
    apps = tmp_path / "apps"
    write_tree(tmp_path, {"apps/page.py": "from pkg.store import x\nfrom pkg.train import trainer\n"})
    assert app_violations(apps, "pkg", {"store"}) == ["apps/page.py:2: apps → pkg.train.trainer"]
