#!/usr/bin/env bash
# Reproduce the shipped ssTEM organelle model (iicats_cv/data/vnc_model.safetensors) with the
# project's own commands, from ../shared/data/vnc_sstem_stack1.npz (never shipped to users):
# mitochondria and synapses of sections 0-11 (12-19 are held out for evaluation).
# Usage: bash scripts/train_vnc_model.sh [WORKDIR] [ITERATIONS] [OUT]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/iicats-train-vnc}
iterations=${2:-2400}
out=${3:-$here/iicats_cv/data/vnc_model.safetensors}
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
iicats train --anisotropic --patch-size 128,128,4 --batch-size 4 \
  --image "file://$work/vnc/image" --labels none --nuclei none \
  --mitochondria "file://$work/vnc/mitochondria" --synapses "file://$work/vnc/synapses" \
  --iterations "$iterations" --out "$out"
