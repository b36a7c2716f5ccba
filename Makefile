# mlunlearn: build the book, run the tests, re-execute the chapters.
#   make book      build the HTML book into _build/html (chapters are committed executed; nothing runs)
#   make test      unit tests + nbval on every chapter + a recheck of the run records + the built book opened
#                  in headless Chromium (the command CI runs)
#   make execute   re-execute every chapter in place, top to bottom (run before committing a chapter)
#   make clean     remove build artefacts (keeps .venv); make distclean also removes .venv

SHELL := /bin/bash
PYTHON ?= python3.11
# Override to use another environment, e.g. `make test VENV="$CONDA_PREFIX"`.
VENV := .venv
BIN := $(VENV)/bin
# Lives inside the venv, so deleting .venv also forces a reinstall.
STAMP := $(VENV)/.mlunlearn-installed
# Installed first and alone: an open torch range pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

# One thread and fixed seeds/hashes: committed outputs are compared byte for byte by nbval.
# Progress bars are off because stderr is compared too; hubs are offline (no network in CI).
NB_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0 \
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 PYDEVD_DISABLE_FILE_VALIDATION=1

NBVAL_FLAGS := --nbval --nbval-current-env --nbval-sanitize-with book/sanitize.cfg
# pytest-xdist workers (CI has 2 cores). Chapters: one whole notebook per worker (loadscope: a notebook is
# one kernel, its cells in order); unit tests: one whole test file per worker (loadfile: module fixtures
# are built once). NB_WORKERS=0 runs everything in this process, one after the other.
NB_WORKERS ?= 2
UNIT_WORKERS ?= 2

.PHONY: all install book test test-unit test-notebooks test-records test-book execute clean distclean

all: book

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the venv is new or pyproject.toml changed since the last install.
# constraints.txt: the exact versions the committed outputs were computed with (a newer accelerate, pillow,
# numpy, ... moves the last digits of the chapters' numbers and fails nbval and the records recheck).
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[all]" -c constraints.txt
	touch $@

install: $(STAMP)

# Warnings are errors (-W); --keep-going still reports them all, and still writes the HTML.
JB_FLAGS := -W --keep-going

book: $(STAMP)
	$(BIN)/jupyter-book build . $(JB_FLAGS)
	@echo "Book: _build/html/index.html"

# -k: run the notebooks even when a unit test fails, so one CI run reports both; exit status stays non-zero.
test: $(STAMP)
	@$(MAKE) --no-print-directory -k test-unit test-notebooks test-records test-book

test-unit: $(STAMP)
	$(NB_ENV) $(BIN)/python -m pytest -n $(UNIT_WORKERS) --dist loadfile tests --ignore=tests/test_rendered_book.py

# pytest exits 5 when it collects nothing (no chapter notebooks, or none with code cells): that alone is
# not a failure here; tests/test_notebooks_executed.py is what fails when a chapter in _toc.yml is missing.
# book/conftest.py prints each chapter's time at the end.
test-notebooks: $(STAMP)
	@rc=0; $(NB_ENV) $(BIN)/python -m pytest -n $(NB_WORKERS) --dist loadscope $(NBVAL_FLAGS) book/ || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "nbval: no notebook cells collected under book/ (not a failure)"; rc=0; fi; \
	exit $$rc

# Chapters load their heavy grids from committed run records (book/records/, mlunlearn.records): this
# recomputes a subset from scratch and fails unless it equals the records exactly (`--all`: every record).
test-records: $(STAMP)
	$(NB_ENV) $(BIN)/python tools/recheck_records.py --jobs 2

# Every page of _toc.yml opened in headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
# figures render, no error output, Colab button and install cell, no JavaScript error from the book's files.
# --all: a full rebuild, so -W sees every page's warnings (an incremental build re-reads only changed pages).
# --noconftest: tests/conftest.py only loads the tiny model (torch), which this test does not use.
# A full-page screenshot of one chapter and the per-page report land in _build/artefacts/.
test-book: $(STAMP)
	$(BIN)/jupyter-book build . --all $(JB_FLAGS)
	$(NB_ENV) MLUNLEARN_BOOK_HTML="$(CURDIR)/_build/html" $(BIN)/python -m pytest --noconftest tests/test_rendered_book.py

execute: $(STAMP)
	$(NB_ENV) $(BIN)/python tools/execute_notebooks.py

clean:
	rm -rf _build .pytest_cache
	find . -path ./.venv -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints -o -name '*.egg-info' \) \
		-type d -prune -exec rm -rf {} +

# Only the project's own .venv, even when VENV points at another environment (e.g. a conda prefix).
distclean: clean
	rm -rf .venv
