# Two commands (README): `make demo` sets up and runs the main job, `make test` sets up and runs the tests.
# Each creates its own virtual environment; `make test-latest` is the second CI leg (Python 3.12, the
# newest jax/flax as of the last `make bump-latest`, no PyTorch references).
#
# Every CI install is exact: leg 1 installs requirements-dev.txt (runtime pins + test tools) constrained
# by requirements-lock.txt (every transitive package), leg 2 installs requirements-latest.txt (a lock).
# So only a change of ours can turn CI red; upgrades are deliberate:
#   make bump-latest   re-resolves the newest releases of requirements-latest.in, rewrites the lock, runs leg 2
#   make lock          re-resolves leg 1 after a pin in requirements*.txt changed, rewrites its lock

PYTHON ?= python3
VENV ?= .venv
REQS ?= requirements-dev.txt
LOCK ?= requirements-lock.txt
PYTEST_ARGS ?=
PY := $(VENV)/bin/python
PIP := -m pip --disable-pip-version-check

# pyenv shims need PYENV_VERSION; elsewhere the variable is ignored and python3.12 is found on PATH.
PYTHON312 ?= env PYENV_VERSION=3.12.1 python3.12
LATEST := PYTHON="$(PYTHON312)" VENV=.venv-latest REQS=requirements-latest.txt LOCK=

# Learning-test audit: every `learning` test with these seeds, margins over thresholds as a table.
SEEDS ?= 0 1 2

.PHONY: setup demo test test-latest lint format ci clean aot-setup bump-latest lock audit-learning \
	audit-learning-latest check-install

$(VENV)/.installed: $(REQS) $(LOCK) requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) $(PIP) install --quiet -r $(REQS) $(if $(LOCK),-c $(LOCK))
	$(PY) $(PIP) install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m regionclip_jax.cli demo

# lint-imports checks .importlinter: the package's layers (README "Architecture") and no import cycles.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports --no-cache --no-logo

test: lint
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

# A non-editable install (`pip install .`) into a fresh venv, then the demo from outside the checkout
# (runlocal size: minutes on a 2-core CPU): configs/ must travel inside the wheel.
INSTALL_CHECK ?= /tmp/regionclip_jax_install_check
check-install:
	rm -rf $(INSTALL_CHECK) && $(PYTHON) -m venv $(INSTALL_CHECK)/venv
	$(INSTALL_CHECK)/venv/bin/python $(PIP) install --quiet -r $(REQS) $(if $(LOCK),-c $(LOCK))
	$(INSTALL_CHECK)/venv/bin/python $(PIP) install --quiet --no-deps .
	rm -rf build
	cd $(INSTALL_CHECK) && venv/bin/regionclip-jax demo --help > /dev/null \
	  && venv/bin/regionclip-jax demo --runlocal --out demo

# The second leg checks that the newest registry stack imports, compiles and computes the same
# results; the multi-process tests (several JAX processes over gloo), the `slow` end-to-end runs and the
# 8-fake-device subprocess tests run in the first leg only, to keep CI well under 20 minutes on 2 cores.
test-latest:
	$(MAKE) test $(LATEST) PYTEST_ARGS='-m "not multiprocess and not slow and not multidevice"'

# $(call resolve,PYTHON,REQUIREMENTS,LOCK): install REQUIREMENTS into a fresh venv of PYTHON and write
# every package it resolved to, as exact pins, to LOCK (with a header naming the target and the day).
define resolve
	rm -rf .venv-resolve
	$(1) -m venv .venv-resolve
	.venv-resolve/bin/python $(PIP) install --quiet -r $(2)
	{ echo "# Exact pins of every package $(2) resolves to: written by 'make $@' on $$(date -u +%F)."; \
	  echo "# Edit $(2) and rerun 'make $@'; never this file."; \
	  .venv-resolve/bin/python $(PIP) freeze --exclude-editable | LC_ALL=C sort -f; } > $(3)
	rm -rf .venv-resolve
endef

# Leg 2's lock: the newest releases of requirements-latest.in (Python 3.12); then leg 2 runs on them.
# Run it at the start of every new piece of work and whenever a change touches dependencies; commit
# the new lock with the fixes it needs.
bump-latest:
	$(call resolve,$(PYTHON312),requirements-latest.in,requirements-latest.txt)
	rm -rf .venv-latest
	$(MAKE) test-latest

# Leg 1's lock (Python 3.11), used as pip constraints (-c) by 'make setup': rerun after a pin in
# requirements*.txt changed.
lock:
	$(call resolve,$(PYTHON),requirements-dev.txt,requirements-lock.txt)

audit-learning: setup
	rm -f .learning-margins.jsonl
	for s in $(SEEDS); do \
	  REGIONCLIP_MARGINS=.learning-margins.jsonl $(PY) -m pytest -q -n 2 -m learning \
	    --learning-seed=$$s $(PYTEST_ARGS) || exit 1; done
	$(PY) tests/learning_margins.py .learning-margins.jsonl

audit-learning-latest:
	$(MAKE) audit-learning $(LATEST)

# launch/aot_compile.py: compile the train step for TPU topologies on this CPU (benchmarks/aot_tpu.sh).
aot-setup:
	$(MAKE) setup VENV=.venv-tpu REQS=launch/requirements-tpu.txt LOCK=

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

ci: test test-latest

clean:
	rm -rf .venv .venv-latest .venv-tpu .venv-resolve .pytest_cache .ruff_cache
