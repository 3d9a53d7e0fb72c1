"""The default model's pipeline on the whole held-out half of the FlyEM FIB cube: the region
issue 3's ARAND / VOI goals name (z >= 150, 250×250×100 voxels at 10 nm; the default model
trained on z < 150 only). The `fib` demo scores only its middle 200×200×100 crop.

Data: ../shared/data/flyem_medulla_fib_250.npz (stored z, y, x), imported as precomputed
layers into a temporary directory; then `iicats pipeline` (run_pipeline, the checkpoint's
operating point, no meshes) with the ground-truth neurons. The demo crop's region is also
cut from the same segmentation and scored, so the two regions' figures come from one run.
Reference, in the same run: the unconstrained baseline segmentation; ratio = baseline VOI
(split + merge) / II-CATS VOI.

  python benchmarks/fib_heldout.py [--checkpoint default] [-p 2] [--json OUT]
"""
import argparse
import os
import tempfile

import numpy as np
from cloudvolume import CloudVolume

from iicats_cv.metrics import adapted_rand_error, voi
from iicats_cv.tasks.pipeline import run_pipeline
from iicats_cv.volume_io import import_volume
from bench_report import report

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                    "flyem_medulla_fib_250.npz")
HELD_OUT_Z = 150
CROP_XY = slice(25, 225)  # the fib demo's crop (iicats_cv/data/README.md)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoint", default=None)
  parser.add_argument("-p", "--parallel", type=int, default=2)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  if not os.path.exists(DATA):
    raise SystemExit(f"{DATA}: not found (the benchmark needs ../shared/data beside the repo)")
  source = np.load(DATA)
  image = np.ascontiguousarray(source["image"][HELD_OUT_Z:].transpose(2, 1, 0))
  labels = np.ascontiguousarray(source["neurons"][HELD_OUT_Z:].transpose(2, 1, 0))
  with tempfile.TemporaryDirectory() as work:
    image_path = import_volume(image, f"file://{work}/image", "image", (10, 10, 10))
    labels_path = import_volume(labels, f"file://{work}/neurons", "segmentation",
                                (10, 10, 10))
    summary = run_pipeline(image_path, f"file://{work}/run", parallel=args.parallel,
                           checkpoint=args.checkpoint, gt_labels=labels_path, meshes=False,
                           report=False)
    metrics = summary["metrics"]
    crop = {}
    for key in ("segmentation", "segmentation_baseline"):
      seg = np.asarray(CloudVolume(summary["layers"][key])[:, :, :])[..., 0]
      truth = labels[CROP_XY, CROP_XY]
      split, merge = voi(seg[CROP_XY, CROP_XY], truth)
      prefix = "crop_" + ("baseline_" if key.endswith("baseline") else "")
      crop.update({prefix + "arand": adapted_rand_error(seg[CROP_XY, CROP_XY], truth),
                   prefix + "voi_split": split, prefix + "voi_merge": merge})
  ours = metrics["voi_split"] + metrics["voi_merge"]
  baseline = metrics["baseline_voi_split"] + metrics["baseline_voi_merge"]
  result = {"voxels": int(labels.size), "shape_xyz": list(labels.shape),
            **{key: metrics[key] for key in ("arand", "voi_split", "voi_merge",
                                             "baseline_arand", "baseline_voi_split",
                                             "baseline_voi_merge")},
            **crop, "ratio_voi_vs_baseline": baseline / ours,
            "seconds": summary["timings"].get("total")}
  report(result, f"whole held-out half: ARAND {metrics['arand']:.4f}, VOI "
                 f"{metrics['voi_split']:.3f} / {metrics['voi_merge']:.3f} (baseline ARAND "
                 f"{metrics['baseline_arand']:.4f}, VOI ratio {baseline / ours:.3f}); its "
                 f"demo-crop region ARAND {crop['crop_arand']:.4f}, VOI "
                 f"{crop['crop_voi_split']:.3f} / {crop['crop_voi_merge']:.3f}", args.json)


if __name__ == "__main__":
  main()
