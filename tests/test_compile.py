"""torch.compile: the model traces without graph breaks, sampled depths never recompile a
block, "auto" compiles only long runs, and compiled training follows eager training."""

from pathlib import Path

import pytest
import torch

import stabilitylab as sl
from stabilitylab.config import ConfigError, TrainConfig
from stabilitylab.experiment import load_experiment
from stabilitylab.model import training_flops_per_token
from stabilitylab.store import open_run
from stabilitylab.train.compiling import AUTO_MIN_FLOPS, AUTO_MIN_STEPS_CUDA, compile_blocks, compile_pays
from stabilitylab.train.trainer import train

TINY = Path(__file__).resolve().parents[1] / "experiments" / "tiny.toml"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def tiny_model(**kw) -> sl.LoopedLM:
    return sl.LoopedLM(sl.ModelConfig(vocab_size=32, block_size=16, d_model=16, n_heads=2, **kw))


def test_the_whole_model_at_a_fixed_depth_traces_in_one_graph(one_thread):
    model = tiny_model(value_embed_layers=(0, 2))
    x = torch.randint(0, 32, (3, 10))
    h0 = model.draw_state((3, 10), "cpu", torch.float32, torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model)(x, x, depth=sl.Depth(2, 2), h0=h0)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_sampled_per_sequence_depths_never_recompile_a_block(one_thread):
    torch.compiler.reset()
    model = tiny_model(depth_scheme="poisson-truncated-full", depth_granularity="sequence", mean_recurrence=4)
    assert compile_blocks(model, backend="eager") == 3
    x = torch.randint(0, 32, (4, 10))
    frames = torch._dynamo.utils.counters["stats"]
    seen, totals = [], set()
    for step in range(8):
        depth = sl.sample_depth(model.cfg, step, seed=0, batch=4, seq_len=10)
        totals.add((depth.n_max, depth.k_max))
        model(x, x, depth=depth).loss.backward()
        seen.append(frames["unique_graphs"])
    assert len(totals) > 2  # the trip counts did change
    assert seen[1:] == [seen[0]] * 7  # every graph was built by the first step


@pytest.mark.parametrize("steps, compiles", [(6, False), (10**9, True)])
def test_auto_compiles_a_cpu_run_only_when_its_flops_repay_compilation(steps, compiles):
    exp = load_experiment(TINY, [f"train.steps={steps}"])
    assert exp.train.compile == "auto"
    assert compile_pays(exp.train, exp.model, exp.data.seq_len, CPU) is compiles
    flops = steps * exp.train.batch_size * exp.data.seq_len * training_flops_per_token(exp.model, 32).total
    assert (flops >= AUTO_MIN_FLOPS) is compiles


def test_auto_on_cuda_counts_steps_and_a_bool_overrides_the_rule():
    exp = load_experiment(TINY, [f"train.steps={AUTO_MIN_STEPS_CUDA}"])
    assert compile_pays(exp.train, exp.model, 32, CUDA)
    assert not compile_pays(load_experiment(TINY, ["train.compile=false"]).train, exp.model, 32, CUDA)
    assert compile_pays(load_experiment(TINY, ["train.compile=true"]).train, exp.model, 32, CPU)


@pytest.mark.parametrize("value", ["sometimes", 1])
def test_compile_is_true_false_or_auto(value):
    with pytest.raises(ConfigError, match="compile"):
        TrainConfig(compile=value)


@pytest.mark.slow
def test_compiled_and_eager_training_give_the_same_losses_over_20_steps(tmp_path, corpus_cache, one_thread):
    """20 tiny steps (per-sequence Poisson depths, so the trip counts vary) with the blocks
    compiled by inductor and without. Inductor fuses and reorders float32 arithmetic, so the
    losses agree to rounding that training then carries along: rtol 1e-5 (measured: at most
    1.4e-7 relative, 17 of the 20 losses bit-identical)."""
    sets = [f"data.cache_dir={corpus_cache}", "train.steps=20", "train.eval_every=10", "train.checkpoint_every=0",
            "model.depth_granularity=sequence", "probes.trace_every=5", "probes.spectrum_every=5"]
    losses = {}
    for mode in ("false", "true"):
        train(load_experiment(TINY, [*sets, f"train.compile={mode}"]), tmp_path, mode, progress=False)
        losses[mode] = open_run(mode, tmp_path).scalars(["loss"])["value"].to_numpy()
    assert len(losses["true"]) == 20
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
