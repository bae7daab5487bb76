#!/usr/bin/env bash
# Installs the benchmark clients that bench/clients/run_all.sh drives, each in its own virtualenv
# under .tools/ (their pins conflict with the project's and with each other's):
#
#   .tools/perf-analyzer/   tritonclient 2.51.0, whose wheel carries the perf_analyzer 2.51.0 binary
#   .tools/genai-perf/      genai-perf 0.0.16 (runs perf_analyzer from PATH)
#   .tools/aiperf/          aiperf 0.13.0
#   .tools/bin/             perf_analyzer, genai-perf and aiperf launchers; put it first on PATH
#
# perf_analyzer is linked against libb64 (Debian package libb64-0d, installed with apt when missing)
# and libcudart.so.12 even on machines without a GPU; the CUDA runtime comes from the
# nvidia-cuda-runtime-cu12 wheel and the launcher puts it on LD_LIBRARY_PATH.
#
# Idempotent: a tool whose stamp file matches its pinned version is left alone.
# Usage: bench/clients/install.sh [TOOLS_DIR]   (default .tools, relative to the repository root)
set -euo pipefail
cd "$(dirname "$0")/../.."
tools=${1:-.tools}
python=${PYTHON:-python3}

TRITONCLIENT_VERSION=2.51.0
CUDA_RUNTIME_VERSION=12.9.79
GENAI_PERF_VERSION=0.0.16
AIPERF_VERSION=0.13.0

mkdir -p "$tools/bin"
tools=$(cd "$tools" && pwd)

# venv NAME STAMP PIP_ARGS...: (re)creates $tools/NAME and installs PIP_ARGS unless STAMP is recorded.
venv() {
  local name=$1 stamp=$2
  shift 2
  local dir="$tools/$name"
  if [ -f "$dir/.installed" ] && [ "$(cat "$dir/.installed")" = "$stamp" ]; then
    echo "$name: $stamp already installed"
    return
  fi
  echo "$name: installing $stamp into $dir"
  rm -rf "$dir"
  "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --upgrade pip
  "$dir/bin/python" -m pip install --quiet "$@"
  "$dir/bin/python" -m pip freeze >"$dir/freeze.txt"
  echo "$stamp" >"$dir/.installed"
}

venv perf-analyzer "tritonclient==$TRITONCLIENT_VERSION cudart==$CUDA_RUNTIME_VERSION" \
  "tritonclient==$TRITONCLIENT_VERSION" "nvidia-cuda-runtime-cu12==$CUDA_RUNTIME_VERSION"
venv genai-perf "genai-perf==$GENAI_PERF_VERSION" "genai-perf==$GENAI_PERF_VERSION"
venv aiperf "aiperf==$AIPERF_VERSION" "aiperf==$AIPERF_VERSION"

if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing libb64-0d (perf_analyzer links against it)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null
  else
    echo "error: libb64.so.0d is missing; install it (e.g. sudo apt-get install libb64-0d)" >&2
    exit 1
  fi
fi

cudart=$(find "$tools/perf-analyzer/lib" -path '*nvidia/cuda_runtime/lib' -type d | head -n 1)
if [ -z "$cudart" ]; then
  echo "error: libcudart.so.12 not found under $tools/perf-analyzer" >&2
  exit 1
fi
# Paths relative to the launcher, so that the .tools folder can be moved with the repository.
cat >"$tools/bin/perf_analyzer" <<EOF
#!/usr/bin/env bash
here=\$(cd "\$(dirname "\${BASH_SOURCE[0]}")/.." && pwd)
export LD_LIBRARY_PATH="\$here/${cudart#"$tools/"}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "\$here/perf-analyzer/bin/perf_analyzer" "\$@"
EOF
chmod +x "$tools/bin/perf_analyzer"
ln -sf ../genai-perf/bin/genai-perf "$tools/bin/genai-perf"
ln -sf ../aiperf/bin/aiperf "$tools/bin/aiperf"

# perf_analyzer --version exits non-zero even when it runs; the output tells.
version=$("$tools/bin/perf_analyzer" --version 2>&1 || true)
case $version in
  *"Version $TRITONCLIENT_VERSION"*) ;;
  *)
    echo "error: $tools/bin/perf_analyzer does not run: $version" >&2
    exit 1
    ;;
esac
"$tools/bin/genai-perf" --version >/dev/null
"$tools/bin/aiperf" --version >/dev/null
echo "benchmark clients ready in $tools/bin: perf_analyzer $TRITONCLIENT_VERSION, genai-perf $GENAI_PERF_VERSION, aiperf $AIPERF_VERSION"
