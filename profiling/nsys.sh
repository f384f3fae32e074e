#!/usr/bin/env bash
# Nsight Systems over a short training window: steps START..STOP of a run on random-initialised
# weights (no download), NVTX on, captured between cudaProfilerStart/Stop; then the summary of
# time per NVTX range and per kernel.
#
#   profiling/nsys.sh [OUT_PREFIX] [extra sdpo-train flags...]
#   e.g. profiling/nsys.sh runs/nsys/sd15 --preset sd15-dpo --compile
#
# Environment: PRESET (default sd15-dpo), STEPS (default 4:8, optimizer steps), PAIRS (default 8).
set -euo pipefail
out=${1:-runs/nsys/step}
shift || true
preset=${PRESET:-sd15-dpo}
window=${STEPS:-4:8}
stop=${window#*:}
command -v nsys >/dev/null || { echo "nsys not found: install Nsight Systems" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
nsys profile --force-overwrite=true --output "$out" \
    --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi --capture-range-end=stop \
    python -m sdpo.train --preset "$preset" --pretrained random \
        --output-dir "$out-run" --max-steps "$stop" --gradient-accumulation 1 \
        --train-batch-pairs "${PAIRS:-8}" --warmup-steps 0 --checkpoint-every 0 \
        --nvtx --profile-steps "$window" --no-progress "$@"
nsys export --type sqlite --force-overwrite=true --output "$out.sqlite" "$out.nsys-rep"
python -m sdpo.profiling.cli nsys-summary "$out.sqlite" --json "$out-summary.json"
