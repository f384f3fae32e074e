#!/usr/bin/env bash
# The Triton range pyproject.toml declares, tested at its ends: the Triton interpreter tests
# (tests/test_triton_backend.py) and the ahead-of-time sm_80/sm_90 compile
# (tests/test_kernels_compile.py) on the oldest declared Triton and the newest on PyPI. The
# pinned one (the venv's, README install block) runs in the README test block itself.
#
#   bash tests/toolchain_matrix.sh            # every leg
#   bash tests/toolchain_matrix.sh 3.9.0      # one version
#
# Each leg installs that Triton alone (--no-deps) into .toolchain/triton-VERSION and puts it
# first on PYTHONPATH, so it shares the venv's torch (the CPU torch wheel does not pin Triton).
# Cost per leg, measured on 2 busy CPU cores: ~1 min to download Triton (~250 MB) the first
# time, 3-4 min for the interpreter tests, 0.5-2 min for the compiles (less with a warm
# ~/.triton cache); 9.5 min for both legs.
# Torch: only the CPU build of the pinned version is installable in CI (PyPI's older x86_64
# torch wheels are multi-GB CUDA builds), so pyproject's torch bound is that version.
set -uo pipefail
cd "$(dirname "$0")/.."

# version:label. Bump "newest" when PyPI has a newer Triton; "oldest" must match pyproject.toml.
legs=(
    "3.6.0:oldest declared (pyproject triton>=3.6)"
    "3.9.0:newest on PyPI"
)
if [ $# -gt 0 ]; then
    selected=()
    for version in "$@"; do
        found=""
        for leg in "${legs[@]}"; do
            [ "${leg%%:*}" = "$version" ] && selected+=("$leg") && found=1
        done
        [ -n "$found" ] || { echo "toolchain_matrix: no leg for Triton $version" >&2; exit 2; }
    done
    legs=("${selected[@]}")
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
summary=()
failed=0
for leg in "${legs[@]}"; do
    version=${leg%%:*}
    label=${leg#*:}
    target=.toolchain/triton-$version
    started=$SECONDS
    echo "::: Triton $version ($label) :::"
    if ! PYTHONPATH=$target python -c "import sys, triton; sys.exit(triton.__version__ != '$version')" 2>/dev/null; then
        rm -rf "$target"
        if ! python -m pip install --quiet --no-deps --target "$target" "triton==$version"; then
            summary+=("Triton $version ($label): FAILED to install")
            failed=1
            continue
        fi
    fi
    installed=$SECONDS
    # The leg must really import the Triton it names, not the venv's.
    if ! PYTHONPATH=$target python -c "import sys, triton; sys.exit(triton.__version__ != '$version')"; then
        summary+=("Triton $version ($label): FAILED, imports another Triton")
        failed=1
        continue
    fi
    problems=""
    PYTHONPATH=$target TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider \
        tests/test_triton_backend.py || problems+=" interpreter-tests"
    interpreted=$SECONDS
    PYTHONPATH=$target python -m pytest -q -p no:cacheprovider tests/test_kernels_compile.py ||
        problems+=" sm80/sm90-compile"
    status=ok
    if [ -n "$problems" ]; then
        status="FAILED:$problems"
        failed=1
    fi
    summary+=("Triton $version ($label): $status; install $((installed - started)) s, interpreter $((interpreted - installed)) s, compile $((SECONDS - interpreted)) s")
done
echo "::: toolchain matrix :::"
printf '%s\n' "${summary[@]}"
exit $failed
