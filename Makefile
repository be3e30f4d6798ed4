# make test   - create the environment if missing, build the demo data and tiny model, run all tests
# make demo   - same environment, then run the pipeline on the offline demo corpus
#
# Environment: a local .venv by default. Reuse your own with `make test VENV=/path/to/venv`
# (installed into once, then reused), or use an interpreter as it is, installing nothing, with
# `make test PY=python`. TORCH picks the PyTorch requirement installed before everything else.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
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

.PHONY: test demo data model env clean

test: $(ENV) $(DEMO_DATA) $(TINY_MODEL)
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

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/python -m pip install -q -r requirements-dev.txt
	touch $@

$(DEMO_DATA): dataset/build_demo.py
	$(PY) -m dataset.build_demo
	touch $@

$(TINY_MODEL): models/build_tiny.py $(DEMO_DATA)
	$(PY) -m models.build_tiny

clean:
	rm -rf dataset/MAIR-Docs dataset/MAIR-Queries dataset/MAIR-Data models/tiny-* models/genir out log
