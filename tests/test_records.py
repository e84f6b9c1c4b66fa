"""Names a run records are written once, in stabilitylab/records.py, and imported everywhere
else; and the light modules (config, records, the store, scaling, the dashboard's reads) stay
free of torch."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stabilitylab import records

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "stabilitylab"
# words that name other things too (a corpus's token count, the cosine schedule, an optimiser
# group's "lr", the lyapunov module): checked by review, not by this test
COMMON_WORDS = {"tokens", "cosine", "lr", "lyapunov"}
NAMES = {v for k, v in vars(records).items() if k.isupper() and isinstance(v, str)} - COMMON_WORDS - {
    records.GRAD_NORM_ROLE}
OTHER_MEANINGS = {  # (file, text) where the same letters mean something else
    ("analysis/events.py", "rho"),  # SIGNALS: the ρ(Ā) warning signal
    ("analysis/events.py", "divergence"), ("config/experiment.py", "divergence"),
    ("monitor.py", "divergence"),  # the run config's [divergence] table, which `events` reads
    ("analysis/__init__.py", "divergence"),  # the module analysis/divergence.py
    ("train/trainer.py", "rho"),  # a key of the resume state (kept: old checkpoints resume)
    ("train/checkpoint.py", "rho"),  # the same key, among those a resume state must hold
}


def string_literals(path: Path):
    """(line, text) of every string constant of a module that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_every_recorded_name_is_a_literal_only_in_records_py():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "records.py":
            continue
        found += [f"{rel}:{line}: {text!r}" for line, text in string_literals(path)
                  if text in NAMES and (rel, text) not in OTHER_MEANINGS]
    assert not found, "import these names from stabilitylab.records:\n" + "\n".join(found)


def test_records_lists_each_name_once():
    values = [v for k, v in vars(records).items() if k.isupper() and isinstance(v, str)]
    assert len(values) == len(set(values))
    assert set(records.TRACE_FIELDS) | set(records.SPECTRUM_FIELDS) <= set(values)
    assert records.SPIKE == "spike"  # what the trainer writes: not "loss_spike"


LIGHT = ["stabilitylab", "stabilitylab.config", "stabilitylab.records", "stabilitylab.store",
         "stabilitylab.experiment", "stabilitylab.analysis.scaling", "stabilitylab.analysis.sweep",
         "stabilitylab.analysis.events"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_load_no_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False", f"import {module} loads torch"


def test_the_dashboards_modules_load_no_torch():
    code = ("import sys; sys.path.insert(0, 'apps')\n"
            "from dashkit import charts, fits, graph, lab, names, series, session, widgets\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("package", ["stabilitylab", "stabilitylab.analysis"])
def test_lazy_namespaces_export_what_their_modules_define(package):
    """The two PEP 562 namespaces (they keep torch out of `import stabilitylab.store` and
    `stabilitylab.analysis.scaling`) name only names their modules export."""
    import importlib

    pkg = importlib.import_module(package)
    for name in pkg.__all__:
        assert getattr(pkg, name) is not None, f"{package}.{name}"
    code = f"import json, {package} as p; print(json.dumps(sorted(p.__all__)))"
    listed = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                                       check=True).stdout)
    assert listed == sorted(pkg.__all__)
