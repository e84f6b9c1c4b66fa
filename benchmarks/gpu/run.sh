#!/usr/bin/env bash
# The GPU run: CUDA-only checks, then tokens/s and MFU of the parcae-140m preset (eager and
# compiled; the authors' too when STABILITYLAB_PARCAE_REF is set), written as JSON.
#   benchmarks/gpu/run.sh [--dry] [--out FILE] [--budget-s 450]     (see benchmarks/gpu/bench.py)
# The hard stop (timeout 470 s) keeps it under 8 minutes even if a section hangs; the
# script's own budget (450 s by default) normally ends it first, with its JSON written.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec timeout 470 "$PYTHON" benchmarks/gpu/bench.py "$@"
