# umedpt: two commands do all set-up on a fresh machine.
#   make test   export check, style (ruff), notebook tests, pytest
#   make book   run the experiment chapters for PROFILE (smoke|cpu|gpu) and build the book into _build/html
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
PROFILE ?= smoke
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# pip prints one line per local index folder it cannot use; keep the log readable
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help test book html env export browser clean-book

help:
	@echo "make test              export check, style (ruff), notebook tests (nbdev_test) and pytest"
	@echo "make book PROFILE=...  run experiment chapters (smoke|cpu|gpu) with papermill, build _build/html"
	@echo "make html              build _build/html from the committed executed chapters (no training)"
	@echo "make env               create or update the project virtualenv in .venv/"
	@echo "make browser           install headless Chromium for the book's browser check (Debian packages)"

env: $(STAMP)

# The virtualenv is rebuilt only when a file that defines it changes.
$(STAMP): requirements.txt constraints.txt setup.py settings.ini tools/verify_env.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.14.1 torchvision==0.29.1 2>&1 | $(QUIET_PIP)
	$(PIP) install -c constraints.txt -r requirements.txt 2>&1 | $(QUIET_PIP)
	$(PIP) install -c constraints.txt --no-deps --no-build-isolation --config-settings editable_mode=compat -e . 2>&1 | $(QUIET_PIP)
	$(PY) tools/verify_env.py
	@touch $@

export: $(STAMP)
	$(VENV)/bin/nbdev_export

test: $(STAMP)
	$(PY) tools/check_sync.py
	$(VENV)/bin/ruff check .
	$(VENV)/bin/nbdev_export
	OMP_NUM_THREADS=1 $(VENV)/bin/nbdev_test --timing --n_workers 2
	$(PY) -m pytest tests

# Only PROFILE=cpu rewrites the published chapters (book/executed, book/data); other profiles write to _preview/
# and the book is built from a staged source that shows them, so `make book` never dirties the tree.
book: $(STAMP) browser
	$(PY) tools/run_experiments.py --profile $(PROFILE)
	$(if $(filter cpu,$(PROFILE)),$(PY) tools/publish_weights.py,@true)  # the published results' weights ship
	$(MAKE) html EXECUTED=$(if $(filter cpu,$(PROFILE)),,_preview/executed)
	$(PY) -m pytest -q -p no:cacheprovider tests/test_book_browser.py

# Headless Chromium + ChromeDriver (Debian packages) for the book's browser check.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }

# Component pages run first into the execution cache (tools/execute_components.py: imports kept, two at a time);
# jupyter-book then renders them from the cache and experiment chapters from their executed copies.
EXECUTED ?=
html: $(STAMP)
	$(PY) tools/execute_components.py
	src="$$($(PY) tools/book_source.py $(if $(EXECUTED),--executed $(EXECUTED)))" && \
	  $(VENV)/bin/jupyter-book build "$$src" --path-output . --builder html --warningiserror --keep-going
	@test -f _build/html/index.html && echo "book: _build/html/index.html"

clean-book:
	rm -rf _build .jupyter_cache _preview
