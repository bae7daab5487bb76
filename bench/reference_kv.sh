#!/usr/bin/env bash
# The reference system's KV router (NVIDIA Dynamo's mocker and frontend, from the `ai-dynamo`
# package) and ours on the cache-pressure workload, in one run, with the same load generator:
# 4 mocker workers x 256 KV blocks of 64 tokens at real speed, 16 shared 2000-token prefixes + 100
# tokens of their own, 50 out, 16 streams, 32 warm-up requests left out.
#
#   bench/reference_kv.sh REFERENCE_VENV [REQUESTS]
#
# REFERENCE_VENV is a virtualenv holding ai-dynamo (`pip install --no-deps ai-dynamo==1.6.1
# ai-dynamo-runtime==1.6.1` plus their dependencies; `aisimulate` is not needed for the mocker).
# Everything runs in a private network namespace (`unshare -rn`): the reference binds its event and
# request planes on every interface, and there only loopback exists. Its discovery is a folder.
# Prints the reference's TTFT p50/p90 and hit rate, then `python -m bench.router_kv_vs_rr`'s table
# for ours; JSON in bench/results/reference_kv.json and router_kv_vs_rr.json.
set -euo pipefail

if [ "${1:-}" = "" ] || [ ! -x "$1/bin/python" ]; then
  echo "usage: $0 REFERENCE_VENV [REQUESTS]  (a virtualenv with ai-dynamo installed)" >&2
  exit 2
fi
ref_venv=$(cd "$1" && pwd)
requests=${2:-400}
cd "$(dirname "$0")/.."
root=$(pwd)

if [ "${TOKENYARD_IN_NETNS:-}" != 1 ]; then
  exec env TOKENYARD_IN_NETNS=1 unshare -rn bash "$0" "$ref_venv" "$requests"
fi
ip link set lo up

work=$(mktemp -d /tmp/reference-kv.XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
model_dir=$(.venv/bin/python -c 'from tokenyard.worker.engines.cpu.config import CpuEngineConfig
from tokenyard.worker.engines.cpu.model import load_model, resolve_weights
d, _ = resolve_weights(CpuEngineConfig())
print(d if (d / "config.json").is_file() else load_model(CpuEngineConfig()).weights_dir)')

export DYN_DISCOVERY_BACKEND=file DYN_FILE_KV="$work/kv" DYN_REQUEST_PLANE=tcp DYN_EVENT_PLANE=zmq
export DYN_TCP_RPC_HOST=127.0.0.1 DYN_EVENT_PLANE_HOST=127.0.0.1 DYN_TCP_RESPONSE_STREAM_HOST=127.0.0.1
export DYN_HTTP_HOST=127.0.0.1 DYN_SYSTEM_HOST=127.0.0.1 DYN_HTTP_RPC_HOST=127.0.0.1
for i in 0 1 2 3; do
  "$ref_venv/bin/python" -m dynamo.mocker --model-path "$model_dir" --model-name SmolLM2-135M-Instruct \
    --num-gpu-blocks-override 256 --block-size 64 --speedup-ratio 1 >"$work/mocker-$i.log" 2>&1 &
done
"$ref_venv/bin/python" -m dynamo.frontend --router-mode kv --http-port 8000 >"$work/frontend.log" 2>&1 &
for _ in $(seq 120); do
  workers=$(.venv/bin/python - <<'EOF' 2>/dev/null || echo 0
import json, urllib.request
with urllib.request.urlopen("http://127.0.0.1:8000/v1/models", timeout=2) as r:
    print(len(json.load(r)["data"]))
EOF
)
  [ "$workers" -ge 1 ] && break
  sleep 1
done
sleep 5  # every mocker registered, not only the first
.venv/bin/python -m bench.loadgen --target http://127.0.0.1:8000 --concurrency 16 \
  --num-prefixes 16 --prefix-len 2000 --suffix-len 100 --output-len 50 \
  --num-requests "$requests" --warmup 32 --progress off --output "$work/reference.json" >/dev/null
kill $(jobs -p) 2>/dev/null || true
wait 2>/dev/null || true
.venv/bin/python - "$work/reference.json" "$root/bench/results/reference_kv.json" <<'EOF'
import json, shutil, sys
doc = json.load(open(sys.argv[1]))
s = doc["runs"][-1]["summary"]
print(f"reference kv: TTFT p50 {s['ttft_ms']['p50']:.1f} ms, p90 {s['ttft_ms']['p90']:.1f} ms, "
      f"hit rate {s['cache_hit_rate']:.2f}, failed {s['requests_failed']}")
shutil.copy(sys.argv[1], sys.argv[2])
EOF
.venv/bin/python -m bench.router_kv_vs_rr --requests "$requests"
