#!/usr/bin/env bash
# NeMo AutoModel in a virtual environment of its own, for the third column of compare.py:
#
#     benchmarks/setup_automodel.sh [VENV_DIR]     (default: ${TMPDIR:-/tmp}/ernie45-bench/automodel-venv)
#     python benchmarks/compare.py --peers automodel [--automodel-python VENV_DIR/bin/python]
#
# What goes in (pinned, so every run compares against the same thing):
#   * torch 2.13.0, the version of the project's own venv (on these machines a local CPU wheel;
#     any other version would pull a multi-GB CUDA build from the index);
#   * nemo-automodel 0.7.0 with --no-deps: its declared dependencies include GPU-only and
#     training-infrastructure packages (megatron-fsdp, quack-kernels, torchao, mistral-common, ...)
#     that its ERNIE 4.5 model, state-dict adapter and MaskedCrossEntropy do not import;
#   * transformers 5.18.0, the version nemo-automodel 0.7.0 pins (its ERNIE classes import
#     transformers' configs and output types), with transformers' own dependencies.
# Running it again only checks: pip leaves satisfied pins alone. It ends with an import check
# (measure.py's "automodel_check" task), the same one compare.py runs before using the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-${AUTOMODEL_VENV:-${TMPDIR:-/tmp}/ernie45-bench/automodel-venv}}"
base_python="${PYTHON:-python3.11}"
TORCH=torch==2.13.0
AUTOMODEL=nemo-automodel==0.7.0
TRANSFORMERS=transformers==5.18.0

pip_install() {
    # NOTE: the filter drops pip's warnings about local index folders that lack a package.
    "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if [[ ! -x "$venv/bin/python" ]]; then
    command -v "$base_python" >/dev/null || {
        echo "setup_automodel.sh: $base_python not found (torch $TORCH needs CPython 3.11; set PYTHON=...)" >&2
        exit 2
    }
    echo "creating $venv with $("$base_python" --version)"
    mkdir -p "$(dirname "$venv")"
    "$base_python" -m venv "$venv"
fi
pip_install "$TORCH"
pip_install "$TRANSFORMERS"
pip_install --no-deps "$AUTOMODEL"
"$venv/bin/python" benchmarks/measure.py '{"kind": "automodel_check", "threads": 1}'
echo "AutoModel ready: python benchmarks/compare.py --peers automodel --automodel-python $venv/bin/python"
