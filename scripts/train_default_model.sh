#!/usr/bin/env bash
# Reproduce the shipped default model (iicats_cv/data/default_model.safetensors) with the
# project's own commands, from ../shared/data (never shipped to users) and the synthetic
# generator. Usage: bash scripts/train_default_model.sh [WORKDIR] [ITERATIONS]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/iicats-train}
iterations=${2:-1500}
data="$here/../shared/data"
mkdir -p "$work"
python - "$data/flyem_medulla_fib_250.npz" "$work/fib_train.npz" <<'PY'
import sys, numpy as np
src = np.load(sys.argv[1])
# training half only: z < 150 (z >= 150 is held out for evaluation and the demo)
np.savez(sys.argv[2], image=src["image"][:150], neurons=src["neurons"][:150])
PY
iicats import "$work/fib_train.npz" "file://$work/fib/image" --type image --key image \
  --resolution 10,10,10 --overwrite
iicats import "$work/fib_train.npz" "file://$work/fib/neurons" --type segmentation \
  --key neurons --resolution 10,10,10 --overwrite
iicats synthetic "file://$work/synthetic" --shape 160,160,128 --resolution 10,10,10 --seed 1
iicats train \
  --image "file://$work/fib/image" --labels "file://$work/fib/neurons" \
  --nuclei none --mitochondria none --synapses none \
  --image "file://$work/synthetic/image" --labels "file://$work/synthetic/neurons" \
  --nuclei "file://$work/synthetic/nuclei" --mitochondria "file://$work/synthetic/mitochondria" \
  --synapses "file://$work/synthetic/synapses" \
  --iterations "$iterations" --out "$here/iicats_cv/data/default_model.safetensors"
