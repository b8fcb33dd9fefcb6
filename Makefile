# Quick start:  make train   (set up, then train the seed's CNN into runs/cnn)
#               make test    (set up, then lint and run the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on this project's machines pip finds it on local disk.
TORCH_SPEC ?= torch==2.13.0
RUN ?= runs/cnn

.PHONY: setup train test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -c "from mnistlab.kernels import build; build.available() or print('compiled kernels unavailable:', build.why_unavailable())"
	touch $@

train: setup
	$(VENV)/bin/mnistlab train --model cnn --out $(RUN) --force

test: setup
	$(VENV)/bin/ruff check src tests examples benchmarks fuzz
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_seed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
