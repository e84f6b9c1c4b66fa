"""Bad input to `stabilitylab train` is one line on stderr, exit 2, before anything is built:
no corpus in the cache, no lab directory, nothing outside the lab (issue 12)."""

from pathlib import Path

import pytest

from stabilitylab.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.toml"


def refused(tmp_path, capsys, *args) -> str:
    """Run `train` with a fresh cache and lab; assert exit 2, one line, nothing built; the line."""
    cache, lab = tmp_path / "cache", tmp_path / "lab"
    code = main(["train", str(TINY), "--set", f"data.cache_dir={cache}", "--lab", str(lab), "--no-progress",
                 *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert not cache.exists() and not lab.exists()  # neither the corpus nor the run was started
    return err


@pytest.mark.parametrize("value, says", [
    ("inf", "--set: train.lr: is inf"), ("nan", "--set: train.lr: is NaN"), ("-1e-3", "--set: train.lr: must be > 0"),
    ("1e300", "--set: train.lr: 1e+300 is beyond float32's range"),
    ("1e38", "--set: train.lr: the optimiser's lr / (1 − betas[0]) = 5e+38 overflows float32"),
])
def test_a_non_finite_or_out_of_range_learning_rate_is_refused_by_set(tmp_path, capsys, value, says):
    assert says in refused(tmp_path, capsys, "--set", f"train.lr={value}")


@pytest.mark.parametrize("item, says", [
    ("train.steps=abc", "--set: train.steps: 'abc' has the wrong type. Expected int"),
    ("model.d_model=2.5", "--set: model.d_model: 2.5 has the wrong type"),
    ("probes.batch_size=0", "--set: probes.batch_size: must be > 0"),
])
def test_a_set_value_of_the_wrong_type_or_range_blames_set_not_the_file(tmp_path, capsys, item, says):
    err = refused(tmp_path, capsys, "--set", item)
    assert says in err and "tiny.toml" not in err


def test_a_bad_value_in_the_file_still_blames_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.read_text().replace("lr = 3e-3", "lr = nan"))
    code = main(["train", str(bad), "--set", "train.steps=4", "--lab", str(tmp_path / "lab")])
    assert code == 2 and f"{bad}: train.lr: is NaN" in capsys.readouterr().err


@pytest.mark.parametrize("run_id", ["../outside", "/absolute/run", "a/b/c", "a//b", ".hidden", "a/.."])
def test_a_run_id_that_escapes_the_lab_or_nests_too_deep_is_refused_before_anything_is_built(
        tmp_path, capsys, run_id):
    err = refused(tmp_path, capsys, "--run-id", run_id)
    assert f"stabilitylab train: run_id: must be 'name' or 'group/name' inside the lab, got {run_id!r}" in err
    assert not (tmp_path / "outside").exists() and not Path("/absolute").exists()


def test_sweep_blames_set_too(tmp_path, capsys):
    assert main(["sweep", str(TINY), "--set", "train.steps=abc", "--lab", str(tmp_path / "lab")]) == 2
    err = capsys.readouterr().err
    assert "stabilitylab sweep: --set: train.steps: 'abc' has the wrong type" in err and err.count("\n") == 1
    assert not (tmp_path / "lab").exists()
