#!/usr/bin/env bash
# Nsight Compute over the loss kernels of one training step (NVTX range "loss and safeguard" and
# the backward that runs the gradient kernel), inside the cudaProfilerStart/Stop window; then the
# duration and DRAM throughput (% of peak) per kernel.
#
#   profiling/ncu.sh [OUT_PREFIX] [extra sdpo-train flags...]
#
# Environment: PRESET (default sd15-dpo), STEPS (default 3:4), KERNELS (a regex of kernel names,
# default the fused kernels: pair_sums|finalize|gradient).
set -euo pipefail
out=${1:-runs/ncu/loss}
shift || true
preset=${PRESET:-sd15-dpo}
window=${STEPS:-3:4}
stop=${window#*:}
command -v ncu >/dev/null || { echo "ncu not found: install Nsight Compute" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
# --clock-control none: ncu would lock the clocks to base; the GPU's settings stay as they are.
ncu --clock-control none --force-overwrite --export "$out" --profile-from-start off \
    --kernel-name "regex:${KERNELS:-pair_sums|finalize|gradient}" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis \
    python -m sdpo.train --preset "$preset" --pretrained random --loss-backend triton \
        --output-dir "$out-run" --max-steps "$stop" --gradient-accumulation 1 \
        --warmup-steps 0 --checkpoint-every 0 --nvtx --profile-steps "$window" --no-progress "$@"
ncu --import "$out.ncu-rep" --csv --page raw \
    --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
    > "$out.csv"
python -m sdpo.profiling.cli ncu-summary "$out.csv"
