# The two commands a newcomer needs (see README.md):
#   make demo   -- set up .venv (CPU torch pinned) and run the default demo on bundled data
#   make test   -- set up .venv and run lint + the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints/ci.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints/ci.txt -e '.[dev]'
	$(BIN)/python -c "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ or not torch.version.cuda else 'a CUDA build of torch was installed; expected the CPU wheel')"
	touch $(STAMP)

demo: setup
	$(BIN)/slimkit demo

lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

test: lint
	$(BIN)/python -m pytest -q --durations=10

bench: setup
	$(BIN)/python benchmarks/prune_digits.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
