# The two commands the README promises: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-demo demo test lint

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
