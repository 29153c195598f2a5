# Two commands: `make demo` (the main job) and `make test` (what CI runs). Both create .venv if missing.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.nbsupport-installed
ARGS   ?=

.PHONY: demo test lint smoke fixture paper venv lab clean-runs

$(STAMP): requirements.txt pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)  ## run every notebook on the offline default into runs/<timestamp>-demo/
	$(VPY) -m nbsupport run --profile demo $(ARGS)

test: $(STAMP)  ## ruff (lint + format check), pytest, every notebook in smoke, then in fixture (the real path offline)
	$(VENV)/bin/ruff check nbsupport tests benchmarks notebooks
	$(VENV)/bin/ruff format --check nbsupport tests benchmarks notebooks
	$(VPY) -m pytest -q
	$(VPY) -m nbsupport run --profile smoke $(ARGS)
	$(VPY) -m nbsupport run --profile fixture $(ARGS)

lint: $(STAMP)  ## ruff lint + format check only
	$(VENV)/bin/ruff check nbsupport tests benchmarks notebooks
	$(VENV)/bin/ruff format --check nbsupport tests benchmarks notebooks

smoke: $(STAMP)
	$(VPY) -m nbsupport run --profile smoke $(ARGS)

fixture: $(STAMP)  ## every notebook on the paper code paths, offline: fixtures in the official layouts, random weights
	$(VPY) -m nbsupport run --profile fixture $(ARGS)

paper: $(STAMP)  ## real weights and datasets (needs downloads and a GPU)
	$(VPY) -m nbsupport run --profile paper $(ARGS)

# JupyterLab on a working copy: notebooks/*.ipynb are copied once into runs/lab/notebooks/ (git-ignored;
# delete a copy to get the tracked version again), so autosave never writes outputs into tracked files.
# --allow-root only when run as root.
LAB_DIR := runs/lab/notebooks

lab: $(STAMP)  ## JupyterLab on runs/lab/notebooks/ (working copies of notebooks/)
	@mkdir -p $(LAB_DIR)
	@for f in notebooks/*.ipynb; do test -e $(LAB_DIR)/$$(basename $$f) || cp $$f $(LAB_DIR)/; done
	$(VENV)/bin/jupyter lab --notebook-dir=$(LAB_DIR) $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(ARGS)

clean-runs:
	rm -rf runs/
