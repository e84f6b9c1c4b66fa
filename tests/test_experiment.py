"""Experiment files: TOML in, typed overrides, sweep cells with stable ids, errors that
name the file, the section.field and what is allowed."""

from pathlib import Path

import pytest

from stabilitylab.config import ConfigError
from stabilitylab.experiment import build_experiment, load_experiment, parse_set, read_experiment, sweep_cells

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def write(tmp_path, text, name="exp.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_experiment_loads_and_expands(path):
    cells = sweep_cells(read_experiment(path), path)
    assert cells and all(c.config.name == path.stem for c in cells)


def test_a_preset_is_the_base_and_fields_beside_it_override_it(tmp_path):
    exp = load_experiment(write(tmp_path, '[model]\npreset = "tiny"\nvocab_size = 256\n[data]\nseq_len = 32\n'))
    assert (exp.model.d_model, exp.model.vocab_size, exp.name) == (32, 256, "exp")


def test_set_values_are_typed_like_toml_values():
    assert parse_set("train.lr=1e-2") == ("train.lr", 0.01)
    assert parse_set("train.steps=10") == ("train.steps", 10)
    assert parse_set("model.prelude_norm=false") == ("model.prelude_norm", False)
    assert parse_set('train.eval_depths=[1, "mu"]') == ("train.eval_depths", [1, "mu"])
    assert parse_set("model.injection=concat") == ("model.injection", "concat")  # bare word: a string
    assert parse_set("data.source=/tmp/a b") == ("data.source", "/tmp/a b")


def test_overrides_win_over_the_file_and_are_checked(tmp_path):
    path = write(tmp_path, '[train]\nlr = 1e-3\n')
    assert load_experiment(path, ["train.lr=3e-2"]).train.lr == 0.03
    with pytest.raises(ConfigError, match=r"--set: train\.lrr: unknown field\. Known fields of \[train\]"):
        load_experiment(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"^--set: train\.lr: 'fast' has the wrong type"):  # not the file's fault
        load_experiment(path, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="is not key=value"):
        load_experiment(path, ["train.lr"])


def test_a_toml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, "[train\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"exp\.toml: syntax: not valid TOML.*line 1"):
        load_experiment(path)


def test_a_missing_file_is_named():
    with pytest.raises(ConfigError, match=r"nowhere\.toml does not exist"):
        load_experiment("nowhere.toml")


@pytest.mark.parametrize("text, match", [
    ("[train]\nsteps = 0\n", r"train\.steps: must be > 0"),
    ("[train]\noptimiser = 'adamw'\n", r"train\.optimiser: unknown field\. did you mean 'optimizer'"),
    ("[train]\noptimizer = 'sgd'\n", r"train\.optimizer: 'sgd' is not allowed\. Allowed: adamw, muon"),
    ("[train]\nschedule = 'cosin'\n", r"train\.schedule: .*did you mean 'cosine'"),
    ("[train]\neval_depths = [1, 'twomu']\n", r"train\.eval_depths: 'twomu' is not a depth"),
    ("[divergence]\naction = 'ignore'\n", r"divergence\.action: .*Allowed: stop, record"),
    ("[probes]\ntrace_depth = 'deep'\n", r"probes\.trace_depth: 'deep' is not a depth"),
    ("[model]\ninjection = 'concat2'\n", r"model\.injection: .*Allowed: add, concat, parcae"),
    ("[model]\npreset = 'huge'\n", r"model\.preset: 'huge' is not allowed"),
    ("[data]\nseq_len = 512\n", r"data\.seq_len: 512 exceeds model\.block_size = 256"),
    ("[optim]\nlr = 1\n", r"optim: unknown section\. Allowed: name, model, data, train, probes, divergence, sweep"),
    ("[sweep.grid]\n'model.injektion' = ['add']\n", r"model\.injektion: unknown field"),
    ("[sweep.grid]\n'train.lr' = 0.1\n", r"sweep\.grid\.train\.lr: must be a non-empty list"),
    ("name = 'a/b'\n", r"name: 'a/b' cannot name a run directory"),
])
def test_config_errors_name_the_file_the_field_and_the_fix(tmp_path, text, match):
    with pytest.raises(ConfigError, match=r"exp\.toml: " + match):
        load_experiment(write(tmp_path, text))


SWEEP = """
name = "grid"
[sweep]
seeds = [0, 1]
[sweep.grid]
"model.injection" = ["concat", "parcae"]
train.lr = [0.01, 0.003]
"""


def test_a_sweep_is_the_grid_product_times_the_seeds_with_stable_ids(tmp_path):
    path = write(tmp_path, SWEEP)
    cells = sweep_cells(read_experiment(path), path)
    assert [c.id for c in cells[:4]] == ["injection=concat,lr=0.01,seed=0", "injection=concat,lr=0.003,seed=0",
                                         "injection=parcae,lr=0.01,seed=0", "injection=parcae,lr=0.003,seed=0"]
    assert len(cells) == 8 and cells[-1].id == "injection=parcae,lr=0.003,seed=1"
    last = cells[-1].config
    assert (last.model.injection, last.train.lr, last.train.seed) == ("parcae", 0.003, 1)
    assert not last.sweep.grid and not last.sweep.seeds  # a cell is one run
    assert [c.id for c in sweep_cells(read_experiment(path), path)] == [c.id for c in cells]


def test_keys_that_share_a_last_part_are_spelt_out(tmp_path):
    path = write(tmp_path, "[sweep.grid]\n'train.batch_size' = [4]\n'probes.batch_size' = [2]\n")
    (cell,) = sweep_cells(read_experiment(path), path)
    assert cell.id == "train.batch_size=4,probes.batch_size=2"


def test_an_experiment_without_a_sweep_is_one_cell(tmp_path):
    path = write(tmp_path, "")
    (cell,) = sweep_cells(read_experiment(path), path)
    assert cell.id == "" and cell.values == {}


def test_a_config_survives_its_json_round_trip():
    exp = load_experiment(EXPERIMENTS / "tiny.toml")
    assert build_experiment(exp.to_dict()).to_dict() == exp.to_dict()


def test_a_flop_budget_sets_the_steps_so_every_depth_of_a_grid_spends_the_same_flops(tmp_path):
    from stabilitylab.config import training_flops_per_token

    path = write(tmp_path, '[model]\npreset = "tiny"\nvocab_size = 256\n[data]\nseq_len = 32\n'
                           '[train]\nbatch_size = 4\n[sweep.grid]\n"train.flop_budget" = [1e10, 4e10]\n'
                           '"model.mean_recurrence" = [1, 4]\n')
    cells = sweep_cells(read_experiment(path), path)
    spent = {}
    for cell in cells:
        exp = cell.config
        per_step = training_flops_per_token(exp.model, 32).total * 4 * 32
        spent[cell.id] = exp.train.steps * per_step / exp.train.flop_budget
        assert build_experiment(exp.to_dict()).train.steps == exp.train.steps  # a stored config rebuilds the same
    assert all(abs(v - 1) < 0.01 for v in spent.values()), spent
    steps = {c.id: c.config.train.steps for c in cells}
    assert steps["flop_budget=40000000000.0,mean_recurrence=1"] > steps["flop_budget=40000000000.0,mean_recurrence=4"]
    assert steps["flop_budget=40000000000.0,mean_recurrence=4"] > steps["flop_budget=10000000000.0,mean_recurrence=4"]
    with pytest.raises(ConfigError, match=r"^--set: train\.flop_budget: 1e\+06 FLOPs buy 0 steps"):
        load_experiment(path, ["train.flop_budget=1e6"])
