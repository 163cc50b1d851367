# The two commands a newcomer needs (see README.md):
#   make demo   -- set up .venv (CPU torch pinned) and run the default demo on bundled data
#   make test   -- set up .venv and run lint + the test suite (installs Debian's chromium if it
#                  is missing: the report test renders report.html in headless Chromium)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup browser demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints/ci.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints/ci.txt -e '.[dev]'
	$(BIN)/python -c "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ or not torch.version.cuda else 'a CUDA build of torch was installed; expected the CPU wheel')"
	touch $(STAMP)

# Headless Chromium for tests/report/test_html.py (the test fails, never skips, without it).
# As root: apt-get; otherwise passwordless sudo; otherwise stop and say what to run.
CHROMIUM ?= chromium
APT_CHROMIUM := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
browser:
	@command -v $(CHROMIUM) >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian package) for the report test"; \
	  if [ "$$(id -u)" = 0 ]; then sh -c '$(APT_CHROMIUM)'; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n sh -c '$(APT_CHROMIUM)'; \
	  else echo "make: chromium is needed by the report test; install it with: sudo apt-get install chromium" >&2; exit 1; fi; }

demo: setup
	$(BIN)/slimkit demo

lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

test: lint browser
	$(BIN)/python -m pytest -q --durations=10

bench: setup
	$(BIN)/python benchmarks/prune_digits.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
