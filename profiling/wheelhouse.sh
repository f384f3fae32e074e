#!/usr/bin/env bash
# Downloads, on a machine with package access, the wheels the GPU check needs beyond a CUDA
# PyTorch image (torch, triton, CUDA, transformers 5, accelerate, peft, pytest, numpy, pyyaml,
# tqdm, safetensors, huggingface_hub already there), pinned, for manylinux x86_64 and
# Python 3.11 and 3.12. No torch, triton or CUDA wheel is ever fetched (--no-deps, explicit list).
# Python 3.10 is refused: the pinned diffusers (0.42) and importlib_metadata (10.2) need >= 3.11,
# and CI (Python 3.11) never runs the older releases 3.10 would need.
#
#   bash profiling/wheelhouse.sh DIR [--python 3.11|3.12] [--full]
#
# Default set (16 MB for Python 3.12, 26 MB for 3.11 and 3.12): diffusers and its imports
# missing from the image (importlib_metadata, zipp, pillow) and nvtx. --full adds what only
# real-data training and sdpo-eval use (pyarrow, matplotlib, tensorboard and their
# dependencies; 99 MB in all for 3.12). On the GPU node, profiling/gpu_check.sh --wheels DIR
# installs them with `pip install --no-index --no-deps --find-links DIR --target DIR/site`,
# leaving the image untouched.
set -euo pipefail

usage="usage: bash profiling/wheelhouse.sh DIR [--python 3.11|3.12 ...] [--full]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
dir=$1
shift
pythons=()
full=0
while [ $# -gt 0 ]; do
    case $1 in
        --python)
            [ $# -ge 2 ] || { echo "wheelhouse: --python needs a version, e.g. 3.12" >&2; exit 2; }
            case $2 in
                3.11 | 3.12) pythons+=("$2") ;;
                *) echo "wheelhouse: --python $2 unsupported; expected 3.11 or 3.12 (the pinned diffusers needs >= 3.11)" >&2; exit 2 ;;
            esac
            shift 2
            ;;
        --full) full=1; shift ;;
        *) echo "wheelhouse: unknown argument $1; $usage" >&2; exit 2 ;;
    esac
done
[ ${#pythons[@]} -gt 0 ] || pythons=(3.11 3.12)

# Versions the CPU CI runs with (the .venv of the README's install block), so the GPU node runs
# the same library code the tests cover.
packages=(
    diffusers==0.42.1
    importlib_metadata==10.2.0
    zipp==4.1.2
    pillow==13.0.0
    nvtx==0.2.17
)
if [ "$full" = 1 ]; then
    packages+=(
        pyarrow==26.0.1
        matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0
        kiwisolver==1.5.1 pyparsing==3.3.3 python-dateutil==4.0.0 six==1.17.0
        tensorboard==2.21.0 tensorboard-data-server==0.7.2 grpcio==1.85.3 protobuf==7.36.2
        absl-py==2.3.1 Markdown==3.11.3 Werkzeug==3.1.9 MarkupSafe==3.0.3
    )
fi

mkdir -p "$dir"
for python in "${pythons[@]}"; do
    echo "wheelhouse: Python $python -> $dir"
    python3 -m pip download --quiet --dest "$dir" --only-binary=:all: --no-deps \
        --python-version "$python" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
        "${packages[@]}"
done
if ls "$dir" | grep -Eiq '^(torch|triton|nvidia)[-_]'; then
    echo "wheelhouse: a torch/triton/CUDA wheel is in $dir; remove it" >&2
    exit 1
fi
echo "wheelhouse: $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir"
