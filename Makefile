# One entry point per job. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
ARCHIVE := model_store/dlrm.mar
# The default model: `small` trained on planted synthetic Criteo data (made once, then cached).
DATA_DIR := data/synthetic
TRAIN_DATA := $(DATA_DIR)/train.tsv
VALIDATION_DATA := $(DATA_DIR)/validation.tsv
DEFAULT_RUN := runs/small-synthetic
TRAIN_ARGS ?= --epochs 2
CURL_EXAMPLE := curl -H "Content-Type: application/json" --data @sample_data/sample_data.json http://127.0.0.1:8080/predictions/dlrm

.PHONY: help install install-gpu check-java data train build serve stop test test-gpu lint clean clean-all

help:
	@echo "make install   create $(VENV) with the pinned dependencies (needs Python 3.11 and a Java 17 JDK)"
	@echo "make train     generate synthetic Criteo data and train the default model (cached in $(DEFAULT_RUN))"
	@echo "make serve     build $(ARCHIVE) from the trained model and serve it on 127.0.0.1:8080 (Ctrl-C stops)"
	@echo "make stop      stop a TorchServe started from this directory"
	@echo "make test      run the whole test suite"
	@echo "make install-gpu / test-gpu   the CUDA build of the dependencies / the tests marked gpu (needs a GPU)"
	@echo "make lint      ruff and mypy over the code"
	@echo "make bench     benchmarks of the reference shape: in-process, served, no-op and the machine's limit (bench/results/)"
	@echo "make test-container  build the container image with Podman, run it and check it (slow)"

check-java:
	@command -v java >/dev/null && command -v javac >/dev/null || { echo "TorchServe and its frontend agent need a Java 17 JDK: install it, e.g. 'apt-get install openjdk-17-jdk-headless'"; exit 1; }
	@java -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])' || { echo "TorchServe needs Java 17 or newer, found: $$(java -version 2>&1 | head -1)"; exit 1; }

$(VENV)/.installed: requirements.txt requirements-torchrec.txt requirements-dev.txt
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version}"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-torchrec.txt
	@# Let a bare `torchserve --start --models dlrm=dlrm.mar` find config.properties (and thus the model store).
	@# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning on the cores the frontend needs.
	@grep -q TS_CONFIG_FILE $(VENV)/bin/activate || printf '%s\n' 'export TS_CONFIG_FILE="$(CURDIR)/config.properties"' 'export OMP_WAIT_POLICY=PASSIVE' >> $(VENV)/bin/activate
	$(PY) -c 'import torch, torchrec, fbgemm_gpu, ts; print("torch", torch.__version__, "| torchrec ok | torchserve", ts.__version__)'
	touch $@

# The frontend agent that config.properties' vmargs load (the OIP model metadata and readiness routes).
AGENT_JAR := frontend_agent/build/dlrm-frontend-agent.jar
$(AGENT_JAR): $(VENV)/.installed $(shell find frontend_agent/src -name '*.java')
	$(PY) -m servers.frontend_agent

# The venv's torchserve launcher reads config.properties' vmargs (the agent, log4j2.xml) only through TS_CONFIG_FILE
# or --ts-config, which activate exports but a unit file or script that only calls .venv/bin/torchserve lacks:
# a .pth runs servers/launcher_hook.py at interpreter start, and it points TS_CONFIG_FILE at ./config.properties
# for the launcher alone (docs/operations.md). Rewritten on every change, so installing again is harmless.
LAUNCHER_HOOK := $(VENV)/.launcher-hook
$(LAUNCHER_HOOK): servers/launcher_hook.py $(VENV)/.installed
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
		&& cp servers/launcher_hook.py "$$site/dlrm_torchserve_launcher.py" \
		&& echo 'import dlrm_torchserve_launcher; dlrm_torchserve_launcher.configure()' > "$$site/dlrm_torchserve_launcher.pth" \
		&& echo "installed the torchserve launcher hook in $$site"
	touch $@

install: check-java $(VENV)/.installed $(AGENT_JAR) $(LAUNCHER_HOOK)

# The CUDA build of the same torch version with the matching fbgemm-gpu (requirements-gpu.txt)
# in place of the two CPU lines of requirements.txt; everything else is shared.
install-gpu: check-java
	$(PYTHON) -m venv $(VENV)
	grep -v -E '^(torch|fbgemm-gpu-cpu)==' requirements.txt | cat - requirements-gpu.txt > $(VENV)/requirements-gpu-selected.txt
	$(PY) -m pip install --quiet -r $(VENV)/requirements-gpu-selected.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-torchrec.txt
	$(PY) -c 'import torch; assert torch.cuda.is_available(), "CUDA is not available"; print(torch.__version__, torch.cuda.get_device_name())'
	touch $(VENV)/.installed
	$(PY) -m servers.frontend_agent

test-gpu: install
	$(PY) -m pytest -m gpu

$(TRAIN_DATA) $(VALIDATION_DATA) &: | $(VENV)/.installed
	@echo "Generating planted synthetic Criteo data in $(DATA_DIR)/ (once)"
	@$(PY) -m training.synthetic --output-dir $(DATA_DIR)

data: install $(TRAIN_DATA)

$(DEFAULT_RUN)/weights.pt: $(TRAIN_DATA) $(VALIDATION_DATA)
	@echo "Training the default model into $(DEFAULT_RUN)/ (once)"
	@$(PY) -m training.train --preset small --train $(TRAIN_DATA) --validation $(VALIDATION_DATA) --output $(DEFAULT_RUN) $(TRAIN_ARGS)

train: install $(DEFAULT_RUN)/weights.pt

build: train
	@echo "Building $(ARCHIVE) from $(DEFAULT_RUN)"
	@$(PY) build_mar.py --checkpoint $(DEFAULT_RUN) --golden-set $(VALIDATION_DATA)

serve: build
	@$(PY) -m servers.torchserve serve --model-store model_store --archive dlrm.mar --log-dir logs --example '$(CURL_EXAMPLE)'

# `make serve` keeps TorchServe's pid file with its logs (logs/); a bare `torchserve --start` in the temp dir.
stop:
	. $(VENV)/bin/activate && if [ -f logs/.model_server.pid ]; then TMPDIR=$(CURDIR)/logs torchserve --stop; else torchserve --stop; fi

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf model_store/*.mar logs .pytest_cache

clean-all: clean
	rm -rf $(DATA_DIR) $(DEFAULT_RUN)

# Benchmarks (bench/, see bench/README.md): `make bench` gives the figures to publish (bench.run, then
# bench.ranking: one user and 100-700 candidates per query, Poisson arrivals) on the reference shape,
# `criteo-kaggle`, trained on the synthetic data; `make bench-quick` (or BENCH_MODE=quick) a smoke test
# in a few minutes on the default `small` model. BENCH_ARGS passes options to `python -m bench.run`,
# e.g. BENCH_ARGS="--sweep", "--profile" or "--archive-args='--quantize-mlp int8'".
BENCH_MODE ?= full
BENCH_ARGS ?=
# The reference shape trained like the default model, once, then cached: 2 epochs of the 1M synthetic
# rows take about 3 minutes on 2 cores (11k rows/s).
BENCH_KAGGLE_RUN := runs/criteo-kaggle-synthetic
BENCH_KAGGLE_TRAIN_ARGS ?= --epochs 2
BENCH_RUN = $(if $(filter quick,$(BENCH_MODE)),$(DEFAULT_RUN),$(BENCH_KAGGLE_RUN))

.PHONY: bench bench-quick check-wrk

$(BENCH_KAGGLE_RUN)/weights.pt: $(TRAIN_DATA) $(VALIDATION_DATA)
	@echo "Training the reference shape (criteo-kaggle) for the benchmarks into $(BENCH_KAGGLE_RUN)/ (once)"
	@$(PY) -m training.train --preset criteo-kaggle --train $(TRAIN_DATA) --validation $(VALIDATION_DATA) --output $(BENCH_KAGGLE_RUN) $(BENCH_KAGGLE_TRAIN_ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

check-wrk:
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get install -y -qq wrk || (apt-get update -qq && apt-get install -y -qq wrk)); } || { echo "The benchmark needs wrk: 'sudo apt-get install wrk'"; exit 1; }

bench: install $(VENV)/.bench-installed check-wrk $(BENCH_RUN)/weights.pt
	$(PY) -m bench.run --mode $(BENCH_MODE) --checkpoint $(BENCH_RUN) $(BENCH_ARGS)
	$(PY) -m bench.ranking --mode $(BENCH_MODE) --checkpoint $(BENCH_RUN)

bench-quick:
	$(MAKE) bench BENCH_MODE=quick

# Container image: build it with Podman, run it, check it from the host (slow, not in `make test`).
.PHONY: test-container
test-container: install
	$(PY) -m deploy.container.test_container
