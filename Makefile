# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000

.PHONY: install test test-long lint run bench clean chromium

# torch is installed first and pinned: on these machines `torch==2.13.0` is the
# CPU build served from local disk; an unpinned torch would pull a multi-GB CUDA
# build on a machine without a GPU.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$${TORCH_VERSION:-2.13.0}"
	$(PY) -m pip install --quiet -e ".[dev,ray]"
	touch $(STAMP)

install: $(STAMP)

# The dashboard's browser tests drive Debian's Chromium (never a downloaded browser).
chromium:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

test: $(STAMP) chromium
	$(PY) -m ruff check src tests benchmarks scripts examples
	$(PY) -m mypy
	$(PY) -m pytest -q

# `make test` runs a short Schemathesis pass and a reduced Ray test (two actors, a 2-layer
# model; the `ray` extra is installed with dev). The long checks too (the long Schemathesis
# run, the full Ray cluster tests, ...): tests marked `long`.
test-long: $(STAMP) chromium
	$(PY) -m pytest -q --long

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts examples
	$(PY) -m ruff format --check src tests benchmarks scripts examples
	$(PY) -m mypy

# Serves the bundled demo model (shipped in the package) on $(PORT).
run: $(STAMP)
	$(VENV)/bin/patchserve serve --host $${HOST:-127.0.0.1} --port $(PORT)

bench: $(STAMP)
	$(VENV)/bin/patchserve bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# The mutation check (issue 26): each mutant of the modules whose results a user reads,
# alone, against that module's fast test selection; table in docs/reliability.md.
# `make test-long` runs it too (tests/test_mutation.py, marked long).
mutation: $(STAMP)
	$(PY) scripts/mutation.py
