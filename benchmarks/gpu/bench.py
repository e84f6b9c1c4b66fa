"""The GPU run, prepared: CUDA-only checks, then training throughput and MFU, in one JSON.

    benchmarks/gpu/run.sh                      # on one GPU (an H200: well under 8 minutes)
    benchmarks/gpu/run.sh --dry                # on CPU, tiny sizes: the same code paths (the test suite runs this)
    STABILITYLAB_PARCAE_REF=/path/to/parcae_lm benchmarks/gpu/run.sh   # also the authors' implementation

1. checks (each passed / failed / skipped, with seconds and a detail):
   - cuda_tests: the suite's CUDA-only tests (pytest, in a subprocess);
   - bf16_train: the trainer end to end on the device (bf16 autocast on CUDA), finite losses;
   - compile_train: the same run with train.compile = true; its losses against the eager run's
     (rtol 2e-2: bf16 autocast, and inductor fuses differently);
   - cupy_spectra: analysis.spectra on a cupy array, where cupy is installed.
2. throughput of one training step (forward, backward, AdamW) of the parcae-140m preset at
   sequence 2048 with the paper's depth sampling (per-sequence Poisson-truncated-full, μ_rec 8,
   μ_bwd 4, a fresh draw every step), bf16 autocast; eager, and compiled (each transformer
   block compiled, the loop in Python: the depths change every step). The authors'
   implementation, built from the same config (formats.parcae_lm.parcae_config: the same math),
   runs the same way when STABILITYLAB_PARCAE_REF points at its parcae_lm folder.
   tokens/s = B·T / median step time over the timed steps (after warm-up steps).
   MFU = nominal training FLOPs per token (config/sizes.py: μ_rec − μ_bwd no-grad and μ_bwd
   gradient iterations) × tokens/s ÷ the device's dense bf16 peak (PEAK_TFLOPS, or --peak-tflops).

Every section has a share of the time budget (--budget-s); a section that would overrun is
recorded as skipped, so the script ends in time and always writes its JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import stabilitylab as sl  # noqa: E402
from stabilitylab.config import training_flops_per_token  # noqa: E402
from stabilitylab.model import sample_depth  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16, NVIDIA's data sheets (SXM)
CUDA_TESTS = ["tests/test_model.py", "tests/test_spectra.py", "-k", "cuda or device_of_its_inputs or cupy"]
GOALS = {"ratio_tokens_per_s": 1.2, "mfu": 0.40}  # issue 16: ≥ 1.2× the authors' tokens/s, MFU ≥ 40%


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes, no compilation: exercise every code path")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "gpu" / "result.json"), help="the JSON to write")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-time budget of the whole run (default 450)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default 20)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: by device name)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    device = "cpu" if args.dry or not torch.cuda.is_available() else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    result = {"device": name, "dry": args.dry, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "peak_tflops": peak if device == "cuda" else None, "goals": GOALS, "checks": {}, "throughput": {}}

    checks = {"cuda_tests": cuda_tests, "bf16_train": bf16_train, "compile_train": compile_train,
              "cupy_spectra": cupy_spectra}
    for i, (key, fn) in enumerate(checks.items()):
        result["checks"][key] = section(fn, device, args.dry, deadline, share=0.4 * (i + 1) / len(checks), t0=t0,
                                        budget=args.budget_s)

    preset, seq = ("tiny", 32) if args.dry else ("parcae-140m", 2048)
    # tiny's default value embeddings (tables at the first and last layer of 1/1/1) are not a
    # layout the authors' code builds; the dry run drops them so that both models mirror
    cfg = sl.ModelConfig.preset(preset, block_size=seq, **({"value_embed_layers": ()} if args.dry else {}))
    batch, steps = (2, 2) if args.dry else (args.batch, args.steps)
    result["setting"] = {"preset": preset, "seq_len": seq, "batch": batch, "timed_steps": steps,
                         "flops_per_token": training_flops_per_token(cfg, seq).total, "autocast": "bfloat16"
                         if device == "cuda" else None}
    runs = [("ours_eager", ours_model, False), ("ours_compiled", ours_model, True)]
    if os.environ.get("STABILITYLAB_PARCAE_REF"):
        runs += [("theirs_eager", their_model, False), ("theirs_compiled", their_model, True)]
    for i, (key, build, compiled) in enumerate(runs):
        share = 0.4 + 0.6 * (i + 1) / len(runs)
        result["throughput"][key] = section(
            lambda dev, dry: throughput(build, cfg, seq, batch, steps, dev, compiled, dry, peak), device, args.dry,
            deadline, share=share, t0=t0, budget=args.budget_s, skip_dry=compiled)
    result["ratios"] = ratios(result["throughput"])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    failed = [k for k, v in {**result["checks"], **result["throughput"]}.items() if v["status"] == "failed"]
    return 1 if failed else 0


def section(fn, device: str, dry: bool, deadline: float, share: float, t0: float, budget: float,
            skip_dry: bool = False) -> dict:
    """Run one check or measurement: passed (with its numbers), failed (with the error) or
    skipped (dry mode, missing hardware, or its share of the budget already spent)."""
    start = time.perf_counter()
    if skip_dry and dry:
        return {"status": "skipped", "detail": "dry run: no compilation on CPU", "seconds": 0.0}
    if start > min(deadline, t0 + share * budget):
        return {"status": "skipped", "detail": "time budget spent", "seconds": 0.0}
    try:
        out = fn(device, dry) or {}
        status = out.pop("status", "passed")
    except Exception as err:  # noqa: BLE001 - one failure must not lose the others' numbers
        status, out = "failed", {"detail": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
    return {"status": status, **out, "seconds": round(time.perf_counter() - start, 2)}


# ---- checks ---------------------------------------------------------------------------------

def cuda_tests(device: str, dry: bool) -> dict:
    if device != "cuda":
        return {"status": "skipped", "detail": "no CUDA device"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {"status": "passed" if proc.returncode == 0 else "failed", "detail": tail}


def _train_tiny(device: str, compile_: bool, lab: Path, run_id: str) -> list[float]:
    from stabilitylab.experiment import load_experiment
    from stabilitylab.store import open_run
    from stabilitylab.train.trainer import train

    sets = [f"train.device={device}", "train.steps=4", "train.eval_every=4", "train.checkpoint_every=0",
            f"train.compile={'true' if compile_ else 'false'}", f"data.cache_dir={lab / 'cache'}"]
    status = train(load_experiment(REPO / "experiments" / "tiny.toml", sets), lab, run_id, progress=False)
    losses = open_run(run_id, lab).scalars(["loss"]).sort_values("step")["value"].tolist()
    if status != "finished" or not all(map(math.isfinite, losses)):
        raise RuntimeError(f"{run_id}: {status}, losses {losses}")
    return losses


def bf16_train(device: str, dry: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        losses = _train_tiny(device, False, Path(tmp), "eager")
    return {"losses": losses, "detail": "bf16 autocast" if device == "cuda" else "float32 (CPU)"}


def compile_train(device: str, dry: bool) -> dict:
    if dry:
        return {"status": "skipped", "detail": "dry run: no compilation on CPU"}
    with tempfile.TemporaryDirectory() as tmp:
        eager = _train_tiny(device, False, Path(tmp), "eager")
        compiled = _train_tiny(device, True, Path(tmp), "compiled")
    worst = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled))
    return {"status": "passed" if worst <= 2e-2 else "failed", "max_rel_diff": worst, "losses": compiled}


def cupy_spectra(device: str, dry: bool) -> dict:
    try:
        import cupy
    except ImportError:
        return {"status": "skipped", "detail": "cupy is not installed"}
    if device != "cuda":
        return {"status": "skipped", "detail": "no CUDA device"}
    from stabilitylab.analysis.spectra import eigenvalues, spectral_radius

    A = cupy.asarray([[0.0, 2.0], [0.5, 0.0]])
    ok = isinstance(eigenvalues(A), cupy.ndarray) and abs(spectral_radius(A) - 1.0) < 1e-12
    return {"status": "passed" if ok else "failed"}


# ---- throughput -----------------------------------------------------------------------------

def ours_model(cfg, device: str):
    """(model, step function(x, y, step) -> loss) of ours, the trainer's forward."""
    model = sl.LoopedLM(cfg).to(device)

    def forward(x, y, step):
        depth = sample_depth(cfg, step, 0, len(x), x.shape[1]).to(device)
        return model(x, y, depth=depth).loss

    return model, forward, list(model.prelude) + list(model.core) + list(model.coda)


def their_model(cfg, device: str):
    """The authors' model from the same config (imports.parcae_config), their own depth sampling."""
    root = Path(os.environ["STABILITYLAB_PARCAE_REF"]).resolve()
    sys.path.insert(0, str(root.parent if root.name == "parcae_lm" else root))
    import parcae_lm.models.parcae.config as parcae_config_module
    from stabilitylab.formats.parcae_lm import parcae_config

    raw = {k: v for k, v in parcae_config(cfg).items() if not k.startswith("_")}
    model = parcae_config_module.ParcaeConfig(**raw).construct_model().to(device)

    def forward(x, y, step):
        return model(x, labels=y)["loss"]

    blocks = [m for m in model.modules() if type(m).__name__.endswith("Block")]
    return model, forward, blocks


def throughput(build, cfg, seq: int, batch: int, steps: int, device: str, compiled: bool, dry: bool,
               peak: float | None) -> dict:
    torch.manual_seed(0)
    model, forward, blocks = build(cfg, device)
    model.train()
    if compiled:
        for block in blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)
    times = []
    warmup = 1 if dry else (5 if compiled else 3)
    for step in range(1, warmup + steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast:
            loss = forward(x, y, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step > warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens_per_s = batch * seq / step_s
    flops = training_flops_per_token(cfg, seq).total
    out = {"step_ms": round(1e3 * step_s, 2), "tokens_per_s": round(tokens_per_s, 1), "loss": float(loss)}
    out["mfu"] = round(flops * tokens_per_s / (peak * 1e12), 4) if peak and device == "cuda" else None
    if device == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    return out


def ratios(runs: dict) -> dict:
    """ours / theirs tokens/s, where both ran."""
    out = {}
    for mode in ("eager", "compiled"):
        a, b = runs.get(f"ours_{mode}", {}), runs.get(f"theirs_{mode}", {})
        if a.get("status") == b.get("status") == "passed":
            out[f"tokens_per_s_{mode}"] = round(a["tokens_per_s"] / b["tokens_per_s"], 3)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
