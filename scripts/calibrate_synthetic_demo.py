"""Choose the synthetic demo's agglomeration thresholds on synthetic volumes other than the
demo's, so that the demo's constrained-vs-baseline comparison is not tuned on what it scores.

`iicats demo --dataset synthetic` scores the volume of seed 0; the default model was trained
on seed 1's. This runs the demo's pipeline (same shape, model and evidence; no meshes) on
the volumes of --seeds (default 2-5), sweeps the agglomeration threshold for the constrained
and the unconstrained agglomeration on the same fragments, and prints, for each, the
threshold with the highest mean bERL over the seeds: the values DEMO_AGGLOMERATION in
iicats_cv/cli.py carries.

  python scripts/calibrate_synthetic_demo.py [--seeds 2-5] [-p 2] [--json OUT]
"""
import argparse
import json
import tempfile

import numpy as np
from tqdm import tqdm

from iicats_cv.cli import DEMO_AGGLOMERATION
from iicats_cv.datasets import prepare_demo
from iicats_cv.tasks.pipeline import run_pipeline

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.2, 0.801, 0.05))
RUNS = (("constrained", "sweep"), ("baseline", "baseline_sweep"))


def sweep_seed(seed: int, parallel: int, root: str) -> dict:
  """{"constrained": {t: row}, "baseline": {t: row}} of the demo pipeline on seed's volume."""
  out = f"file://{root}/seed{seed}"
  inputs = prepare_demo("synthetic", out, seed=seed)
  setting = {k: v for k, v in DEMO_AGGLOMERATION["synthetic"].items()
             if k not in ("threshold", "baseline_threshold")}
  summary = run_pipeline(inputs["image"], out, parallel=parallel, meshes=False, report=False,
                         gt_labels=inputs["gt_labels"], gt_skeletons=inputs["gt_skeletons"],
                         nuclei=inputs["nuclei"], synapses=inputs["synapses"],
                         threshold=max(THRESHOLDS), sweep=THRESHOLDS, **setting)
  return {name: {row["threshold"]: row for row in summary["metrics"][key]}
          for name, key in RUNS}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", default="2-5", help="FIRST-LAST (0 is the demo's, 1 the "
                                                     "training volume's)")
  parser.add_argument("-p", "--parallel", type=int, default=2)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  first, _, last = args.seeds.partition("-")
  seeds = list(range(int(first), int(last or first) + 1))
  if {0, 1} & set(seeds):
    parser.error("seeds 0 (the demo's volume) and 1 (the training volume) are not for "
                 "calibration")
  runs = {}
  with tempfile.TemporaryDirectory(prefix="iicats-demo-calibration-") as root:
    for seed in tqdm(seeds, desc="seeds"):
      runs[seed] = sweep_seed(seed, args.parallel, root)
  chosen = {}
  print(f"{'t':>5}" + "".join(f"{name + ' bERL':>18}{'merged syn.':>12}" for name, _ in RUNS))
  for t in THRESHOLDS:
    cells = []
    for name, _ in RUNS:
      rows = [runs[s][name][t] for s in seeds]
      cells.append(f"{np.mean([r['berl'] for r in rows]):18.0f}"
                   f"{np.mean([r['n_merged_synapses'] for r in rows]):12.1f}")
    print(f"{t:5.2f}" + "".join(cells))
  for name, _ in RUNS:
    means = {t: float(np.mean([runs[s][name][t]["berl"] for s in seeds])) for t in THRESHOLDS}
    best = max(means, key=means.get)
    chosen[name] = {"threshold": best, "mean_berl": means[best]}
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"seeds": seeds, "chosen": chosen,
                 "runs": {s: {n: list(r.values()) for n, r in run.items()}
                          for s, run in runs.items()}}, fh, indent=1, default=str)
  print(f"seeds {args.seeds}: constrained t={chosen['constrained']['threshold']} (mean bERL "
        f"{chosen['constrained']['mean_berl']:.0f} nm), baseline "
        f"t={chosen['baseline']['threshold']} ({chosen['baseline']['mean_berl']:.0f} nm); "
        f"ratio {chosen['constrained']['mean_berl'] / chosen['baseline']['mean_berl']:.2f}")


if __name__ == "__main__":
  main()
