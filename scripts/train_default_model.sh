#!/usr/bin/env bash
# Reproduce the shipped default model (iicats_cv/data/default_model.safetensors) with the
# project's own commands, from ../shared/data (never shipped to users) and the synthetic
# generator. ITERATIONS from random weights (validating on the top 20% of each volume's z
# range: FIB z 101-149), then one fine-tuning round per comma-separated entry of FINETUNE,
# each from the previous checkpoint (--init: a fresh one-cycle schedule at half the peak
# learning rate; round k uses seed k unless its entry gives one); an entry ITERATIONS:V sets
# --val-fraction V (0: train on all of z < 150 as well), ITERATIONS:V:SEED the seed too.
# Then FOCUS iterations (0: none) that draw 40% of the patches where the dark FIB bodies of the
# training half lie (ground-truth neurons of 10,000 voxels or more whose mean intensity is
# below 105: the glia the model split and leaked through; docs/MEASUREMENTS.md), seed 13.
# Last, `iicats calibrate` chooses the organelle cuts on the synthetic volume and the
# agglomeration setting on the FIB training half, and records them in the shipped checkpoint.
# Usage: bash scripts/train_default_model.sh [WORKDIR] [ITERATIONS] [FINETUNE] [FOCUS]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/iicats-train}
iterations=${2:-1600}
finetune=${3:-1200:0,6000:0:11,6000:0:12}
focus=${4:-2500}
data="$here/../shared/data"
mkdir -p "$work"
python - "$data/flyem_medulla_fib_250.npz" "$work/fib_train.npz" <<'PY'
import sys, numpy as np
src = np.load(sys.argv[1])
# training half only: z < 150 (z >= 150 is held out for evaluation and the demo)
np.savez(sys.argv[2], image=src["image"][:150], neurons=src["neurons"][:150])
PY
dark=$(python - "$work/fib_train.npz" <<'PY'
import sys, numpy as np
half = np.load(sys.argv[1])
ids, inverse, voxels = np.unique(half["neurons"], return_inverse=True, return_counts=True)
mean = np.bincount(inverse.ravel(), weights=half["image"].ravel().astype(float)) / voxels
print(",".join(str(i) for i in ids[(ids > 0) & (voxels >= 10000) & (mean < 105)]))
PY
)
iicats import "$work/fib_train.npz" "file://$work/fib/image" --type image --key image \
  --resolution 10,10,10 --overwrite
iicats import "$work/fib_train.npz" "file://$work/fib/neurons" --type segmentation \
  --key neurons --resolution 10,10,10 --overwrite
iicats synthetic "file://$work/synthetic" --shape 160,160,128 --resolution 10,10,10 --seed 1
layers=(--image "file://$work/fib/image" --labels "file://$work/fib/neurons"
        --nuclei none --mitochondria none --synapses none
        --image "file://$work/synthetic/image" --labels "file://$work/synthetic/neurons"
        --nuclei "file://$work/synthetic/nuclei"
        --mitochondria "file://$work/synthetic/mitochondria"
        --synapses "file://$work/synthetic/synapses")
iicats train "${layers[@]}" --iterations "$iterations" --out "$work/default_base.safetensors"
previous="$work/default_base.safetensors"
IFS=, read -ra rounds <<< "$finetune"
for k in "${!rounds[@]}"; do
  IFS=: read -r round_iterations val_fraction seed <<< "${rounds[$k]}"
  seed=${seed:-$((k + 1))}
  target="$work/default_finetune$((k + 1)).safetensors"
  iicats train --init "$previous" "${layers[@]}" --iterations "$round_iterations" --lr 1e-3 \
    --seed "$seed" --val-fraction "${val_fraction:-0.2}" --out "$target"
  previous=$target
done
if [ "$focus" -gt 0 ]; then
  target="$work/default_focus.safetensors"
  iicats train --init "$previous" "${layers[@]}" --iterations "$focus" --lr 1e-3 --seed 13 \
    --val-fraction 0 --focus-labels "$dark" --focus-fraction 0.4 --out "$target"
  previous=$target
fi
# the operating point: organelle probability cuts on the synthetic training volume (the only
# one with organelle masks), then the agglomeration (statistic, evidence at those cuts,
# threshold) on the FIB training half
shipped="$here/iicats_cv/data/default_model.safetensors"
iicats calibrate --checkpoint "$previous" --image "file://$work/synthetic/image" \
  --nuclei "file://$work/synthetic/nuclei" --mitochondria "file://$work/synthetic/mitochondria" \
  --synapses "file://$work/synthetic/synapses" --out "$shipped"
iicats calibrate --checkpoint "$shipped" --image "file://$work/fib/image" \
  --labels "file://$work/fib/neurons" --out "$shipped"
