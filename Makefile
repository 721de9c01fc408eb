# Two commands on a fresh clone: `make run` and `make test`.
# `make test-latest` runs the core tests again on Python 3.12 with the newest JAX,
# flax, optax and orbax the registry serves (what accelerator machines run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/lm_tiny
# pytest-xdist workers; test files stay whole on one worker (module fixtures run once),
# handed out in collection order: tests/conftest.py puts the longest files first.
TEST_WORKERS ?= 2
PYTEST = -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

VENV_LATEST := .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
STAMP_LATEST := $(VENV_LATEST)/.installed
# Python 3.12: python3.12 on PATH, else pyenv's newest 3.12.x (its shim needs
# PYENV_VERSION when 3.12 is not the selected version). Override with PYTHON_LATEST=.
PYTHON_LATEST ?= $(shell \
  pyenv_312=$$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -n 1); \
  for py in python3.12 $$(pyenv root 2>/dev/null)/versions/$$pyenv_312/bin/python3.12; do \
    found=$$(PYENV_VERSION=$$pyenv_312 $$py -c 'import sys; print(sys.executable if sys.version_info[:2] == (3, 12) else "")' 2>/dev/null); \
    if [ -n "$$found" ]; then echo $$found; break; fi; \
  done)
LATEST_TESTS := tests/test_engines.py tests/test_layer.py tests/test_gmm.py \
  tests/test_pallas_kernels.py tests/test_lowering.py tests/test_expert_parallel.py \
  tests/test_expert_parallel_layer.py tests/test_multiprocess.py tests/test_device_check.py \
  tests/test_package_boundaries.py tests/test_router_interface.py tests/test_drop_in.py \
  tests/test_train.py::test_loss_decreases_and_run_leaves_its_outputs

.PHONY: run demo analyze test test-latest install install-latest bench clean

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

# The routing analysis of the `make run` workdir: <workdir>/analysis/analysis.md.
analyze: $(STAMP)
	$(PY) -m moejax.analyze --workdir=$(WORKDIR)

# The device check's CPU run and the accelerator lowerings target the JAX of the
# accelerator machines (0.11 and newer): they run in test-latest, not twice.
ACCELERATOR_TESTS := tests/test_device_check.py tests/test_lowering.py

test: $(STAMP)
	$(PY) $(PYTEST) tests $(addprefix --ignore=,$(ACCELERATOR_TESTS))

$(PY_LATEST):
	@if [ -z "$(PYTHON_LATEST)" ]; then \
	  echo "make test-latest: no Python 3.12 found (tried python3.12 on PATH and pyenv's 3.12.x); install one or pass PYTHON_LATEST=/path/to/python3.12" >&2; \
	  exit 1; fi
	$(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install --quiet --upgrade pip

$(STAMP_LATEST): setup.py | $(PY_LATEST)
	$(PY_LATEST) -m pip install --quiet --upgrade -e '.[data,dev]' jax jaxlib flax optax orbax-checkpoint
	$(PY_LATEST) -c "import sys, jax, flax, optax, orbax.checkpoint as ocp; print('test-latest: Python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax-checkpoint', ocp.__version__)"
	touch $(STAMP_LATEST)

install-latest: $(STAMP_LATEST)

test-latest: $(STAMP_LATEST)
	$(PY_LATEST) $(PYTEST) $(LATEST_TESTS)

bench: $(STAMP)
	$(PY) experiments/bench_layer.py

clean:
	rm -rf $(VENV) $(VENV_LATEST) *.egg-info .pytest_cache .hypothesis
