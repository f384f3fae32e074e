#!/usr/bin/env bash
# The GPU validation in one time-boxed command (sdpo/profiling/gpu_check.py does the phases):
#
#   bash profiling/gpu_check.sh --wheels DIR --out OUT [--budget-s 520] [--dry-run]
#
# DIR: the folder `bash profiling/wheelhouse.sh DIR` filled on a connected machine (installed
# with --no-index --no-deps into DIR/site; the image's torch, triton and CUDA are not touched).
# OUT: gpu_check.json, gpu_check.md, gpu_check.log (and ncu.csv when ncu is present).
# --dry-run: CPU, tiny sizes, about a minute; CI runs it so the script cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
    python=.venv/bin/python
fi
# The repository first on the path: `python -m sdpo...` runs this checkout's code, installed or
# not (all Python code is under sdpo/).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m sdpo.profiling.gpu_check "$@"
