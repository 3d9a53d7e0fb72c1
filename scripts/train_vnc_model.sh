#!/usr/bin/env bash
# Reproduce the shipped ssTEM organelle model (iicats_cv/data/vnc_model.safetensors) with the
# project's own commands, from ../shared/data/vnc_sstem_stack1.npz (never shipped to users):
# mitochondria and synapses of sections 0-11 (12-19 are held out for evaluation).
# ITERATIONS from random weights, then one fine-tuning round per comma-separated entry of
# FINETUNE, each from the previous checkpoint (--init: a fresh one-cycle schedule at half the
# peak learning rate; round k uses seed k, so other random patches). An entry ITERATIONS:W
# adds W times a soft Dice loss on the organelles (--dice-weight W); ITERATIONS:W:V also sets
# --val-fraction V (0: train on all 12 sections; the default 0.2 holds sections 7-11 out for
# validation, since a validation patch must be 4 sections deep). Last, `iicats calibrate`
# chooses each organelle's probability cut on sections 0-11 and records it in the checkpoint.
# Usage: bash scripts/train_vnc_model.sh [WORKDIR] [ITERATIONS] [OUT] [FINETUNE]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/iicats-train-vnc}
iterations=${2:-2400}
out=${3:-$here/iicats_cv/data/vnc_model.safetensors}
finetune=${4:-1200,1200,1200,1200:1,1200:1,1200:1:0,1200:1:0}
data="$here/../shared/data"
mkdir -p "$work"
python - "$data/vnc_sstem_stack1.npz" "$work/vnc_train.npz" <<'PY'
import sys, numpy as np
src = np.load(sys.argv[1])
# training sections only: 0-11 (12-19 are held out)
np.savez(sys.argv[2], image=src["image"][:12],
         mitochondria=src["mitochondria"][:12].astype(np.uint8),
         synapses=src["synapses"][:12].astype(np.uint8))
PY
resolution=4.6,4.6,47
iicats import "$work/vnc_train.npz" "file://$work/vnc/image" --type image --key image \
  --resolution $resolution --chunk-size 128,128,12 --overwrite
for key in mitochondria synapses; do
  iicats import "$work/vnc_train.npz" "file://$work/vnc/$key" --type segmentation --key $key \
    --resolution $resolution --chunk-size 128,128,12 --overwrite
done
layers=(--image "file://$work/vnc/image" --labels none --nuclei none
        --mitochondria "file://$work/vnc/mitochondria" --synapses "file://$work/vnc/synapses")
iicats train --anisotropic --patch-size 128,128,4 --batch-size 4 "${layers[@]}" \
  --iterations "$iterations" --out "$work/vnc_base.safetensors"
previous="$work/vnc_base.safetensors"
IFS=, read -ra rounds <<< "$finetune"
for k in "${!rounds[@]}"; do
  seed=$((k + 1))
  target="$work/vnc_finetune$seed.safetensors"
  IFS=: read -r round_iterations dice_weight val_fraction <<< "${rounds[$k]}"
  iicats train --init "$previous" --batch-size 4 "${layers[@]}" \
    --iterations "$round_iterations" --lr 1e-3 --seed "$seed" \
    --dice-weight "${dice_weight:-0}" --val-fraction "${val_fraction:-0.2}" --out "$target"
  previous=$target
done
# the organelles' probability cuts on the training sections
iicats calibrate --checkpoint "$previous" --image "file://$work/vnc/image" \
  --mitochondria "file://$work/vnc/mitochondria" --synapses "file://$work/vnc/synapses" \
  --out "$out"
