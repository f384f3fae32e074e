#!/usr/bin/env bash
# The GPU check's code on the torch of the GPU image it is written for (2.11, CUDA 13 build, with
# its pinned Triton 3.6), on the CPU, before a rare GPU slot is spent on it. CI runs torch 2.13
# (the only CPU build installable there); the GPU image's torch is older, so an API that 2.11
# lacks, or a keyword it does not take, would fail only there. Not in CI: it downloads the
# multi-GB CUDA wheel and its CUDA libraries (4.6 GB installed, ~3 minutes from a fast mirror).
#
#   bash tests/torch_floor.sh            # torch 2.11.0
#   bash tests/torch_floor.sh 2.12.0     # another torch
#
# Installs that torch (with its CUDA libraries, which it needs to import) into the venv
# .toolchain/torch-VERSION, which also sees the project venv's packages (diffusers, pytest...),
# then runs there, on this checkout's code:
# 1. tools/torch_api_check.py: every torch name and keyword in the source, GPU-only paths
#    included (what no CPU test executes), ~10 s;
# 2. the tests of the code the GPU check runs (op layer, CUDA twin, compile, CUDA-graph
#    accumulation, fp16 scaling, the check itself) with Triton under its interpreter, ~3 min;
# 3. profiling/gpu_check.sh --dry-run, ~1 min.
# Measured with 2.11.0 on 2 busy cores: all three pass (and the whole suite but test_readme.py
# and test_packaging.py, which install packages: 2,080 passed, 208 skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.11.0}
python=${PYTHON:-python}
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
    python=.venv/bin/python
fi
target=$PWD/.toolchain/torch-$version
floor=$target/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}

if ! "$floor" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$version')" \
    2>/dev/null; then
    rm -rf "$target"
    "$python" -m venv "$target" || exit 1
    # After the new venv's own site-packages: the project venv's (its torch is shadowed), with
    # its own .pth files processed (a venv may chain to another one through a .pth file).
    "$python" -c "import sysconfig; print(f'import site; site.addsitedir({sysconfig.get_paths()[\"purelib\"]!r})')" \
        >"$(ls -d "$target"/lib/python3*/site-packages)/zz_project_venv.pth"
    "$floor" -m pip install --quiet "torch==$version" || {
        echo "torch_floor: could not install torch $version" >&2
        exit 1
    }
fi
"$floor" -c "import torch, triton; print('torch_floor: torch', torch.__version__, 'triton', triton.__version__, 'from', torch.__file__)"
if ! "$floor" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$version')"; then
    echo "torch_floor: $floor imports another torch" >&2
    exit 1
fi

failed=()
PYTHONPATH=$PWD "$floor" tools/torch_api_check.py || failed+=("torch_api_check")
PYTHONPATH=$PWD TRITON_INTERPRET=1 "$floor" -m pytest -q -p no:cacheprovider \
    tests/test_torch_api_check.py tests/test_triton_backend.py tests/test_cuda_backend.py \
    tests/test_cuda_compile.py tests/test_compile.py tests/test_objectives.py \
    tests/test_validation.py tests/train/test_cuda_graphs_accumulation.py \
    tests/train/test_nonfinite_on_device.py tests/train/test_perf_flags.py \
    tests/train/test_resume_state.py tests/test_gpu_check.py tests/test_profiling.py ||
    failed+=("tests")
VIRTUAL_ENV=$target PYTHON=$floor bash profiling/gpu_check.sh --dry-run \
    --out runs/torch-floor-dry || failed+=("gpu_check --dry-run")
if [ ${#failed[@]} -gt 0 ]; then
    echo "torch_floor: torch $version: FAILED: ${failed[*]}"
    exit 1
fi
echo "torch_floor: torch $version: ok"
