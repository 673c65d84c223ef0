# rrt: Relaxed Recursive Transformers. `make help` lists the targets.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
SHELL   := /bin/bash
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
NOTEBOOKS := 00_explore 01_init_ablation 02_relaxation_rank_sweep 03_distillation 04_early_exit 05_throughput
STAMP   := $(shell date +%Y%m%d-%H%M%S)
NB      ?= 01_init_ablation
SCALE   ?= smoke
P       ?=
LAB_ARGS ?= --no-browser --ip=127.0.0.1 --port=8888
# one line naming the valid values, before anything is created
CHECK_NB_SCALE = test -f notebooks/$(NB).ipynb || { echo "unknown NB=$(NB); valid: $(NOTEBOOKS)" >&2; exit 2; }; \
	test -f params/$(NB)/$(SCALE).yaml || { echo "unknown SCALE=$(SCALE) for $(NB); valid: $$(cd params/$(NB) && ls *.yaml | sed 's/\.yaml$$//' | tr '\n' ' ')" >&2; exit 2; }

.PHONY: help setup test test-fast demo smoke plan pack run sweep sweep-status report screenshots examples lab strip gpu-check

help:  ## list every target with one line each
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: .venv/.installed  ## create .venv and install rrt (editable) with every dependency [TORCH_INDEX=URL]

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	# torch first, pinned. pip takes the first torch 2.13.0 it finds: a CPU wheel on its find-links path if there is
	# one (this project's machines), else PyPI's Linux default, a CUDA build (GBs). TORCH_INDEX picks the index:
	# make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build anywhere
	$(PIP) install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e .
	# the embedded-model extra, without its CLI's dependencies (see pyproject.toml)
	$(PIP) install --no-deps $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['project']['optional-dependencies']['embedded']))")
	$(PY) -m rrt machine  # the CPU's bf16 flags, torch's build, the precision `auto` picks
	touch $@

test: setup  ## run every test (tiny random models, the real embedded models, every notebook at smoke scale), offline
	$(OFFLINE) $(PY) -m pytest -q -rs

test-fast: setup  ## the fast tier while iterating (under 3 min): leaves out the real models, notebooks and subprocesses
	$(OFFLINE) $(PY) -m pytest -q -rs -m "not real and not notebook and not slow"

plan: setup  ## print a notebook's runs, tokens and H100 hours, no weights loaded: make plan NB=03_distillation SCALE=paper-gemma-2b
	@$(CHECK_NB_SCALE)
	$(OFFLINE) $(PY) -m rrt plan $(NB) $(SCALE)

pack: setup  ## tokenize a plan's corpora into shards before training (a hub corpus needs it): make pack NB=.. SCALE=.. [WORKERS=8] [OUT=DIR]
	@$(CHECK_NB_SCALE)
	$(PY) -m rrt pack $(NB) $(SCALE) --workers $(or $(WORKERS),1) $(if $(OUT),--out $(OUT),)

RUN_DIR = $(CURDIR)/outputs/$(NB)/$(SCALE)-$(STAMP)
# mkdir (no -p) creates the directory or fails: a second run started in the same second takes <dir>-2, -3, ...
# (rrt.rundir.new_run_dir's rule), so two runs never write into one directory
NEW_RUN_DIR = mkdir -p $(dir $(RUN_DIR)); run_dir=$(RUN_DIR); n=1; \
	until mkdir "$$run_dir" 2>/dev/null; do test -d "$$run_dir" || { mkdir "$$run_dir"; exit 1; }; \
	n=$$((n + 1)); run_dir=$(RUN_DIR)-$$n; done
# P as one single-quoted shell word: a list's spaces and brackets reach check-params whole
P_WORD = '$(subst ','\'',$(P))'
run: setup  ## run one notebook: make run NB=01_init_ablation SCALE=cpu [P="steps=20 lr=1e-4 num_blocks=[2, 3]"] (values YAML; outputs/<NB>/<SCALE>-<time>[-n]/)
	@$(CHECK_NB_SCALE)
	@overrides=$$($(OFFLINE) $(PY) -m rrt check-params $(NB) $(SCALE) --yaml $(P_WORD)) || exit 2; \
	$(NEW_RUN_DIR); echo "run directory: $$run_dir"; \
	$(OFFLINE) $(PY) -m rrt.nbrun notebooks/$(NB).ipynb "$$run_dir/$(NB).ipynb" \
	  -f params/$(NB)/$(SCALE).yaml -y "$$overrides" -p run_dir "$$run_dir" --log-output --no-progress-bar

demo: setup  ## the main job: every notebook at cpu scale on the embedded SmolLM2-135M, headless
	set -e; for nb in $(NOTEBOOKS); do $(MAKE) --no-print-directory run NB=$$nb SCALE=cpu STAMP=$(STAMP); done

smoke: setup  ## every notebook at smoke scale (tiny random model; seconds each)
	set -e; for nb in $(NOTEBOOKS); do $(MAKE) --no-print-directory run NB=$$nb SCALE=smoke STAMP=$(STAMP); done

sweep: setup  ## a plan as jobs: make sweep NB=.. SCALE=.. [BACKEND=slurm] [SLURM="--env 'conda activate rrt' --max-time 48:00:00"]; a grid: GRID=params/grids/NAME.yaml
ifdef GRID
	$(OFFLINE) $(PY) -m rrt sweep $(GRID) --backend $(or $(BACKEND),local)
else
	@$(CHECK_NB_SCALE)
	$(PY) -m rrt sweep --notebook $(NB) --scale $(SCALE) --backend $(or $(BACKEND),local) $(if $(filter slurm,$(BACKEND)),$(SLURM))
	$(if $(filter slurm,$(BACKEND)),,$(MAKE) --no-print-directory run NB=$(NB) SCALE=$(SCALE))
endif

sweep-status: setup  ## each run of a swept plan: done / running / interrupted at step N / failed / not started, its log: make sweep-status NB=.. SCALE=..
	@$(CHECK_NB_SCALE)
	@$(OFFLINE) $(PY) -m rrt sweep-status $(NB) $(SCALE)

gpu-check: setup  ## one GPU, offline, minutes: 3 paper-gemma-2b training steps (peak memory vs estimate, tokens/s, MFU), then the serving benchmark [OUT=DIR]; default outputs/gpu-check/<gpu>-<time>/
	$(OFFLINE) $(PY) -m rrt gpu-check $(if $(OUT),--out $(OUT))

report: setup outputs/.widgets/embed-amd.js  ## render every executed notebook under outputs/ to HTML, with an index page
	$(PY) -m rrt report outputs

SHOTS ?=
screenshots: setup outputs/.widgets/embed-amd.js  ## make report, plus full-page PNGs of its pages (headless Chromium) in outputs/screenshots/<time>/ [SHOTS=DIR]
	$(PY) -m rrt report outputs --screenshots $(SHOTS)

examples: setup outputs/.widgets/embed-amd.js  ## regenerate outputs/examples (every notebook at cpu scale, the plans, the screenshots) at this commit; hours (NB="01 04": only those)
	$(OFFLINE) $(PY) -m rrt examples $(if $(filter command line,$(origin NB)),--notebooks $(NB))

# nbconvert's pages load the widget renderer from a CDN: kept beside the report, widgets render offline too.
# Without npm the pages use the CDN (`-`: a failure here does not stop the report).
outputs/.widgets/embed-amd.js:
	-mkdir -p outputs/.widgets && cd outputs/.widgets && \
	  npm pack --silent @jupyter-widgets/html-manager@1.0.15 requirejs@2.3.7 >/dev/null && \
	  tar -xzf jupyter-widgets-html-manager-1.0.15.tgz --strip-components=2 package/dist/embed-amd.js && \
	  tar -xzf requirejs-2.3.7.tgz --strip-components=1 package/require.js && rm -f *.tgz

lab: setup  ## JupyterLab on the notebooks; as root and on a remote node too: make lab LAB_ARGS="--ip=0.0.0.0 --port=8890"
	.venv/bin/jupyter lab notebooks/ --allow-root $(LAB_ARGS)

strip: setup  ## strip outputs from the committed notebooks (keeps diffs reviewable)
	$(PY) -m nbconvert --clear-output --inplace notebooks/*.ipynb
