# SABER: refusal ablation with measured drift. `make help` lists the targets.
# Every stage target takes MODEL=<preset> (conf/model/) and ARGS="key=value ..." (Hydra overrides).

PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
MODEL       ?= organism
ARGS        ?=
STAMP       := $(VENV)/.installed

.PHONY: help setup test test-fast demo collect extract rank entangle signature reference probe_reference iteration_check edit evaluate run sweep search bench clean-outputs

help:
	@echo "setup     create $(VENV) and install pinned dependencies (torch first)"
	@echo "test      run the whole test suite (fast and slow tests)"
	@echo "demo      run SABER end to end on the shipped model organism"
	@echo "collect extract rank entangle edit evaluate   run one stage (MODEL=, ARGS=)"
	@echo "signature reference probe_reference iteration_check   auxiliary stages the others build on demand"
	@echo "run       run every stage (MODEL=, ARGS=)"
	@echo "sweep     Hydra multirun over the SABER knobs (SWEEP=organism by default)"
	@echo "search    multi-objective Optuna search (MODEL=, ARGS=)"
	@echo "bench     benchmarks; results in docs/BENCHMARKS.md"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,cluster]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m saber.run +experiment=organism $(ARGS)

collect extract rank entangle signature reference probe_reference iteration_check edit evaluate: $(STAMP)
	$(PY) -m stages.$@ model=$(MODEL) $(ARGS)

run: $(STAMP)
	$(PY) -m saber.run model=$(MODEL) $(ARGS)

SWEEP ?= organism
sweep: $(STAMP)
	$(PY) -m saber.run +sweep=$(SWEEP) $(ARGS)

search: $(STAMP)
	$(PY) -m saber.search model=$(MODEL) $(ARGS)

bench: $(STAMP)
	$(PY) -m bench $(ARGS)

clean-outputs:
	rm -rf outputs/store outputs/runs outputs/multirun
