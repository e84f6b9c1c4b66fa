"""The training verbs on experiments/tiny.toml: train, sweep, eval, with runs and export;
bad input is one clear line (exit 2) and leaves the runs already in the lab untouched."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stabilitylab.cli import main
from stabilitylab.store import open_run

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.toml"


def cli(*args):
    return main([str(a) for a in args])


def fingerprint(lab):
    """Every file under the lab with its content hash: what 'untouched' means."""
    return {p.relative_to(lab).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(lab).rglob("*")) if p.is_file() and p.name != "writer.lock"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, corpus_cache):
    """A lab holding one finished tiny run, trained through the CLI."""
    lab = tmp_path_factory.mktemp("lab")
    assert cli("train", TINY, "--set", f"data.cache_dir={corpus_cache}", "--lab", lab, "--no-progress") == 0
    return lab


def test_train_reports_the_finished_run(lab, capsys):
    summary = open_run("tiny", lab).summary()
    assert (summary["status"], summary["last_step"], summary["config.model.injection"]) == ("finished", 6, "parcae")
    assert summary["max_rho"] < 1 and summary["sweep_cell"] is None


def test_eval_reproduces_the_trainers_numbers_and_records_new_depths(lab, capsys):
    run = open_run("tiny", lab)
    before = run.evals()
    assert cli("eval", "tiny", "--lab", lab, "--depths", "1", "3", "5") == 0
    out = capsys.readouterr().out
    assert "step 6" in out and out.count("\n") == 5
    after = open_run("tiny", lab).evals()
    at_6 = after[after["step"] == 6].set_index("depth")["value"]
    trained = before[before["step"] == 6].set_index("depth")["value"]
    assert at_6[1] == trained[1] and at_6[3] == trained[3]  # the same numbers, bit for bit
    assert 5 in at_6.index and 5 not in trained.index


def test_runs_and_export_read_a_trained_run(lab, tmp_path, capsys):
    assert cli("runs", lab) == 0
    assert "tiny" in capsys.readouterr().out
    assert cli("export", "tiny", "--lab", lab, "--out", tmp_path / "out") == 0
    scalars = pd.read_csv(tmp_path / "out" / "scalars.csv", keep_default_na=False, na_values=["NaN"])
    assert {"loss", "h_T_norm", "grad_norm/core", "flops"} <= set(scalars["name"])
    assert (tmp_path / "out" / "eigenvalues.csv").is_file()


def sweep_file(tmp_path, cache):
    text = TINY.read_text().replace('name = "tiny"', 'name = "grid"').replace("steps = 6", "steps = 2")
    path = tmp_path / "grid.toml"
    path.write_text(text + f'\n[sweep.grid]\n"model.injection" = ["parcae", "free-diagonal"]\n')
    return path, ["--set", f"data.cache_dir={cache}"]


def test_a_sweep_trains_each_cell_once_then_skips_finished_and_resumes_interrupted(tmp_path, corpus_cache,
                                                                                   capsys):
    path, sets = sweep_file(tmp_path, corpus_cache)
    lab = tmp_path / "lab"
    assert cli("sweep", path, *sets, "--lab", lab) == 0
    cells = ["grid/injection=parcae", "grid/injection=free-diagonal"]
    assert [open_run(c, lab).summary()["status"] for c in cells] == ["finished", "finished"]
    assert open_run(cells[1], lab).summary()["sweep_cell"] == "injection=free-diagonal"
    capsys.readouterr()

    before = fingerprint(lab / cells[0])
    interrupted = lab / cells[1] / "run.db"
    shutil.copy(interrupted, tmp_path / "backup.db")
    from stabilitylab.store import RunWriter
    with pytest.raises(RuntimeError), RunWriter.resume(lab / cells[1], 1):
        raise RuntimeError("killed")  # the cell now reads as failed after step 1
    assert cli("sweep", path, *sets, "--lab", lab) == 0
    out = capsys.readouterr().out
    assert f"{cells[0]}: skipped (finished)" in out and f"{cells[1]}: resumed, finished" in out
    assert fingerprint(lab / cells[0]) == before
    assert open_run(cells[1], lab).summary()["last_step"] == 2


def test_a_sweep_runs_cells_in_parallel_processes(tmp_path, corpus_cache, capsys):
    path, sets = sweep_file(tmp_path, corpus_cache)
    assert cli("sweep", path, *sets, "--lab", tmp_path / "lab", "--jobs", "2") == 0
    assert "2 cells: 2 finished" in capsys.readouterr().out
    for cell in ("grid/injection=parcae", "grid/injection=free-diagonal"):
        assert open_run(cell, tmp_path / "lab").summary()["status"] == "finished"


@pytest.mark.parametrize("make_args, message", [
    (lambda d, c: [d / "bad.toml"], "bad.toml: syntax: not valid TOML"),
    (lambda d, c: [TINY, "--set", "train.lrr=1"], "--set: train.lrr: unknown field"),
    (lambda d, c: [TINY, "--set", "data.source=/no/such/folder"],
     "--set: data.source: /no/such/folder does not exist"),
    (lambda d, c: [TINY, "--set", f"data.cache_dir={c}", "--set", "model.vocab_size=64"],
     "--set: model.vocab_size: 64 is smaller than the bytes tokenizer's 256 tokens"),
    (lambda d, c: [TINY, "--set", f"data.cache_dir={c}"], "a run with this id already exists"),
    (lambda d, c: [TINY, "--set", f"data.cache_dir={c}", "--set", "train.lr=1e-2", "--resume", "--run-id",
                   "unfinished"], "train.lr: differs from the config the run was trained with"),
])
def test_bad_input_is_one_clear_line_and_leaves_the_lab_untouched(lab, tmp_path, corpus_cache, capsys,
                                                                   make_args, message):
    (tmp_path / "bad.toml").write_text("[train\nsteps = 3\n")
    unfinished = lab / "unfinished"
    if not unfinished.exists():  # a killed run of tiny.toml: --resume must check the config first
        shutil.copytree(lab / "tiny", unfinished)
        from stabilitylab.store import RunWriter
        with pytest.raises(RuntimeError), RunWriter.resume(unfinished, 3):
            raise RuntimeError("killed")
    before = fingerprint(lab)
    assert cli("train", *make_args(tmp_path, corpus_cache), "--lab", lab, "--no-progress") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert fingerprint(lab) == before


def test_a_lab_that_cannot_be_written_is_named_and_nothing_is_created(tmp_path, corpus_cache, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli("train", TINY, "--set", f"data.cache_dir={corpus_cache}", "--lab", blocker / "lab",
               "--no-progress") == 2
    assert "cannot create run 'tiny' here" in capsys.readouterr().err
    assert blocker.read_text() == "not a directory"


READ_ONLY = """
import sys
from stabilitylab.cli import main
common = ["--set", f"data.cache_dir={sys.argv[2]}", "--lab", sys.argv[3], "--no-progress"]
codes = [main(["train", sys.argv[1], *common, "--run-id", "new"]),
         main(["train", sys.argv[1], *common, "--run-id", "unfinished", "--resume"])]
sys.exit(0 if codes == [2, 2] else 1)
"""


def test_a_read_only_lab_or_run_is_named_and_its_runs_stay_as_they_were(lab, tmp_path, corpus_cache):
    """chmod binds root only without CAP_DAC_OVERRIDE, hence the subprocess under setpriv."""
    ro = tmp_path / "ro"
    shutil.copytree(lab / "tiny", ro / "tiny")
    shutil.copytree(lab / "tiny", ro / "unfinished")
    from stabilitylab.store import RunWriter
    with pytest.raises(RuntimeError), RunWriter.resume(ro / "unfinished", 3):
        raise RuntimeError("killed")  # a run --resume would continue, were it writable
    before = fingerprint(ro)
    for path in [ro, *ro.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    command = [sys.executable, "-c", READ_ONLY, str(TINY), str(corpus_cache), str(ro)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv (util-linux): chmod cannot bind this test")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    finally:
        for path in [ro, *ro.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "cannot create run 'new' here" in lines[0] and "unfinished: cannot write to this run" in lines[1]
    assert fingerprint(ro) == before
