# The two commands the README promises: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

SERVE_ENV ?= .venv-serve
SERVE_PY := $(SERVE_ENV)/bin/python

.PHONY: install install-demo demo test lint serve-env test-serve

# torch==2.13.0 resolves to the CPU wheel on these machines' local disk; pinning it here keeps
# pip from pulling a multi-GB CUDA build as a dependency of the `export` extra.
install:
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q torch
	$(PIP) install -q -e ".[export,rtx,dev]"

# The demo needs trtnet and TensorRT-RTX (to build the engine) only: no torch, pytest, ruff or pycocotools.
# Without a GPU it runs the network on the CPU with NumPy.
install-demo:
	$(PIP) install -q -e ".[rtx]"

demo: install-demo
	$(PYTHON) -m trtnet.demo

lint:
	$(PYTHON) -m ruff check .

test: install lint
	$(PYTHON) -m pytest -q -ra
	$(MAKE) test-serve

# The server in its own environment: PyTriton needs numpy < 2 (OpenCV 4.11 is the newest that accepts it),
# the main environment keeps numpy 2. Measured: ~1 min and ~800 MB from a local package mirror.
serve-env:
	$(PYTHON) -m venv $(SERVE_ENV)
	$(SERVE_PY) -m pip install -q --upgrade pip
	$(SERVE_PY) -m pip install -q -e ".[rtx,serve]" pytest psutil

# Server tests skip (with the reason) only where PyTriton cannot install (e.g. glibc < 2.35); a failing
# test still fails the target.
test-serve:
	@if $(MAKE) serve-env; then \
		$(SERVE_PY) -m pytest -q -ra tests/test_serve.py tests/test_serve_units.py; \
	else \
		echo "SKIPPED tests/test_serve.py: PyTriton could not install here (needs glibc >= 2.35, Python >= 3.8)"; \
	fi
