#!/usr/bin/env bash
# The compare.py comparison on a CUDA GPU, as one command with a time limit:
#
#     benchmarks/gpu.sh [seconds, default 540] [extra compare.py arguments...]
#
# Ours vs transformers on the same workloads (quick plan: one round, bf16 where the GPU has
# bf16 tensor cores), with the GPU's measured matmul ceiling and MFU against both that ceiling
# and the GPU's nominal dense bf16 peak. Writes gpu-results.json and prints the table.
# Exits non-zero with a clear message when there is no CUDA device or the time runs out.
set -euo pipefail
cd "$(dirname "$0")/.."
limit="${1:-540}"
shift || true
python="${PYTHON:-.venv/bin/python}"
[[ -x "$python" ]] || python=python3

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA device visible to $("$python" -c 'import torch; print("torch", torch.__version__)')" \
        "- run this on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status=0
timeout --signal=INT --kill-after=30 "$limit" \
    "$python" benchmarks/compare.py --device cuda --quick --threads "$(nproc)" --timeout 240 \
    --json gpu-results.json "$@" || status=$?
if [[ $status -eq 124 ]]; then
    echo "gpu.sh: stopped after ${limit} s; rerun with a larger limit or fewer --workloads/--metrics" >&2
fi
exit $status
