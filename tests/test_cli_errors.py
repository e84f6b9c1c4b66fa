"""The command line's one error convention: a verb raises UsageError for a mistake the user
can fix, `main` prints it as one line and exits 2; a bug keeps its traceback. Both entry
points (`python -m stabilitylab`, the console script's `stabilitylab.cli:main`) work."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from stabilitylab.cli import UsageError, build_parser, main
from stabilitylab.config import ConfigError
from stabilitylab.store import StoreError

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "stabilitylab" / "cli"


def test_python_dash_m_runs_the_cli_and_a_mistake_is_one_line_with_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stabilitylab", "runs", str(tmp_path / "none")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("stabilitylab runs: ")
    assert "no such lab directory" in result.stderr


def test_the_console_script_entry_point_is_main():
    text = (REPO / "pyproject.toml").read_text()
    assert 'stabilitylab = "stabilitylab.cli:main"' in text
    from importlib import import_module
    assert import_module("stabilitylab.cli").main is main


def test_no_handler_prints_its_own_error_or_returns_2():
    """Exit 2 has one path (main); a handler raises UsageError instead of print + return 2."""
    found = []
    for path in sorted(CLI.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef) or (path.name, fn.name) == ("__init__.py", "main"):
                continue
            found += [f"{path.name}:{node.lineno}" for node in ast.walk(fn) if isinstance(node, ast.Return)
                      and isinstance(node.value, ast.Constant) and node.value.value == 2]
    assert not found, f"return 2 outside main's error path: {found}"


def test_every_verb_has_a_handler():
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert {"train", "sweep", "eval", "data", "runs", "export", "compact", "trace", "fit", "analyze", "check",
            "events", "exit", "dashboard"} == set(verbs)
    for name, sub in verbs.items():
        if name != "data":
            assert callable(sub.get_default("handler")), name


@pytest.mark.parametrize("err", [ConfigError("train.lr", "is NaN", "Set train.lr to a number > 0", "x.toml"),
                                 StoreError("runs/a", "no run here", "pass a run directory")])
def test_a_rooms_error_keeps_its_message_as_a_usage_error(err):
    assert str(UsageError.of(err)) == str(err)


def test_a_bug_in_a_verb_is_not_turned_into_a_usage_error(monkeypatch):
    import stabilitylab.cli.inspect as inspect

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(inspect, "runs", broken)
    with pytest.raises(KeyError):
        main(["runs", "."])


@pytest.mark.parametrize("args, flag", [
    (["trace", "--depth", "0"], "--depth: must be ≥ 1, got 0"),
    (["eval", "some-run", "--depths", "4", "-1"], "--depths: must be ≥ 1, got -1"),
    (["analyze", "some-run", "--batch", "0"], "--batch: must be ≥ 1, got 0"),
    (["analyze", "some-run", "--seq-len", "0"], "--seq-len: must be ≥ 1, got 0"),
    (["fit", "x.csv", "--law", "training", "--bootstrap", "-1"], "--bootstrap: must be ≥ 0, got -1"),
    (["sweep", "x.toml", "--jobs", "0"], "--jobs: must be ≥ 1, got 0"),
    (["events", "some-run", "--horizon", "nan"], "horizon: is NaN"),
    (["events", "some-run", "--patience", "0"], "patience: must be ≥ 1, got 0"),
])
def test_a_count_flag_out_of_range_is_one_line_before_any_work(tmp_path, capsys, args, flag):
    """Checked before the target is even looked for (some-run does not exist)."""
    assert main([*args, *(["--lab", str(tmp_path)] if args[0] in ("eval", "analyze", "sweep") else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"stabilitylab {args[0]}: {flag}" in err


def test_a_missing_csv_is_one_line(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "none.csv"), "--law", "training"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"none.csv: cannot read it (No such file or directory)" in err
