"""The default model's pipeline on the whole held-out half of the FlyEM FIB cube: the region
issue 3's ARAND / VOI goals name (z >= 150, 250×250×100 voxels at 10 nm; the default model
trained on z < 150 only). The `fib` demo scores only its middle 200×200×100 crop.

Data: ../shared/data/flyem_medulla_fib_250.npz (stored z, y, x), imported as precomputed
layers into a temporary directory; then `iicats pipeline` (run_pipeline, the checkpoint's
operating point, no meshes) with the ground-truth neurons. The demo crop's region is also
cut from the same segmentation and scored, so the two regions' figures come from one run.
The affinity layer the run wrote (uint8) is scored against the ground truth's affinities
(affinity_ap, and boundary_ap for the rare boundaries).
The fragment oracle (each fragment given its majority ground-truth neuron) bounds what any
agglomeration of the run's fragments can score; the same bound for the oversegmentation that
ships with the cube (`fragments`, made by NeuroProof's pipeline) puts it in context.
The ground truth runs up to the membranes, so which side each membrane voxel falls on weighs
in every figure; the `*_tolerant` figures leave out the voxels within --boundary-tolerance-nm
(default 10: one voxel) of a ground-truth interface, as CREMI scores (metrics.
boundary_tolerance_mask).
Reference, in the same run: the unconstrained baseline segmentation; ratio = baseline VOI
(split + merge) / II-CATS VOI.

  python benchmarks/fib_heldout.py [--checkpoint default] [-p 2] [--boundary-tolerance-nm 10]
                                   [--tta] [--interior-bonus B] [--json OUT]
"""
import argparse
import os
import tempfile

import numpy as np
from cloudvolume import CloudVolume

from iicats_cv.datasets import FIB_CROP
from iicats_cv.metrics import (adapted_rand_error, affinity_average_precision,
                               boundary_tolerance_mask, voi)
from iicats_cv.tasks.pipeline import run_pipeline
from iicats_cv.train import affinities_from_labels
from iicats_cv.volume_io import import_volume
from bench_report import report
from segmentation import fragment_oracle

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                    "flyem_medulla_fib_250.npz")


def demo_crop_region():
  """(first held-out z, (x, y, z) slices of the held-out half) of the fib demo's crop, from the
  offset and shape it was cut with (iicats_cv/data/README.md)."""
  with np.load(FIB_CROP) as crop:
    z0, y0, x0 = (int(v) for v in crop["source_zyx_offset"])
    _, height, width = crop["image"].shape
  return z0, (slice(x0, x0 + width), slice(y0, y0 + height), slice(None))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoint", default=None)
  parser.add_argument("-p", "--parallel", type=int, default=2)
  parser.add_argument("--boundary-tolerance-nm", type=float, default=10.0)
  parser.add_argument("--tta", action="store_true",
                      help="test-time augmentation in the inference stage (iicats --tta)")
  parser.add_argument("--interior-bonus", type=float, default=None,
                      help="the agglomeration's interior bonus (default: the checkpoint's)")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  if not os.path.exists(DATA):
    raise SystemExit(f"{DATA}: not found (the benchmark needs ../shared/data beside the repo)")
  held_out_z, crop_xy = demo_crop_region()
  with np.load(DATA) as source:
    image = np.ascontiguousarray(source["image"][held_out_z:].transpose(2, 1, 0))
    labels = np.ascontiguousarray(source["neurons"][held_out_z:].transpose(2, 1, 0))
    neuroproof = np.ascontiguousarray(source["fragments"][held_out_z:].transpose(2, 1, 0))
    resolution = tuple(float(r) for r in source["resolution_nm_xyz"])
  with tempfile.TemporaryDirectory() as work:
    image_path = import_volume(image, f"file://{work}/image", "image", resolution)
    labels_path = import_volume(labels, f"file://{work}/neurons", "segmentation", resolution)
    summary = run_pipeline(image_path, f"file://{work}/run", parallel=args.parallel,
                           checkpoint=args.checkpoint, gt_labels=labels_path, meshes=False,
                           report=False, augment=args.tta,
                           interior_bonus=args.interior_bonus)
    metrics = summary["metrics"]
    affinities = np.moveaxis(np.asarray(
      CloudVolume(summary["layers"]["affinities"])[:, :, :])[..., :3], -1, 0)
    if affinities.dtype == np.uint8:
      affinities = affinities.astype(np.float32) / 255
    precision = affinity_average_precision(affinities, *affinities_from_labels(labels))
    keep = boundary_tolerance_mask(labels, resolution, args.boundary_tolerance_nm)
    tolerant = {"boundary_tolerance_nm": args.boundary_tolerance_nm,
                "tolerant_voxel_fraction": float(keep.mean())}
    supervoxels = np.asarray(CloudVolume(summary["layers"]["supervoxels"])[:, :, :])[..., 0]
    segmentation = np.asarray(CloudVolume(summary["layers"]["segmentation"])[:, :, :])[..., 0]
    for prefix, seg in (("", segmentation), ("oracle_", fragment_oracle(supervoxels, labels)),
                        ("neuroproof_oracle_", fragment_oracle(neuroproof, labels))):
      if prefix:
        split, merge = voi(seg, labels)
        tolerant.update({prefix + "arand": adapted_rand_error(seg, labels),
                         prefix + "voi_split": split, prefix + "voi_merge": merge})
      split, merge = voi(seg[keep], labels[keep])
      tolerant.update({prefix + "arand_tolerant": adapted_rand_error(seg[keep], labels[keep]),
                       prefix + "voi_split_tolerant": split,
                       prefix + "voi_merge_tolerant": merge})
    crop = {}
    for key in ("segmentation", "segmentation_baseline"):
      # only the crop's region of the segmentation: the whole half is scored by the pipeline
      seg = np.asarray(CloudVolume(summary["layers"][key])[crop_xy])[..., 0]
      truth = labels[crop_xy]
      split, merge = voi(seg, truth)
      prefix = "crop_" + ("baseline_" if key.endswith("baseline") else "")
      crop.update({prefix + "arand": adapted_rand_error(seg, truth),
                   prefix + "voi_split": split, prefix + "voi_merge": merge})
  ours = metrics["voi_split"] + metrics["voi_merge"]
  baseline = metrics["baseline_voi_split"] + metrics["baseline_voi_merge"]
  result = {"voxels": int(labels.size), "shape_xyz": list(labels.shape),
            **{key: metrics[key] for key in ("arand", "voi_split", "voi_merge",
                                             "baseline_arand", "baseline_voi_split",
                                             "baseline_voi_merge")},
            **precision, **tolerant, **crop, "ratio_voi_vs_baseline": baseline / ours,
            "seconds": summary["timings"].get("total")}
  report(result, f"whole held-out half: ARAND {metrics['arand']:.4f}, VOI "
                 f"{metrics['voi_split']:.3f} / {metrics['voi_merge']:.3f} (baseline ARAND "
                 f"{metrics['baseline_arand']:.4f}, VOI ratio {baseline / ours:.3f}); "
                 f"{args.boundary_tolerance_nm:g} nm from GT interfaces left out: VOI "
                 f"{tolerant['voi_split_tolerant']:.3f} / {tolerant['voi_merge_tolerant']:.3f}; "
                 f"boundary AP {precision['boundary_ap']:.4f}; fragment "
                 f"oracle VOI {tolerant['oracle_voi_split']:.3f} / "
                 f"{tolerant['oracle_voi_merge']:.3f} (tolerant "
                 f"{tolerant['oracle_voi_split_tolerant']:.3f} / "
                 f"{tolerant['oracle_voi_merge_tolerant']:.3f}; NeuroProof's fragments "
                 f"{tolerant['neuroproof_oracle_voi_split']:.3f} / "
                 f"{tolerant['neuroproof_oracle_voi_merge']:.3f}); its "
                 f"demo-crop region ARAND {crop['crop_arand']:.4f}, VOI "
                 f"{crop['crop_voi_split']:.3f} / {crop['crop_voi_merge']:.3f}", args.json)


if __name__ == "__main__":
  main()
