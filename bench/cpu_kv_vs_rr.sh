#!/usr/bin/env bash
# KV-aware routing against round-robin across two real-model (SmolLM2 on the CPU) workers, one run:
# 8 shared prefixes of 512 tokens + 32 tokens of their own, 16 output tokens, 4 concurrent streams.
# Each worker's KV pool holds 160 blocks of 16 tokens, about four prefixes, so where a request
# lands decides whether its prefix is still cached. Prints both and the round-robin/kv ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
state=$(mktemp -d)
up="env TOKENYARD_WORKER_CPU__NUM_KV_BLOCKS=160 .venv/bin/tokenyard up --detach --workers 2 \
  --discovery dir://$state/discovery --state-dir $state --http-port 38000 --grpc-port 38001 \
  --router-port 38100 --planner-port 38200 --gms-metrics-port 38401 --worker-port 38300 \
  --worker-metrics-port 39300"
down=".venv/bin/tokenyard down --state-dir $state"
exec .venv/bin/python -m bench.loadgen --target http://127.0.0.1:38000 --target http://127.0.0.1:38000 \
  --labels kv,round-robin \
  --setup-a "$up --router-mode kv" --teardown-a "$down" \
  --setup-b "$up --router-mode round-robin" --teardown-b "$down" \
  --concurrency 4 --num-requests 64 --warmup 8 --num-prefixes 8 --prefix-len 512 --suffix-len 32 \
  --output-len 16 --ignore-eos --prompt-format tokens --name cpu_kv_vs_rr "$@"
