# Two commands (README): `make demo` sets up and runs the main job, `make test` sets up and runs the tests.
# Each creates its own virtual environment; `make test-latest` is the second CI leg (Python 3.12, newest
# jax/flax, no PyTorch references).

PYTHON ?= python3
VENV ?= .venv
REQS ?= requirements-dev.txt
PYTEST_ARGS ?=
PY := $(VENV)/bin/python

# pyenv shims need PYENV_VERSION; elsewhere the variable is ignored and python3.12 is found on PATH.
PYTHON312 ?= env PYENV_VERSION=3.12.1 python3.12

.PHONY: setup demo test test-latest lint format ci clean aot-setup

$(VENV)/.installed: $(REQS) requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r $(REQS)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m regionclip_jax.cli demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

# The second leg checks that the newest registry stack imports, compiles and computes the same
# results; the multi-process tests (several JAX processes over gloo), the `slow` end-to-end runs and the
# 8-fake-device subprocess tests run in the first leg only, to keep CI well under 20 minutes on 2 cores.
test-latest:
	$(MAKE) test PYTHON="$(PYTHON312)" VENV=.venv-latest REQS=requirements-latest.txt \
		PYTEST_ARGS='-m "not multiprocess and not slow and not multidevice"'


# launch/aot_compile.py: compile the train step for TPU topologies on this CPU (benchmarks/aot_tpu.sh).
aot-setup:
	$(MAKE) setup VENV=.venv-tpu REQS=launch/requirements-tpu.txt

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

ci: test test-latest

clean:
	rm -rf .venv .venv-latest .venv-tpu .pytest_cache .ruff_cache
