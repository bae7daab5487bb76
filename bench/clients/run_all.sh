#!/usr/bin/env bash
# Drives the standard KServe / Triton / OpenAI benchmark clients, unchanged, against a Tokenyard
# deployment of mocker workers, and prints what each one measured:
#
#   perf-analyzer-kserve-stream     perf_analyzer --streaming, BYTES prompts, KServe gRPC
#   genai-perf-kserve-tensorrtllm   genai-perf --endpoint-type kserve --backend tensorrtllm (gRPC)
#   genai-perf-kserve-vllm          genai-perf --endpoint-type kserve --backend vllm (gRPC)
#   genai-perf-chat                 genai-perf --endpoint-type chat --streaming (OpenAI HTTP)
#   aiperf-chat-stream              aiperf --endpoint-type chat --streaming (OpenAI HTTP)
#
# Starts `tokenyard up --engine mocker` on private loopback ports, runs the clients one after the
# other, stops the deployment and exits non-zero when any client failed or any run completed fewer
# requests than asked or reported errors (bench/clients/summarize.py reads the tools' exports).
#
# Usage: bench/clients/run_all.sh [--requests N] [--concurrency C] [--input-tokens I]
#          [--output-tokens O] [--port-base P] [--workers W] [--speedup X] [--out DIR]
#          [--only RUN[,RUN...]] [--model-version V] [--skip-install]
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

requests=100
concurrency=2
input_tokens=128
output_tokens=32
port_base=18000
workers=2
speedup=1
out=bench/results/clients
only=""
model_version=""
skip_install=0
tools=.tools
python=${PYTHON:-.venv/bin/python}
model=SmolLM2-135M-Instruct

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case $1 in
    --requests) requests=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --input-tokens) input_tokens=$2; shift 2 ;;
    --output-tokens) output_tokens=$2; shift 2 ;;
    --port-base) port_base=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --speedup) speedup=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --model-version) model_version=$2; shift 2 ;;
    --skip-install) skip_install=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

http_port=$port_base
grpc_port=$((port_base + 1))
grpc_url=127.0.0.1:$grpc_port
http_url=http://127.0.0.1:$http_port

if [ "$skip_install" = 0 ]; then
  bash bench/clients/install.sh "$tools" || exit 1
fi
export PATH="$(cd "$tools/bin" && pwd):$PATH"

# Emptied first, but only when it is an output folder of this script (or empty): --out . must not
# wipe a working tree.
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -f "$out/.bench-clients" ]; then
  echo "run_all.sh: $out is not empty and not an output folder of run_all.sh; refusing to empty it" >&2
  exit 2
fi
rm -rf "$out"
mkdir -p "$out"
out=$(cd "$out" && pwd)
touch "$out/.bench-clients"

# genai-perf and aiperf count tokens with a Hugging Face tokenizer; this is the frontend's own.
"$python" bench/clients/export_tokenizer.py "$out/tokenizer" || exit 1

state=$out/deploy
discovery=$(mktemp -d "${TMPDIR:-/tmp}/tokenyard-clients.XXXXXX")
stop_deployment() {
  "$python" -m tokenyard.cli down --state-dir "$state" >/dev/null 2>&1
  rm -rf "$discovery"
}
trap stop_deployment EXIT

echo "== starting $workers mocker worker(s): KServe gRPC $grpc_url, OpenAI HTTP $http_url (logs: $state/up.log)"
if ! TOKENYARD_WORKER_MOCKER__SPEEDUP_RATIO=$speedup "$python" -m tokenyard.cli up --detach \
  --engine mocker --workers "$workers" --model "$model" --discovery "dir://$discovery" \
  --http-port "$http_port" --grpc-port "$grpc_port" \
  --router-port $((port_base + 100)) --planner-port $((port_base + 200)) \
  --worker-port $((port_base + 300)) --gms-metrics-port $((port_base + 401)) \
  --worker-metrics-port $((port_base + 1300)) \
  --state-dir "$state" --log-level warning --ready-timeout 180; then
  tail -n 40 "$state/up.log" >&2
  exit 1
fi

wanted() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }
failed=()
ran=()
# run NAME CMD...: the command's output goes to $out/NAME.log; its artifacts to $out/NAME/.
run() {
  local name=$1
  shift
  wanted "$name" || return 0
  ran+=("$name")
  mkdir -p "$out/$name"
  echo "== $name: $*" | tee "$out/$name.log"
  local started=$SECONDS
  "$@" >>"$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - started)) s"
  if [ "$rc" != 0 ]; then
    failed+=("$name")
    # The tools' own error lines say more than the Python tracebacks that may follow them.
    { grep -m 5 -iE '^error|error:|failed|Thread \[' "$out/$name.log" || tail -n 15 "$out/$name.log"; } |
      sed 's/^/   | /'
  fi
}

pa_version=()
gp_passthrough=()
if [ -n "$model_version" ]; then
  pa_version=(-x "$model_version")
  gp_passthrough=(-- -x "$model_version")
fi

# perf_analyzer sends synthetic data for every input the model declares unless told otherwise,
# and random bytes are no sampling_parameters JSON: give it the prompts, as one does for
# Triton's LLM backends.
"$python" - "$out/perf-analyzer-input.json" "$output_tokens" <<'EOF'
import json, sys
prompts = [
    "Write a short poem about the sea.",
    "Explain what a KV cache is, in two sentences.",
    "List three uses of a hash function.",
    "What is the capital of France? Answer in one word.",
    "Summarize the plot of Hamlet for a ten-year-old.",
]
data = [{"text_input": [p], "stream": [True], "max_tokens": [int(sys.argv[2])]} for p in prompts]
with open(sys.argv[1], "w") as f:
    json.dump({"data": data}, f, indent=1)
EOF

run perf-analyzer-kserve-stream perf_analyzer -m "$model" "${pa_version[@]}" -u "$grpc_url" -i grpc \
  --streaming --input-data "$out/perf-analyzer-input.json" \
  --request-count "$requests" --concurrency-range "$concurrency" \
  -f "$out/perf-analyzer-kserve-stream/perf_analyzer.csv" \
  --profile-export-file "$out/perf-analyzer-kserve-stream/profile_export.json"

# genai-perf: synthetic prompts of $input_tokens tokens, $output_tokens tokens asked for.
genai_perf_common=(
  -m "$model" --tokenizer "$out/tokenizer"
  --synthetic-input-tokens-mean "$input_tokens" --synthetic-input-tokens-stddev 0
  --output-tokens-mean "$output_tokens" --output-tokens-stddev 0
  --num-dataset-entries 50 --request-count "$requests" --concurrency "$concurrency"
  --warmup-request-count 0 --random-seed 7
)
for backend in tensorrtllm vllm; do
  run "genai-perf-kserve-$backend" env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    genai-perf profile "${genai_perf_common[@]}" --endpoint-type kserve --backend "$backend" \
    --streaming -u "$grpc_url" --artifact-dir "$out/genai-perf-kserve-$backend" "${gp_passthrough[@]}"
done
run genai-perf-chat env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  genai-perf profile "${genai_perf_common[@]}" --endpoint-type chat --streaming -u "$http_url" \
  --artifact-dir "$out/genai-perf-chat"

# aiperf 0.13.0 resolves --tokenizer as a hub repository id whenever HF_HUB_OFFLINE or
# TRANSFORMERS_OFFLINE is set, even for a local folder; without them a local folder loads from
# disk and nothing is downloaded. GPU telemetry is off: it polls DCGM exporters on this host.
run aiperf-chat-stream env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE \
  aiperf profile -m "$model" --tokenizer "$out/tokenizer" --endpoint-type chat --streaming \
  -u "$http_url" --prompt-input-tokens-mean "$input_tokens" --prompt-input-tokens-stddev 0 \
  --prompt-output-tokens-mean "$output_tokens" --prompt-output-tokens-stddev 0 \
  --request-count "$requests" --concurrency "$concurrency" --random-seed 7 \
  --ui none --no-gpu-telemetry --workers-max 1 --record-processor-service-count 1 \
  --output-artifact-dir "$out/aiperf-chat-stream"

stop_deployment
trap - EXIT

echo
echo "== results ($requests requests each, concurrency $concurrency, $input_tokens input / $output_tokens output tokens)"
if [ ${#ran[@]} = 0 ]; then
  echo "run_all.sh: --only $only names no run" >&2
  exit 2
fi
runs=$(IFS=,; echo "${ran[*]}")
"$python" bench/clients/summarize.py "$out" --expect "$requests" --runs "$runs"
summary_rc=$?
echo "artifacts: $out (summary.json, one folder and one .log per run)"
if [ ${#failed[@]} != 0 ]; then
  echo "run_all.sh: failed: ${failed[*]}" >&2
  exit 1
fi
exit $summary_rc
