# Every target bootstraps .venv from nothing: a fresh clone needs only python3 (3.11+) and make.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# pip prints a warning per package for this machine's local index folders; keep logs readable.
QUIET_PIP := sed -u '/is ignored: it is neither a file nor a directory/d'

.PHONY: test lint serve bench clean openapi

# What .venv gets (the torch pin, the three packages with their test extras, the pinned lint
# tools, the demo model) is declared in docker/install.sh, which docker/Dockerfile runs too
# (MODE runtime: no extras, no tools); a new pin there reinstalls.
$(INSTALLED): proto/pyproject.toml analysis/pyproject.toml server/pyproject.toml client/pyproject.toml docker/install.sh Makefile
	$(PYTHON) -m venv $(VENV)
	PYTHON=$(PY) sh docker/install.sh dev 2>&1 | $(QUIET_PIP)
	touch $(INSTALLED)

# Debian's chromium, which tests/ui drive through Playwright: installed once where apt-get can
# (the step says why not otherwise, and those tests then skip, saying so).
BROWSER := /usr/bin/chromium
$(BROWSER):
	sh docker/install.sh dev browser || echo "make: chromium was not installed; tests/ui will skip"

test: $(INSTALLED) $(BROWSER)
	$(PY) -m pytest

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# Paths, plugins (pydantic) and strictness are in pyproject.toml's [tool.mypy].
	$(VENV)/bin/mypy

# proto/openapi.json: the contract other languages generate clients from, as the server serves
# it (tests/e2e/test_openapi.py fails until this is rerun after a change to the API).
openapi: $(INSTALLED)
	$(PY) -m hooklab_server.api.export_openapi proto/openapi.json

serve: $(INSTALLED)  # SERVE_ARGS="--model gpt2 --port 8001" to change
	$(VENV)/bin/hooklab-server $(SERVE_ARGS)

# Each benchmark prints a table of medians and ratios against its reference, measured in the
# same run; the whole set takes about half an hour on 2 cores. BENCH=codec runs one of them.
BENCH ?= codec engine capture_invariance remote notebook generate patching gradients load scaled_out traced_hooks
bench: $(INSTALLED)
	for name in $(BENCH); do echo "== bench/$$name.py"; $(PY) bench/$$name.py; done

clean:
	rm -rf $(VENV)
