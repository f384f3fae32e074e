#!/usr/bin/env bash
# Full fine-tune of a local SD1.5 folder on your preference data, on one GPU.
#
#   bash train/recipes/sd15-one-gpu.sh /models/stable-diffusion-v1-5 /data/pickapic_v2 runs/sd15
#
# MODEL_DIR: a diffusers SD1.5 folder; DATA: parquet shards, a save_to_disk folder, a JSONL
# manifest or an sdpo-cache folder; OUTPUT_DIR: where metrics, checkpoints and unet/ go. Any
# further arguments are sdpo-train flags and override the ones below (e.g. --max-steps 500).
# PRESET=sd15-dspo or sd15-dmpo picks another method; ACCUMULATION sets the accumulation.
#
# Scaling with one process. The sd15-* presets are the reference scripts' 8 GPUs x 8 pairs x 32
# accumulation = 2048 pairs per optimizer step, with the learning rate per pair (1e-8) multiplied
# by the pairs per step (--scale-lr): 2.048e-5. Run as is on one GPU, a preset step would hold
# 8 x 32 = 256 pairs and get lr 2.56e-6, 8x smaller: linear LR scaling, which the reference never
# ran. This recipe keeps the reference's step instead: 256 accumulation steps of 8 pairs, so each
# optimizer step sees 2048 pairs at lr 2.048e-5 with one safeguard lambda per 8 pairs (group:8),
# the reference run's math; each step takes 8x as long as on 8 GPUs (2000 steps: the same
# 4.1M pair-visits). ACCUMULATION=32 is the 8x cheaper alternative (256 pairs, lr 2.56e-6 by the
# preset's scaling; not validated against the reference). The SD1.5 UNet, its frozen reference
# copy and AdamW state need ~17 GB before activations (18 bytes per trained parameter, 2 for the
# bf16 reference; not measured here): on a smaller card add --gradient-checkpointing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
recipe_arguments "bash train/recipes/sd15-one-gpu.sh" "$@"

exec "$PYTHON" -m sdpo.train \
    --preset "${PRESET:-sd15-dpo}" \
    --pretrained "$MODEL" --data "$DATA" --output-dir "$OUTPUT_DIR" \
    --gradient-accumulation "${ACCUMULATION:-256}" \
    "${RECIPE_EXTRA[@]}"
