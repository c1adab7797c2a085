# The project's verbs. `make serve` and `make test` are all a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENTOML := $(VENV)/bin/bentoml

export BENTOML_DO_NOT_TRACK ?= true
export TF_CPP_MIN_LOG_LEVEL ?= 2

SYNTHETIC_DIR ?= data/synthetic
PER_CLASS ?= 200
SEED ?= 0
DATA ?= $(SYNTHETIC_DIR)/lung_image_sets
ARCH ?= cnn
MODEL_NAME ?= lung_histopathology
TRAIN_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup data model train serve test lint bench-model clean

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## virtual environment with the pinned dependencies

$(VENV)/.installed: requirements/serving.txt requirements/dev.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt -c requirements/constraints.txt
	touch $@

data: $(SYNTHETIC_DIR)/.complete ## synthetic LC25000-layout tiles (PER_CLASS per class)

$(SYNTHETIC_DIR)/.complete: | setup
	$(PY) -m training.synthetic --out $(SYNTHETIC_DIR) --per-class $(PER_CLASS) --seed $(SEED)
	touch $@

model: setup ## the default model in the BentoML store, trained if the store has none
	@if $(BENTOML) models get $(MODEL_NAME):latest >/dev/null 2>&1; then \
		echo "model $(MODEL_NAME) already in the store: $$($(BENTOML) models get $(MODEL_NAME):latest -o json | $(PY) -c 'import json,sys; d = json.load(sys.stdin); print(d["name"] + ":" + d["version"])')"; \
	else \
		$(MAKE) --no-print-directory data && $(MAKE) --no-print-directory train; \
	fi

train: setup ## train on DATA (default: the synthetic tiles) into the store
	$(PY) -m training.train --data $(DATA) --arch $(ARCH) --name $(MODEL_NAME) $(TRAIN_ARGS)

serve: model ## setup, the default model if the store has none, then the service
	@echo "The BentoML service is not built yet (issue 3): make serve stops after make model for now."

bench-model: setup ## in-process images/s of the default architecture, batch 1..64
	$(PY) -m loadtests.inprocess

test: setup ## every test group, as CI runs them
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup ## ruff (style, imports, bandit security rules)
	$(VENV)/bin/ruff check .

clean: ## remove generated data and run artefacts (not the model store)
	rm -rf data artifacts .pytest_cache
