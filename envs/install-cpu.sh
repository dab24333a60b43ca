#!/usr/bin/env bash
# Install batchflip with everything the default run and the tests need, on a CPU machine.
# torch first, from pip (the CPU build; uv would not find it), so nothing resolves a CUDA
# torch. Then the pinned versions of envs/cpu-lock.txt without running a resolver: with uv
# (fast, parallel) by default, or with plain pip when BATCHFLIP_INSTALLER=pip or when uv
# cannot be installed. bench/bench_install.py times both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
INSTALLER=${BATCHFLIP_INSTALLER:-uv}
UV_VERSION=0.13.9
$PY -m pip install -q torch==2.13.0
if [ "$INSTALLER" = uv ] && $PY -m pip install -q "uv==$UV_VERSION"; then
  $PY -m uv pip install -q --python "$PY" --no-deps -r envs/cpu-lock.txt
  $PY -m uv pip install -q --python "$PY" --no-deps -e .
else
  [ "$INSTALLER" = pip ] || echo "install-cpu.sh: uv unavailable, installing with pip" >&2
  $PY -m pip install -q --no-deps -r envs/cpu-lock.txt
  $PY -m pip install -q --no-deps -e .
fi
$PY - <<'PY'
import torch, transformers, snakemake
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"snakemake {snakemake.__version__}")
PY
