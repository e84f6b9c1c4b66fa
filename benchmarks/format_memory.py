"""Peak memory of the lab's verbs on a random checkpoint of a published family, at a chosen size.

    python benchmarks/format_memory.py DIR --family huginn --width 1920 [--dtype bfloat16]
        [--verb check --verb analyze] [--keep]

writes a random checkpoint of `--family` (huginn, ouro) in its published layout into DIR
(config.json + model-0000i-of-0000n.safetensors shards of ≤ 1 GiB + model.safetensors.index.json,
weights in --dtype), runs `python -m stabilitylab check DIR` / `analyze DIR` in a subprocess
each, and prints one table row per verb: parameters, weights on disk, the child's peak
resident set (ru_maxrss from os.wait4, so nothing else on the machine is counted) and its
wall time. The checkpoint is deleted afterwards unless --keep. Not a test: it writes GiBs.

Shapes. huginn keeps Huginn-0125's layout (2 + 4 + 2 sandwich blocks, head_dim 96,
vocabulary 65536, tied head, intermediate = 17920/5280 · width rounded to 64) and scales the
width: --width 5280 is Huginn-0125 itself (3.56B). ouro keeps Ouro-1.4B's (24 layers,
head_dim 128, vocabulary 49152, intermediate = 5632/2048 · width) at its width; --width 2048
is Ouro-1.4B. The loop depth of the random config is small (--depth, default 4 = μ_rec, and
the verbs run at 2·μ_rec) so the CPU time stays minutes: depth changes the activations
(B·T·d floats per stored state), not the weights, and a peak dominated by weights is what
this measures. The verbs run on 1 sequence of 16 tokens (--seq-len).

The weights are written one shard at a time from a meta-device build's shapes (random normal
/ √fan-in, norms 1), so writing never holds more than a shard.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 1 << 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def huginn_config(width: int, depth: int) -> dict:
    """config.json as RavenConfig writes it, Huginn-0125's fields at another width."""
    heads = width // 96
    inter = round(17920 / 5280 * width / 64) * 64
    return {"architecture_class_name": "RecurrentGPT", "architectures": ["RavenForCausalLM"], "bias": False,
            "block_class_name": "SandwichBlock", "block_size": 4096, "effective_expected_depth": 132,
            "head_dim": 96, "init_strategy": "takase", "injection_type": "linear", "intermediate_size": inter,
            "mean_backprop_depth": min(8, depth), "mean_recurrence": depth, "mlp_class_name": "GatedMLP",
            "model_type": "huginn_raven", "n_embd": width, "n_heads": heads, "n_layers": 8, "n_layers_in_coda": 2,
            "n_layers_in_prelude": 2, "n_layers_in_recurrent_block": 4, "nonlin_name": "SiLU",
            "norm_class_name": "RMSNorm_llama", "norm_eps": 1e-6, "num_key_value_heads": heads,
            "padded_vocab_size": 65536, "padding_multiple": 4096, "qk_bias": True, "rope_base": 50000,
            "sampling_scheme": "poisson-lognormal-filling", "state_init": "like-init", "test_time_noise": 0,
            "test_time_noise_type": "fixed", "tie_embeddings": True, "tie_word_embeddings": True,
            "vocab_size": 65536}


def ouro_config(width: int, depth: int) -> dict:
    """config.json as OuroConfig writes it, Ouro-1.4B's fields at another width."""
    heads = width // 128
    inter = round(5632 / 2048 * width / 64) * 64
    return {"architectures": ["OuroForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0,
            "early_exit_threshold": 1.0, "head_dim": 128, "hidden_act": "silu", "hidden_size": width,
            "initializer_range": 0.02, "intermediate_size": inter, "layer_types": ["full_attention"] * 24,
            "max_position_embeddings": 65536, "max_window_layers": 24, "model_type": "ouro",
            "num_attention_heads": heads, "num_hidden_layers": 24, "num_key_value_heads": heads,
            "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
            "tie_word_embeddings": False, "total_ut_steps": depth, "use_cache": True, "use_sliding_window": False,
            "vocab_size": 49152}


def shapes(family: str, raw: dict, file: Path) -> dict[str, tuple[int, ...]]:
    """Every stored key and its shape, from a meta-device build of our loader's model."""
    if family == "huginn":
        from stabilitylab.formats.huginn import HuginnLoop, model_config, rope_pairs

        with torch.device("meta"):
            model = HuginnLoop(model_config(raw, file))
        out = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        out["freqs_cis"] = tuple(rope_pairs(96, raw["block_size"], raw["rope_base"]).shape)
        return out
    from stabilitylab.formats.ouro import OuroLoop, model_config

    with torch.device("meta"):
        model = OuroLoop(model_config(raw, file))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if key == "freqs_cis":
        from stabilitylab.formats.huginn import rope_pairs

        return rope_pairs(96, 4096, 50000)
    if len(shape) == 1:  # norms (and biases): 1, so activations keep their scale
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen) / math.sqrt(shape[-1])).to(dtype)


def write(path: Path, family: str, width: int, depth: int, dtype: str) -> int:
    """The random checkpoint in its published layout; returns its parameter count (freqs_cis excluded)."""
    raw = (huginn_config if family == "huginn" else ouro_config)(width, depth)
    raw["torch_dtype" if family == "ouro" else "dtype"] = dtype
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    keys = shapes(family, raw, path / "config.json")
    size = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    shards, current, used = [], [], 0
    for key in sorted(keys):
        n = math.prod(keys[key]) * size
        if current and used + n > SHARD_BYTES:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += n
    shards.append(current)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(0)
    for name, group in zip(names, shards):
        save_file({k: random_tensor(k, keys[k], DTYPES[dtype], gen) for k in group}, path / name)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, group in zip(names, shards) for k in group}}))
    return sum(math.prod(s) for k, s in keys.items() if k != "freqs_cis")


def run(argv: list[str]) -> tuple[int, float, float, str]:
    """(exit code, peak RSS in GiB, seconds, last output line) of `python -m stabilitylab argv`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stabilitylab", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    lines = [line for line in out.strip().splitlines() if line.strip()]
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 2**20, seconds, lines[-1] if lines else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, help="where to write the checkpoint (deleted afterwards unless --keep)")
    p.add_argument("--family", choices=("huginn", "ouro"), default="huginn")
    p.add_argument("--width", type=int, required=True, help="n_embd / hidden_size (huginn: a multiple of 96)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="the stored weights' dtype")
    p.add_argument("--depth", type=int, default=4, help="μ_rec of the random config (default 4)")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--verb", action="append", choices=("check", "analyze"), help="default: both")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    params = write(args.dir, args.family, args.width, args.depth, args.dtype)
    disk = sum(f.stat().st_size for f in args.dir.iterdir()) / 2**30
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bounds = Path(tmp) / "bounds.toml"
            bounds.write_text((ROOT / "checks" / "bounds.toml").read_text().replace(
                "batch_size = 2 ", "batch_size = 1 ").replace("# seq_len = 64 ", f"seq_len = {args.seq_len} "))
            verbs = {"check": ["check", str(args.dir), "--bounds", str(bounds)],
                     "analyze": ["analyze", str(args.dir), "--batch", "1", "--seq-len", str(args.seq_len)]}
            print("| family | width | params | weights on disk | verb | exit | peak RSS GiB | s |")
            for verb in args.verb or ("check", "analyze"):
                code, rss, seconds, last = run(verbs[verb])
                print(f"| {args.family} | {args.width} | {params / 1e9:.3f}B | {disk:.2f} GiB {args.dtype} | {verb} "
                      f"| {code} | {rss:.2f} | {seconds:.0f} |", flush=True)
                if code == 2:
                    print(f"  {last}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
