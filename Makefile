# Two commands on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/lm_tiny

.PHONY: run demo test install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install --quiet -e '.[data,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m moejax.main --config=configs/lm_tiny.py --workdir=$(WORKDIR)

demo: $(STAMP)
	$(PY) -m moejax.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) experiments/bench_layer.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
