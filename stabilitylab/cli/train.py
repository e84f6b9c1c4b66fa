"""The verbs that make runs: data prepare, train, sweep, eval."""

from __future__ import annotations

import argparse
import sys

from stabilitylab.cli.common import UsageError, add_lab, add_sets, check_counts, run_table
from stabilitylab.config import ConfigError


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare the training corpus")
    verbs = p.add_subparsers(dest="data_verb", required=True, metavar="SUBVERB")
    q = verbs.add_parser("prepare", help="tokenize a corpus into the cache (or reuse the cached tokens)")
    q.add_argument("--source", help="'shakespeare' (default) or a folder of UTF-8 .txt files")
    q.add_argument("--tokenizer", help="char (default), bytes or bpe")
    q.add_argument("--vocab-size", type=int, dest="bpe_vocab_size", help="vocabulary of the bpe tokenizer")
    q.add_argument("--cache-dir", help="where token files are cached (default data/cache)")
    q.set_defaults(handler=data_prepare)
    add_data_shard(verbs)


def data_prepare(args: argparse.Namespace) -> int:
    """Tokenize the corpus (or find it cached) and summarise it."""
    import time

    from stabilitylab.data import DataConfig, prepare

    fields = ("source", "tokenizer", "bpe_vocab_size", "cache_dir")
    cfg = DataConfig(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    if cfg.source.startswith("shards:"):
        raise UsageError("--source", "shards are read in place; there is nothing to prepare",
                         "Train with data.source = 'shards:PATH'; write shards with `stabilitylab data shard`")
    t0 = time.perf_counter()
    corpus = prepare(cfg)
    meta, seconds = corpus.meta, time.perf_counter() - t0
    held = meta["split"].get("val_files")
    split = (f"{len(held)} held out: {', '.join(held)}" if held
             else f"validation = last {meta['split']['tail_fraction']:.0%} of the characters")
    print(f"source      {cfg.source}: {len(meta['files'])} files ({split})")
    print(f"characters  {meta['chars']['train']:,} train, {meta['chars']['val']:,} validation")
    print(f"tokenizer   {meta['tokenizer']}, vocab {meta['vocab_size']:,}")
    print(f"tokens      {meta['tokens']['train']:,} train, {meta['tokens']['val']:,} validation ({meta['dtype']})")
    print(f"cache       {corpus.path} ({'rebuilt' if corpus.rebuilt else 'reused'} in {seconds:.2f} s)")
    return 0


def add_data_shard(verbs: argparse._SubParsersAction) -> None:
    q = verbs.add_parser("shard", help="tokenize text files into token shards (read with data.source = 'shards:DIR')")
    q.add_argument("files", nargs="+", metavar="FILES", help="UTF-8 text files, tokenized in this order")
    q.add_argument("--tokenizer", required=True,
                   help="'bytes', or a tokenizer JSON file (a cache entry's tokenizer.json, or a Hugging Face one)")
    q.add_argument("--out", required=True, help="the shard folder to write (new or empty)")
    q.add_argument("--val", nargs="+", default=[], metavar="FILE", help="validation files (default: the last FILE)")
    q.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard file (default 100,000,000)")
    q.set_defaults(handler=data_shard)


def data_shard(args: argparse.Namespace) -> int:
    """Write token shards (stabilitylab/shards.py) and summarise them."""
    import os

    from stabilitylab.data import SHARD_TOKENS, ByteTokenizer, load_tokenizer, write_shards

    if args.tokenizer != "bytes" and not os.path.isfile(args.tokenizer):
        raise UsageError("--tokenizer", f"{args.tokenizer} is neither 'bytes' nor a file",
                         "Pass 'bytes' or the path of a tokenizer.json")
    if args.shard_tokens is not None and args.shard_tokens < 1:
        raise UsageError("--shard-tokens", f"must be ≥ 1, got {args.shard_tokens}", "Pass a positive count")
    tokenizer = ByteTokenizer() if args.tokenizer == "bytes" else load_tokenizer(args.tokenizer)
    meta = write_shards(args.files + [v for v in args.val if v not in args.files], tokenizer, args.out,
                        val=args.val, shard_tokens=args.shard_tokens or SHARD_TOKENS)
    for split in ("train", "val"):
        print(f"{split:5s} {meta['tokens'][split]:,} tokens in {len(meta['shards'][split])} shards "
              f"({meta['dtype']}) from {len(meta['files'][split])} files")
    print(f"source = \"shards:{args.out}\"  (vocab {meta['vocab_size']:,})")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one run of an experiment (under torchrun: data-parallel)")
    p.add_argument("experiment", help="experiment TOML file, e.g. experiments/quick.toml")
    add_sets(p, ", e.g. --set train.lr=1e-2")
    add_lab(p)
    p.add_argument("--run-id", help="run name inside the lab (default: the experiment's name)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run from its newest intact checkpoint (a damaged newer one is skipped, "
                        "and said so)")
    p.add_argument("--checkpoint", type=int, metavar="STEP",
                   help="with --resume: continue from this step's checkpoint; what was recorded after it is dropped")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(handler=train)


def train(args: argparse.Namespace) -> int:
    """Train (or resume) one run and print its summary line; a diverged run is a result, so
    it exits 0 too."""
    from stabilitylab.experiment import blame_sets, load_experiment
    from stabilitylab.store import open_run
    from stabilitylab.train.distributed import is_main_process
    from stabilitylab.train.trainer import train as train_run

    if args.checkpoint is not None and not args.resume:
        raise UsageError("--checkpoint", "picks the checkpoint a resume starts from", "Add --resume")
    exp = load_experiment(args.experiment, args.sets)
    if (exp.sweep.grid or exp.sweep.seeds) and is_main_process():
        print(f"note: train ignores [sweep]; `stabilitylab sweep {args.experiment}` runs its cells", file=sys.stderr)
    run_id = args.run_id or exp.name
    try:
        train_run(exp, args.lab, run_id, resume=args.resume, checkpoint=args.checkpoint, source=args.experiment,
                  progress=args.progress)
    except ConfigError as err:  # the trainer's own checks (vocabulary vs tokenizer) blame --set too
        raise blame_sets(err, args.sets) from None
    if not is_main_process():  # under torchrun, rank 0 reports
        return 0
    run = open_run(run_id, args.lab)
    print(run_table([{**run.summary(), "run_id": run_id}]))
    print(f"in {run.path}")
    return 0


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train every cell of an experiment's [sweep] grid × seeds (resumable)")
    p.add_argument("experiment", help="experiment TOML file with a [sweep] table")
    add_sets(p, " in every cell, e.g. --set train.steps=100")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at once, in separate processes (default 1)")
    add_lab(p)
    g = p.add_argument_group("Slurm (--launcher submitit; docs/cluster.md)")
    g.add_argument("--launcher", choices=("local", "submitit"), default="local",
                   help="local: train here (default); submitit: submit the cells as one Slurm job array")
    g.add_argument("--slurm-partition", help="the partition to submit to (default: Slurm's)")
    g.add_argument("--slurm-gpus-per-node", type=int, help="GPUs per cell (default none)")
    g.add_argument("--slurm-cpus-per-task", type=int, help="CPU cores per cell")
    g.add_argument("--array-parallelism", type=int, help="cells running at once (default: Slurm's limit)")
    g.add_argument("--timeout-min", type=int, default=240,
                   help="time limit per cell in minutes; a cell that hits it is requeued and resumes (default 240)")
    p.set_defaults(handler=sweep)


def sweep(args: argparse.Namespace) -> int:
    """Finished and diverged cells are skipped, interrupted or failed ones resumed; exit 1
    if a cell failed."""
    from stabilitylab.train.sweep import run_sweep

    check_counts(args, jobs=1)
    if args.launcher == "submitit":
        return sweep_submitit(args)
    results = run_sweep(args.experiment, args.sets, args.lab, args.jobs)
    failed = [r for r in results if r.status == "failed"]
    print(f"{len(results)} cells: " + ", ".join(f"{sum(r.status == s for r in results)} {s}"
                                                for s in ("finished", "diverged", "running", "failed")))
    return 1 if failed else 0


def sweep_submitit(args: argparse.Namespace) -> int:
    """Submit the cells that are not done as one Slurm job array, and return (the jobs run on)."""
    from pathlib import Path

    from stabilitylab.train.slurm import slurm_executor, submit_sweep

    check_counts(args, slurm_gpus_per_node=0, slurm_cpus_per_task=1, array_parallelism=1, timeout_min=1)
    executor = slurm_executor(Path(args.lab) / ".submitit", args.slurm_partition, args.slurm_gpus_per_node,
                              args.array_parallelism, args.timeout_min, args.slurm_cpus_per_task)
    skipped, jobs = submit_sweep(args.experiment, args.sets, args.lab, executor)
    print(f"{len(jobs)} cells submitted, {len(skipped)} skipped; logs in {Path(args.lab) / '.submitit'}; "
          f"progress: stabilitylab runs --lab {args.lab}")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss at test depths from a run's newest checkpoint")
    p.add_argument("run", help="run directory, or run id inside --lab")
    p.add_argument("--depths", type=int, nargs="+", help="loop depths (default: the run's train.eval_depths)")
    add_lab(p, "lab holding RUN")
    p.set_defaults(handler=evaluate)


def evaluate(args: argparse.Namespace) -> int:
    """Evaluate, print the table and record it in the run's store."""
    from stabilitylab.train.evaluate import eval_run

    check_counts(args, depths=1)
    step, losses = eval_run(args.run, args.lab, args.depths)
    print(f"step {step}")
    print(f"{'depth':>6} {'val loss':>9}")
    for depth, loss in losses.items():
        print(f"{depth:>6} {loss:>9.4f}")
    return 0


__all__ = ["add_data", "data_prepare", "add_data_shard", "data_shard", "add_train", "train", "add_sweep", "sweep",
           "sweep_submitit", "add_eval", "evaluate"]
