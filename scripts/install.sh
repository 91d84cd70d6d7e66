#!/usr/bin/env bash
# Install runner and its dependencies into the active Python environment (a venv is recommended):
#   python3 -m venv .venv && . .venv/bin/activate && bash scripts/install.sh
#   EXTRAS=vllm bash scripts/install.sh      # on a GPU machine: also vLLM, for step.rollout.backend=vllm
#
# torch is installed first so that the right build is chosen:
#   - a machine with an NVIDIA GPU (nvidia-smi works) gets PyPI's default Linux wheel, which is the CUDA build;
#   - a machine without one gets the CPU build (torch==$CPU_TORCH+cpu), never the multi-GB CUDA wheel. Where no
#     local wheel or index provides it, set TORCH_INDEX to PyTorch's CPU wheel index and run again.
# A torch that is already installed is kept. Set TORCH_SPEC to force a specific requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
CPU_TORCH=${CPU_TORCH:-2.13.0}
PIP="python -m pip"

if python -c "import torch" 2>/dev/null; then
  echo "install: keeping the installed torch $(python -c 'import torch; print(torch.__version__)')"
else
  if [ -n "${TORCH_SPEC:-}" ]; then
    spec=$TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch>=2.4"          # CUDA build from PyPI
  else
    spec="torch==${CPU_TORCH}+cpu"
  fi
  echo "install: $spec"
  if ! $PIP install "$spec" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}; then
    echo "install: could not install $spec. On a CPU machine set TORCH_INDEX to PyTorch's CPU wheel index" \
         "(or TORCH_SPEC to a torch requirement you can install) and run again." >&2
    exit 1
  fi
fi
# DeepSpeed builds its ops just in time when they are first used (DS_BUILD_OPS=0): no CUDA toolkit needed to install.
# EXTRAS=vllm adds vLLM for step.rollout.backend=vllm (GPU machines only; it brings its own CUDA torch build).
extras="dev${EXTRAS:+,$EXTRAS}"
if [[ ",${EXTRAS:-}," == *",vllm,"* ]] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  echo "install: EXTRAS=vllm: vLLM runs on NVIDIA GPUs and this machine has none (nvidia-smi finds no GPU);" \
       "install without it and use step.rollout.backend=hf here" >&2
  exit 2
fi
DS_BUILD_OPS=0 $PIP install -e ".[$extras]"
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  # On CPU DeepSpeed's all-reduce between ranks is a C++ op compiled on first use (a minute or more, into
  # ~/.cache/torch_extensions): compile it now rather than inside the first run.
  echo "install: compiling DeepSpeed's CPU communication op (once)"
  DS_ACCELERATOR=cpu python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)" \
    || echo "install: could not compile DeepSpeed's CPU communication op now; DeepSpeed will try again in the first run" >&2
fi
python -c "import torch, deepspeed, transformers; print(f'install: torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, cuda available: {torch.cuda.is_available()}')"
