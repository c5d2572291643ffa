# The two commands the README promises: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test lint

# torch==2.13.0 resolves to the CPU wheel on these machines' local disk; pinning it here keeps
# pip from pulling a multi-GB CUDA build as a dependency of the `export` extra.
install:
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q torch
	$(PIP) install -q -e ".[export,rtx,dev]"

demo: install
	$(PYTHON) -m trtnet.demo

lint:
	$(PYTHON) -m ruff check .

test: install lint
	$(PYTHON) -m pytest -q -ra
