"""The training loop, top to bottom.

    train(exp, lab, run_id)           one run: new, or resumed from its newest intact checkpoint

One step s = 1..S:
    lr     = peak · schedule(s)                                      (optim.lr_factor)
    rows   = this rank's share of the global batch of (seed, s)     (Corpus.get_batch)
    depths = sample_depth(model, s, seed) for the global batch, this rank's rows
    h_0    = model.initial_state: for `truncnormal`, drawn for the global batch from a generator
             seeded by (seed, s); `zero` and `seeded` need no draw
    loss   = mean over grad_accum micro-batches; backward; DDP all-reduces (FSDP reduce-scatters) ∇
    clip   = ‖∇‖ per parameter role and in total; scale ∇ down to grad_clip
    check  = divergence rules on (loss, ‖∇‖, max ‖h_T‖)                (LoopMonitor.check)
    step   = AdamW (and Muon) — unless the run diverged here
    record = per-step scalars through the run's LoopMonitor (stabilitylab.monitor: the code path
             of a user's own loop), with the radius estimate and contraction rate when
             probes.radius_every / rate_every ask; probes, evaluation and checkpoint on their cadences

Nothing in training reads torch's global RNG after the model is initialised: batches,
depths and initial states follow from (seed, step). So a resumed run reproduces the
uninterrupted one bit for bit (on CPU), probes on or off give the same losses, and N
processes see exactly the rows of one.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from stabilitylab import records
from stabilitylab.config import ConfigError
from stabilitylab.data import is_shards, prepare
from stabilitylab.experiment import ExperimentConfig, build_experiment
from stabilitylab.model import Depth, LoopedLM, count_parameters, sample_depth, training_flops_per_token
from stabilitylab.store import Run, RunWriter, StoreError, run_id_parts
from stabilitylab.train import distributed
from stabilitylab.train.checkpoint import load_checkpoint, prune_checkpoints, resume_checkpoint, save_checkpoint
from stabilitylab.train.compiling import compile_blocks, compile_pays, eager
from stabilitylab.train.evaluate import evaluate, global_initial_state, stream_seed
from stabilitylab.train.optim import build_optimizers, lr_factor, parameter_roles, set_lr
from stabilitylab.monitor import LoopMonitor, MonitorConfig
from stabilitylab.train.probes import Probes, grad_norms, state_norms

H0_SALT = 0x40  # the training h_0 stream, apart from batches (data.py) and depths (depth.py)
DONE = ("finished", "diverged")  # a run in one of these is a result: train --resume leaves it alone


def train(exp: ExperimentConfig, lab: str | Path = "runs", run_id: str | None = None, *, resume: bool = False,
          checkpoint: int | None = None, sweep_cell: str | None = None, source: str | Path | None = None,
          progress: bool = True) -> str:
    """Train one run into lab/run_id (default: the experiment's name) and return its
    status: finished or diverged. With resume=True continue the run from its newest intact
    checkpoint (checkpoint.resume_checkpoint; from scratch if it has none), or from that of
    step `checkpoint`; what was recorded after it is dropped. `source` (the experiment file)
    only locates config errors."""
    if checkpoint is not None and not resume:
        raise ConfigError("checkpoint", f"step {checkpoint} picks the checkpoint a resume starts from",
                          "Add --resume, or drop --checkpoint")
    run_id = run_id or exp.name
    check_run_id(run_id)  # before the corpus, the model or the process group exist
    process = distributed.start(exp.train.device)
    try:
        status = _train(exp, Path(lab), run_id, resume, checkpoint, sweep_cell, source, progress, process)
        distributed.barrier()  # no rank tears the process group down while another still uses it
        return status
    finally:
        distributed.stop()


def check_run_id(run_id: str) -> None:
    """A run id names a directory inside the lab, 'name' or 'group/name' (the store's rule);
    one that would leave the lab (`../x`, an absolute path) or nest deeper is a ConfigError."""
    try:
        run_id_parts(run_id)
    except ValueError:
        raise ConfigError("run_id", f"must be 'name' or 'group/name' inside the lab, got {run_id!r}",
                          "Use no empty, '.'-leading or '..' part and no absolute path, e.g. sweep/lr-0.01"
                          ) from None


def _train(exp: ExperimentConfig, lab: Path, run_id: str, resume: bool, checkpoint_step: int | None,
           sweep_cell: str | None, source: str | Path | None, progress: bool, process: distributed.Process) -> str:
    tc, cfg, seq_len = exp.train, exp.model, exp.data.seq_len
    B, G, W, device = tc.batch_size, tc.grad_accum, process.world_size, process.device

    # ---- the data, checked before anything is written --------------------------------
    if B % (W * G):
        raise ConfigError("train.batch_size", f"{B} does not split into {W} processes × {G} micro-batches",
                          "Choose batch_size divisible by nproc-per-node · grad_accum", source=source)
    if exp.probes.radius_every and W > 1 and tc.parallel == "fsdp":
        raise ConfigError("probes.radius_every", "needs the whole model on rank 0 at every step; FSDP shards it",
                          "Set probes.radius_every = 0 under FSDP, or train with train.parallel = \"ddp\"",
                          source=source)
    corpus = _corpus(exp, source, process)
    kind = "shards'" if is_shards(exp.data.source) else exp.data.tokenizer
    if (corpus.vocab_size or 0) > cfg.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.vocab_size} is smaller than the {kind} tokenizer's "
                          f"{corpus.vocab_size} tokens", f"Set model.vocab_size ≥ {corpus.vocab_size}", source=source)
    run_dir, checkpoint = lab / run_id, None
    if resume:
        run = Run(run_dir, run_id) if (run_dir / "run.db").is_file() else None
        if run is None:
            raise StoreError(run_dir, "no run to resume here", "train it without --resume first")
        status = run.status()["status"]
        if status in DONE and checkpoint_step is not None:
            raise StoreError(run_dir, f"is {status}: a result, which a resume does not rewrite",
                             "train a new --run-id to explore from one of its checkpoints")
        if status in DONE:
            return status
        _check_same_config(run, exp)
        announce = (lambda line: print(line, file=sys.stderr)) if process.main else None
        checkpoint = resume_checkpoint(run, checkpoint_step, announce)  # sha256-checked, before the model
    elif run_dir.exists():
        raise StoreError(run_dir, "a run with this id already exists", "continue it with --resume, or choose "
                         "another --run-id")

    # ---- model, optimiser, monitors; the newest checkpoint when resuming -----------------
    torch.manual_seed(tc.seed)
    model = LoopedLM(cfg).to(device)
    model.recompute_core = tc.activation_checkpointing
    totals = {records.TOKENS: 0, records.FLOPS: 0.0, records.WALL_TIME: 0.0}
    start, rho = 0, math.nan
    if checkpoint:  # full weights into the whole model, before any sharding
        start, weights, state_file = checkpoint
        state = load_checkpoint(model, weights, state_file, device)
    # fsdp: rank 0 probes a plain copy of the full weights (refreshed before each probe)
    probe_model = (LoopedLM.from_state_dict(cfg, {k: v.clone() for k, v in model.state_dict().items()}, device)
                   if process.main and W > 1 and tc.parallel == "fsdp" else model)
    if compile_pays(tc, cfg, seq_len, device):
        compile_blocks(model)  # in place; evaluation and probes run it eagerly (compiling.eager)
    ddp = distributed.wrap(model, process, tc.parallel, tc.param_dtype)  # fsdp shards `model` in place
    optimizers = build_optimizers(model, tc)  # after sharding: FSDP's parameters are the shards
    roles = parameter_roles(model)
    if checkpoint:
        distributed.load_optimizer_states(model, optimizers, state["optimizers"])
        totals, rho = state["totals"], state["rho"]
        torch.set_rng_state(state["rng"].cpu())
    sharded = distributed.is_sharded(model)

    def autocast() -> contextlib.AbstractContextManager:
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    probes = Probes(exp.probes, probe_model, corpus, seq_len, tc.seed, device, autocast) if process.main else None

    def probe(step: int, force: bool = False) -> float | None:
        """Run the probes due at `step` on rank 0 (under fsdp every rank first gathers the weights)."""
        if sharded:
            if not distributed.broadcast_flag(force or bool(probes and probes.due(step))):
                return None
            weights = distributed.full_state(model)
            if probes:
                probe_model.load_state_dict(weights)
        elif not (probes and (force or probes.due(step))):
            return None
        if not probes:
            return None
        with eager():
            return probes.run(step, probe_model, writer, force=force)

    val_batches = corpus.val_batches(tc.eval_batches, B, seq_len, process.rank, W)
    eval_depths = tc.depths(cfg.mean_recurrence) if cfg.looped else [1]
    params = count_parameters(cfg)
    per_rank = B // W
    rank_rows = slice(process.rank * per_rank, (process.rank + 1) * per_rank)
    writer = None
    if process.main:  # rank 0 writes the store; from here on, an exception marks the run failed
        writer = (RunWriter.resume(run_dir, start) if resume else
                  RunWriter.create(lab, run_id, exp.to_dict(), experiment=exp.name, sweep_cell=sweep_cell,
                                   seed=tc.seed, git_commit=_git_commit()))
    # every rank applies the divergence rules to the same all-reduced numbers; rank 0 records
    monitor = LoopMonitor(model, None, writer=writer, config=MonitorConfig(
        radius_every=exp.probes.radius_every if process.main and cfg.looped else 0, spectrum_every=0,
        grad_norm=False, divergence=exp.divergence), seed=tc.seed)
    rate_every = exp.probes.rate_every if process.main and cfg.looped else 0
    if checkpoint:
        monitor.divergence.load_state_dict(state["monitor"])
        if "tracker" in state:
            monitor.tracker.load_state_dict(state["tracker"])
    status = "finished"

    # ---- the loop ------------------------------------------------------------------------
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and process.main), desc=run_id,
               dynamic_ncols=True)
    clock = time.perf_counter() - totals[records.WALL_TIME]
    with writer or contextlib.nullcontext():
        for step in range(start + 1, tc.steps + 1):
            t0 = time.perf_counter()
            factor = lr_factor(step, tc)
            set_lr(optimizers, factor)
            x, y = corpus.get_batch("train", step, B, seq_len, tc.seed, process.rank, W)
            depth = sample_depth(cfg, step, tc.seed, B, seq_len)
            h0 = (global_initial_state(model, stream_seed(tc.seed, step, H0_SALT), (B, seq_len), rank_rows, device)
                  if cfg.looped else None)
            traced = bool(rate_every) and step % rate_every == 0
            loss, norm_max, norm_mean, first = _forward_backward(ddp, x.to(device), y.to(device),
                                                                 _take(depth, rank_rows), h0, G, autocast, traced)
            loss, norm_mean = distributed.all_reduce(torch.stack([loss, norm_mean]), "mean")
            norm_max = distributed.all_reduce(norm_max, "max")
            norms = {role: distributed.full(norm) for role, norm in grad_norms(roles, device).items()}
            total = torch.nn.utils.get_total_norm(list(norms.values()))
            if tc.grad_clip:
                distributed.clip_grads_(model.parameters(), tc.grad_clip, total)
            values = torch.stack([loss, norm_max, norm_mean, total, *norms.values()]).tolist()
            loss_v, norm_max_v, norm_mean_v, total_v = values[:4]
            verdict = monitor.check(step, loss_v, total_v, norm_max_v)
            if verdict.stop is None:
                for opt in optimizers:
                    opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0

            n_mean, k_mean = depth.mean()
            totals[records.TOKENS] += B * seq_len
            flops = training_flops_per_token(cfg, seq_len, n_mean, k_mean, params=params).total
            totals[records.FLOPS] += flops * B * seq_len
            totals[records.WALL_TIME] = time.perf_counter() - clock
            scalars = {records.LOSS: loss_v, records.LR: tc.lr * factor, records.GRAD_NORM: total_v,
                       **{records.GRAD_NORM_ROLE.format(role=role): v for role, v in zip(norms, values[4:])},
                       records.TOKENS_PER_S: B * seq_len / seconds, **totals}
            if cfg.looped:  # the GPT baseline has no loop: no depths, no state
                scalars |= {records.DEPTH_N_MEAN: n_mean, records.DEPTH_K_MEAN: k_mean,
                            records.DEPTH_TOTAL_MAX: depth.total_max, records.STATE_NORM: norm_max_v,
                            records.STATE_NORM_MEAN: norm_mean_v}
            tokens, h_T, trace = first
            with eager():  # the radius JVP never compiles (as the probes)
                monitor.step(step, tokens=tokens, state=h_T, trace=trace, scalars=scalars)  # logs the verdict's events

            if verdict.stop:  # the run ends here; what it recorded stays, and so do its checkpoints
                probe(step, force=True)
                if writer:
                    writer.set_status("diverged", step, verdict.stop)
                status = "diverged"
                break
            measured = probe(step)
            rho = rho if measured is None else measured
            if step == tc.steps or (tc.eval_every and step % tc.eval_every == 0):
                with eager():
                    result = evaluate(model, val_batches, eval_depths, tc.seed, B, process, autocast)
                for depth_value, val_loss in result.items():
                    if writer:
                        writer.log_eval(step, depth_value, {records.VAL_LOSS: val_loss})
            if step == tc.steps or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                weights, opt_states = distributed.full_state(model), distributed.full_optimizer_states(model, optimizers)
                if writer:  # the one-process format, whatever the parallelism
                    state = {"step": step, "optimizers": opt_states, "rng": torch.get_rng_state(),
                             "monitor": monitor.divergence.state_dict(), "totals": dict(totals), "rho": rho}
                    if monitor.config.radius_every:  # the estimate's subspace: a resumed estimate stays warm
                        state["tracker"] = monitor.tracker.state_dict()
                    save_checkpoint(writer, step, weights, state)
                    prune_checkpoints(writer, Run(run_dir, run_id), tc.keep_checkpoints)
            bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{B * seq_len / seconds:,.0f}", rho=f"{rho:.3f}",
                            refresh=False)  # update() redraws, at most every mininterval
            bar.update(1)
        if monitor.divergence.first and status == "finished":  # action "record": it diverged, and we watched
            first_step, detail = monitor.divergence.first
            status = "diverged"
            if writer:
                writer.set_status("diverged", first_step, f"{detail} (recorded; trained on to step {tc.steps})")
    bar.close()
    return status


def _forward_backward(ddp, x, y, depth: Depth, h0, micro_batches: int, autocast, trace: bool = False):
    """Forward and backward over the micro-batches of this rank's rows (DDP syncs the
    gradients on the last); returns (mean loss, max ‖h_T‖, mean ‖h_T‖) on the device and
    the first micro-batch's (tokens, h_T, LoopTrace if `trace` else None) for the monitor."""
    loss, norm_max, norm_mean = (torch.zeros((), device=x.device) for _ in range(3))
    size = len(x) // micro_batches
    first = (None, None, None)
    for j in range(micro_batches):
        rows = slice(j * size, (j + 1) * size)
        with distributed.sync_context(ddp, last_micro_batch=j == micro_batches - 1):
            with autocast():
                out = ddp(x[rows], y[rows], depth=_take(depth, rows), h0=None if h0 is None else h0[rows],
                          trace=trace and j == 0)
            (out.loss / micro_batches).backward()
        loss += out.loss.detach().float() / micro_batches
        if out.state is not None:  # None for the GPT baseline
            m, mean = state_norms(out.state)
            norm_max, norm_mean = torch.maximum(norm_max, m), norm_mean + mean / micro_batches
            if j == 0:
                first = (x[rows], out.state.detach(), out.trace)
    return loss, norm_max, norm_mean, first


def _corpus(exp: ExperimentConfig, source: str | Path | None, process: distributed.Process):
    """The prepared corpus; rank 0 builds a missing cache entry while the others wait."""
    try:
        if process.main:
            corpus = prepare(exp.data)
        distributed.barrier()
        return corpus if process.main else prepare(exp.data)
    except ConfigError as err:
        raise err.located(source, "data") from None


def _take(depth: Depth, rows: slice) -> Depth:
    """The depths of some rows of the batch (per-sequence or per-token depths)."""
    return depth if depth.uniform else Depth(depth.n[rows], depth.k[rows])


# how a run is spread over processes, not what it trains: a run may resume under another choice
# (trained with FSDP on a cluster, resumed in one process, and back)
EXECUTION_FIELDS = ("train.parallel", "train.param_dtype", "train.activation_checkpointing")


def _check_same_config(run: Run, exp: ExperimentConfig) -> None:
    """Refuse to resume a run with a config other than its own (EXECUTION_FIELDS may differ).
    The stored config is built as the lab builds any config, so a field it lacks takes its
    default: a field added to the lab since the run started (e.g. probes.radius_every) at its
    default changes nothing."""
    stored = _leaves(build_experiment(run.meta()["config"], source=run.path / "config.json").to_dict())
    current = _leaves(exp.to_dict())
    differ = [key for key in sorted(set(stored) | set(current))
              if stored.get(key) != current.get(key) and key not in EXECUTION_FIELDS]
    if differ:
        raise ConfigError(", ".join(differ[:5]), "differs from the config the run was trained with",
                          f"Resume with the run's own settings (see {run.path / 'config.json'}), or train a "
                          "new run (--run-id)", source=run.path)


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _git_commit() -> str | None:
    """The commit of the code that trains, if it runs from a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


__all__ = ["train"]
