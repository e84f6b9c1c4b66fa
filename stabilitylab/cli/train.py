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


def data_prepare(args: argparse.Namespace) -> int:
    """Tokenize the corpus (or find it cached) and summarise it."""
    import time

    from stabilitylab.data import DataConfig, prepare

    fields = ("source", "tokenizer", "bpe_vocab_size", "cache_dir")
    cfg = DataConfig(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})
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
    p.set_defaults(handler=sweep)


def sweep(args: argparse.Namespace) -> int:
    """Finished and diverged cells are skipped, interrupted or failed ones resumed; exit 1
    if a cell failed."""
    from stabilitylab.train.sweep import run_sweep

    check_counts(args, jobs=1)
    results = run_sweep(args.experiment, args.sets, args.lab, args.jobs)
    failed = [r for r in results if r.status == "failed"]
    print(f"{len(results)} cells: " + ", ".join(f"{sum(r.status == s for r in results)} {s}"
                                                for s in ("finished", "diverged", "running", "failed")))
    return 1 if failed else 0


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


__all__ = ["add_data", "data_prepare", "add_train", "train", "add_sweep", "sweep", "add_eval", "evaluate"]
