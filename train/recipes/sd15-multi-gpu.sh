#!/usr/bin/env bash
# Full fine-tune of a local SD1.5 folder on your preference data with torchrun on one machine's
# GPUs (NPROC of them, default 8): the README's multi-GPU command.
#
#   NPROC=8 bash train/recipes/sd15-multi-gpu.sh /models/stable-diffusion-v1-5 /data/pickapic_v2 runs/sd15
#
# MODEL_DIR: a diffusers SD1.5 folder; DATA: parquet shards, a save_to_disk folder, a JSONL
# manifest or an sdpo-cache folder; OUTPUT_DIR: metrics, checkpoints, unet/. Any further arguments
# are sdpo-train flags and override the ones below. PRESET=sd15-dspo, sd15-dmpo (or an sdxl-*
# preset with an SDXL folder) picks another method; ACCUMULATION sets the accumulation.
#
# Scaling with NPROC processes. The presets are the reference scripts' 8 pairs x 32 accumulation
# per GPU on 8 GPUs: 2048 pairs per optimizer step, the per-pair learning rate multiplied by them
# (--scale-lr: 1e-8 x 2048 = 2.048e-5 for SD1.5). With NPROC=8 this recipe is that run exactly.
# With another NPROC the preset alone would change the pairs per step (256 x NPROC) and the
# learning rate with them; this recipe keeps 2048 pairs per step instead, with accumulation
# 256 / NPROC (NPROC must divide 256), so every NPROC runs the reference's optimizer steps and
# learning rate, fewer GPUs taking proportionally longer. ACCUMULATION=32 keeps the preset's
# accumulation and lets the learning rate scale with the pairs instead.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
recipe_arguments "bash train/recipes/sd15-multi-gpu.sh" "$@"
NPROC="${NPROC:-8}"
if [[ ! "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "sd15-multi-gpu.sh: NPROC=$NPROC: expected a whole number of processes (GPUs) >= 1" >&2
    exit 2
fi
if [[ -z "${ACCUMULATION:-}" ]] && (( 256 % NPROC != 0 )); then
    echo "sd15-multi-gpu.sh: NPROC=$NPROC does not divide 256 (2048 pairs per step = 8 x accumulation x NPROC); use 1, 2, 4, 8, ... GPUs or give ACCUMULATION=N" >&2
    exit 2
fi

# python -m torch.distributed.run is torchrun, run by the interpreter that has sdpo installed.
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m sdpo.train \
    --preset "${PRESET:-sd15-dpo}" \
    --pretrained "$MODEL" --data "$DATA" --output-dir "$OUTPUT_DIR" \
    --gradient-accumulation "${ACCUMULATION:-$((256 / NPROC))}" \
    "${RECIPE_EXTRA[@]}"
