"""benchmarks/gpu/run.sh --dry: the GPU script's code paths on CPU, so that it cannot rot
before a GPU runs it (its checks, the throughput measurement, the JSON it writes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_dry_on_cpu_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("STABILITYLAB_PARCAE_REF", None)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), "--dry", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry"] is True and result["setting"]["preset"] == "tiny"
    assert set(result["checks"]) == {"cuda_tests", "bf16_train", "compile_train", "cupy_spectra"}
    assert result["checks"]["bf16_train"]["status"] == "passed"
    assert all(c["status"] in ("passed", "skipped") for c in result["checks"].values())
    eager = result["throughput"]["ours_eager"]
    assert eager["status"] == "passed" and eager["tokens_per_s"] > 0 and eager["mfu"] is None  # no peak on CPU
    assert result["throughput"]["ours_compiled"]["status"] == "skipped"
    assert result["ratios"] == {}  # the authors' code is not here


@pytest.mark.skipif(not os.environ.get("STABILITYLAB_PARCAE_REF"),
                    reason="STABILITYLAB_PARCAE_REF is unset: set it to the parcae_lm folder of sandyresearch/parcae "
                           "(git archive) to run the authors' side of the GPU script")
def test_the_gpu_script_runs_the_authors_model_dry_when_their_code_is_at_hand(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), "--dry", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    theirs = result["throughput"]["theirs_eager"]
    assert theirs["status"] == "passed" and theirs["tokens_per_s"] > 0, theirs
    assert result["ratios"]["tokens_per_s_eager"] > 0
