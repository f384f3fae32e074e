#!/usr/bin/env bash
# LoRA (rank 8) on a local SD1.5 folder and your preference data, on one 24 GB GPU.
#
#   bash train/recipes/sd15-lora-24gb.sh /models/stable-diffusion-v1-5 /data/pickapic_v2 runs/lora
#
# MODEL_DIR: a diffusers SD1.5 folder; DATA: parquet shards, a save_to_disk folder, a JSONL
# manifest or an sdpo-cache folder; OUTPUT_DIR: metrics, checkpoints, the merged unet/ and the
# adapters alone in unet_lora/ (diffusers' LoRA format: pipeline.load_lora_weights(DIR)). Any
# further arguments are sdpo-train flags and override the ones below (the length: --max-steps N;
# --num-epochs would clash with the recipe's --max-steps). PRESET=sd15-dspo or sd15-dmpo picks
# another method (its beta and mu).
#
# Scaling with one process. The sd15-dpo preset's learning rate is per pair and multiplied by the
# pairs per optimizer step (--scale-lr); that rate was tuned for a full fine-tune, not for
# adapters. This recipe turns the scaling off and uses the diffusers Diffusion-DPO LoRA example's
# SD1.5 settings instead: rank 8, lr 1e-5 as an absolute rate, constant with no warmup, 32 pairs
# per optimizer step (here 8 pairs x 4 accumulation: 8 pairs per micro-batch keeps the
# reference's one lambda per 8 pairs, granularity group:8), 10000 steps. With one process nothing
# else scales: the step is 32 pairs whatever the card. Memory: the base UNet is frozen and is also
# the reference (adapters off: no second copy), the adapters and their AdamW state are a few MB,
# and gradient checkpointing keeps the activations of the 16 images per micro-batch small; this
# is what is meant to fit 24 GB, but it has not been measured on a GPU here. If it does not fit,
# halve the micro-batch and double the accumulation (--train-batch-pairs 4
# --gradient-accumulation 8: the same 32 pairs per step).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
recipe_arguments "bash train/recipes/sd15-lora-24gb.sh" "$@"

exec "$PYTHON" -m sdpo.train \
    --preset "${PRESET:-sd15-dpo}" \
    --pretrained "$MODEL" --data "$DATA" --output-dir "$OUTPUT_DIR" \
    --lora-rank 8 --learning-rate 1e-5 --no-scale-lr \
    --lr-scheduler constant --warmup-steps 0 \
    --train-batch-pairs 8 --gradient-accumulation 4 --gradient-checkpointing \
    --max-steps 10000 --checkpoint-every 1000 \
    "${RECIPE_EXTRA[@]}"
