# The project's verbs. `make serve` and `make test` are all a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENTOML := $(VENV)/bin/bentoml

# Service settings (HISTO_*, see .env.example) from an optional .env file.
-include .env
export $(filter HISTO_%,$(.VARIABLES))

# Benchmarks and `make model-report` write under artifacts/ unless UPDATE_DOCS=1 asks them to update
# the tracked BENCHMARKS.md, loadtests/results/ and docs/model-report/.
UPDATE_DOCS ?=
export UPDATE_DOCS
MODEL_REPORT_DIR := $(if $(filter 1 true yes,$(UPDATE_DOCS)),docs/model-report,artifacts/model-report)

export BENTOML_DO_NOT_TRACK ?= true
export TF_CPP_MIN_LOG_LEVEL ?= 2

SYNTHETIC_DIR ?= data/synthetic
PER_CLASS ?= 400
SEED ?= 0
DATA ?= $(SYNTHETIC_DIR)/lung_image_sets
ARCH ?= cnn
MODEL_NAME ?= lung_histopathology
TRAIN_ARGS ?=
MPP ?=
COMPARE_ARGS ?= --input-size 128 --epochs 10
PYTEST_ARGS ?=
HOST ?= 0.0.0.0
PORT ?= 3000
MODEL_TAG ?=
SERVING_LOCK := requirements/serving.lock.txt

LOADTEST_HOST ?= http://127.0.0.1:3000
USERS ?= 32
SPAWN_RATE ?= 8
DURATION ?= 30s
# Seconds `make loadtest` waits for the service's /readyz before starting Locust.
READY_TIMEOUT ?= 300

.PHONY: help setup system-deps data model train model-report compare serve build containerize lock-serving test lint bench-model benchmark cpu-budget slide-benchmark engine decoders runtimes loadtest resilience mutation settings-table docs-check clean

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' \
		'{ name[NR] = $$1; what[NR] = $$2; if (length($$1) > width) width = length($$1) } \
		END { for (i = 1; i <= NR; i++) printf "  %-" width "s  %s\n", name[i], what[i] }'

setup: $(VENV)/.installed ## virtual environment with the pinned dependencies

$(VENV)/.installed: requirements/serving.txt requirements/runtimes.txt requirements/dev.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt -c requirements/constraints.txt
	touch $@

# Debian packages the browser test (Playwright drives Debian's Chromium: no browser download) and
# the container test (buildah, debootstrap: no Docker daemon) need, and kubectl (Debian's
# kubernetes-client) unless one is installed: the engine manifests are rendered with `kubectl kustomize`.
DEBIAN_TEST_PACKAGES ?= chromium fonts-dejavu-core buildah runc debootstrap uidmap \
	$(shell command -v kubectl >/dev/null || echo kubernetes-client)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

system-deps: ## Debian packages the tests need (apt-get, once)
	@missing=$$(for package in $(DEBIAN_TEST_PACKAGES); do 		dpkg-query -W -f='$${Status}' $$package 2>/dev/null | grep -q "install ok installed" || echo $$package; done); 	if [ -n "$$missing" ]; then 		echo "installing Debian packages:" $$missing; 		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; 	fi

data: $(SYNTHETIC_DIR)/lung_image_sets/dataset.json ## synthetic LC25000-layout tiles (PER_CLASS per class)

# dataset.json (the tiles' pixel size) is the generator's last file: a folder without it, e.g. one drawn
# before it existed, is drawn again (the same seed gives the same tiles).
$(SYNTHETIC_DIR)/lung_image_sets/dataset.json: | setup
	$(PY) -m synthetic.tiles --out $(SYNTHETIC_DIR) --per-class $(PER_CLASS) --seed $(SEED)

model: setup ## the default model in the BentoML store, trained if the store has none
	@if tag=$$($(PY) -m models.store --check $(MODEL_NAME):latest 2>/dev/null); then \
		echo "model $(MODEL_NAME) already in the store and servable: $$tag"; \
	else \
		$(MAKE) --no-print-directory data && $(MAKE) --no-print-directory train; \
	fi

train: setup ## train on DATA (default: the synthetic tiles; MPP: their microns per pixel) into the store
	$(PY) -m training.train --data $(DATA) --arch $(ARCH) --name $(MODEL_NAME) \
		$(if $(MPP),--microns-per-pixel $(MPP)) $(TRAIN_ARGS)

model-report: model ## the default model's evaluation report (Markdown + figures) into artifacts/model-report/ (UPDATE_DOCS=1: docs/model-report/)
	$(PY) -m training.report --model $(MODEL_NAME):latest --out $(MODEL_REPORT_DIR)

compare: data ## train every architecture on one split, one table (artifacts/compare/comparison.md)
	$(PY) -m training.compare --data $(DATA) --out artifacts/compare $(COMPARE_ARGS)

serve: model ## setup, the default model if the store has none, then the service on PORT (3000)
	$(BENTOML) serve service:Histopathology --host $(HOST) --port $(PORT)

build: model ## the versioned Bento, pinned to MODEL_TAG (default: newest MODEL_NAME), reused if nothing changed; last line: its tag
	@model_tag="$(MODEL_TAG)"; \
	if [ -z "$$model_tag" ]; then model_tag=$$($(PY) -m models.store $(MODEL_NAME):latest) || exit 1; fi; \
	$(PY) -m deploy.bento_build $$model_tag

containerize: model ## the Bento's OCI image: Docker if a daemon answers, else buildah on a Debian base; prints tag and size
	@command -v docker >/dev/null || $(MAKE) --no-print-directory system-deps
	@bento_tag=$$($(MAKE) -s --no-print-directory build | tail -1) && $(PY) -m deploy.oci build $$bento_tag

lock-serving: ## regenerate requirements/serving.lock.txt: serving.txt resolved under constraints.txt in a clean venv
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -r requirements/serving.txt -c requirements/constraints.txt
	{ echo "# Every package the Bento installs, pinned (generated by \`make lock-serving\` from"; \
	  echo "# serving.txt + constraints.txt; do not edit by hand)."; \
	  .venv-lock/bin/pip freeze --all --exclude pip --exclude setuptools --exclude wheel; } > $(SERVING_LOCK)
	rm -rf .venv-lock

bench-model: setup ## in-process images/s of the default architecture, batch 1..64
	$(PY) -m loadtests.inprocess

benchmark: model ## service vs compute limit, BentoML floor and attainable bound, and a seed-style baseline; into artifacts/benchmarks/ (UPDATE_DOCS=1: BENCHMARKS.md)
	$(PY) -m loadtests.benchmark --model $(MODEL_NAME):latest

cpu-budget: model ## where the CPU goes per request and per image (/predict, 32-tile /predict_batch): py-spy samples of every worker under load; into artifacts/benchmarks/ (UPDATE_DOCS=1: BENCHMARKS.md)
	$(PY) -m loadtests.cpu_budget --model $(MODEL_NAME):latest

slide-benchmark: model ## whole slides: accuracy on a synthetic slide with ground truth, tiles/s vs /predict, /predict under slides, memory on a 1 GB slide, the Dask engine vs in process; into artifacts/benchmarks/ (UPDATE_DOCS=1: BENCHMARKS.md)
	$(PY) -m loadtests.slide_bench --model $(MODEL_NAME):latest
	$(PY) -m loadtests.engine_bench --model $(MODEL_NAME):latest

engine: setup ## a Dask scheduler at HISTO_DASK_SCHEDULER (default tcp://127.0.0.1:8786) and one slide worker per core, in the foreground
	$(PY) -m slides.cluster

decoders: model ## JPEG decoders (Pillow with DCT scaling, simplejpeg) for the model input: agreement, CPU, end-to-end bound, decision; into artifacts/benchmarks/ (UPDATE_DOCS=1: BENCHMARKS.md)
	$(PY) -m loadtests.decoders --model $(MODEL_NAME):latest

runtimes: model ## the model under LiteRT, ONNX Runtime and OpenVINO vs TensorFlow: agreement, images/s, decision; into artifacts/benchmarks/ (UPDATE_DOCS=1: BENCHMARKS.md)
	$(PY) -m loadtests.runtimes --model $(MODEL_NAME):latest

loadtest: setup ## headless Locust against a running service (LOADTEST_HOST, USERS, DURATION); SLO gate = exit code
	$(PY) -m loadtests.wait_ready $(LOADTEST_HOST) --timeout $(READY_TIMEOUT)
	mkdir -p loadtests/results
	$(VENV)/bin/locust -f loadtests/locustfile.py --headless --host $(LOADTEST_HOST) -u $(USERS) -r $(SPAWN_RATE) \
		-t $(DURATION) --stop-timeout 10 --csv loadtests/results/locust --html loadtests/results/locust.html --only-summary

resilience: model ## overload at 4x capacity, recovery, a killed worker, a 10,000-request soak (prints figures)
	$(PY) -m loadtests.resilience --model $(MODEL_NAME):latest

test: setup system-deps ## every test group, as CI runs them
	$(PY) -m pytest $(PYTEST_ARGS)

# The modules and the test groups are listed once, in pyproject.toml's [tool.mutmut]; MUTANTS picks a subset
# by mutmut's names (e.g. MUTANTS='models.prediction.*'), scored on its own.
MUTANTS ?=
MUTATION_CHILDREN ?= 2
# One TensorFlow intra-op thread per child: the children already fill the cores, and each spawns its pool afresh.
mutation: setup ## mutation testing (mutmut) of the modules every request crosses: score per module, at least 85%
	rm -rf mutants
	TF_NUM_INTRAOP_THREADS=1 OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATION_CHILDREN) $(MUTANTS)
	$(PY) -m tests.mutation_score $(if $(MUTANTS),--partial)

lint: setup ## ruff (style, imports, bandit security rules)
	$(VENV)/bin/ruff check .

settings-table: setup ## rewrite the README's settings table from config/settings.py
	$(PY) -m docscheck settings-table

docs-check: setup ## the README's runnable commands and example outputs against the real ones (tests/test_readme.py)
	$(PY) -m pytest tests/test_readme.py $(PYTEST_ARGS)

clean: ## remove generated data and run artefacts (not the model store)
	rm -rf data artifacts .pytest_cache build
