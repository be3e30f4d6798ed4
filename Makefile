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

demo: $(ENV) $(DEMO_DATA) $(TINY_MODEL)
	@echo "demo corpus: dataset/MAIR-Docs, dataset/MAIR-Queries; tiny model: models/tiny-llama"
	$(PY) -c "import mair_config, file_io; [print(f'{t:12s} {sum(1 for _ in file_io.iter_jsonl(mair_config.docs_path(t))):5d} docs {sum(1 for _ in file_io.iter_jsonl(mair_config.queries_path(t))):5d} queries') for t in mair_config.DEMO_TASK_DOMAIN]"

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
	rm -rf dataset/MAIR-Docs dataset/MAIR-Queries dataset/MAIR-Data models/tiny-llama out
