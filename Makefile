# The two commands a newcomer needs (see README.md):
#   make serve   set up and run the service on this machine (CPU unless CUDA is there)
#   make test    set up and run every check: lint, types, the test suite
PYTHON ?= python3
VENV ?= .venv
# PyTorch as pip finds it: the CPU build where that wheel is at hand (a local wheel on
# our dev/CI machines), the CUDA build from PyPI on Linux x86-64. To choose a build, name
# it and PyTorch's index for it (README.md):
#   make serve TORCH=torch==2.13.0+cpu TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
WEIGHTS_DIR ?= weights
BIN := $(VENV)/bin

.PHONY: serve test setup system-tools lint clean

$(BIN)/imdn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--extra-index-url "$(TORCH_INDEX)") "$(TORCH)" -e ".[dev,video,openvino]"
	touch $@

setup: $(BIN)/imdn

# Debian's Prometheus (a real server the tests scrape with, and promtool), and Debian's
# Chromium (the browser tests/test_webui.py drives). Without Chromium those tests skip
# with the reason, so a failed install of it is reported and not fatal.
system-tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "installing Debian's prometheus package (needs root)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium package (needs root)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	  || echo "chromium could not be installed: the browser tests will skip"; }

serve: setup
	IMDN_WEIGHTS_DIR=$(WEIGHTS_DIR) IMDN_FETCH_WEIGHTS=true $(BIN)/imdn serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: setup system-tools lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
