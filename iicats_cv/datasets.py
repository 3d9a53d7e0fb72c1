"""The embedded demo datasets, written out as precomputed layers with their ground truth.

- `fib`: the FIB-SEM crop shipped in `iicats_cv/data/fib_heldout_crop.npz` (held-out half of
  the FlyEM medulla cube) with dense neuron labels; GT skeletons are derived with kimimaro.
- `synthetic`: `iicats_cv.synthetic` volumes with nuclei, mitochondria, synapses and GT
  skeletons, which exercise bERL, nERL and tracking.
"""
from __future__ import annotations

import csv
import os

import numpy as np

from .errors import IicatsError
from .layers import join, local_path, normalize_cloudpath, layer_exists
from .volume_io import import_volume

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
FIB_CROP = os.path.join(DATA_DIR, "fib_heldout_crop.npz")


def load_fib_crop():
  """-> (image uint8 (x,y,z), neurons uint32 (x,y,z), resolution nm (x,y,z))."""
  with np.load(FIB_CROP) as npz:
    image = npz["image"].transpose(2, 1, 0).copy()
    neurons = npz["neurons"].transpose(2, 1, 0).copy()
    resolution = tuple(float(r) for r in npz["resolution_nm_xyz"])
  return image, neurons, resolution


def write_points_csv(path, header, rows):
  with open(path, "w", newline="") as fh:
    writer = csv.writer(fh)
    writer.writerow(header)
    for row in rows:
      writer.writerow([f"{v:.3f}" for v in row])


def prepare_demo(dataset: str, out: str, synthetic_shape=(160, 160, 96), seed: int = 0) -> dict:
  """Write the dataset's image and ground truth under OUT/ and return the pipeline inputs:
  {"image", "gt_labels", "gt_skeletons", "nuclei", "synapses"} (paths/cloudpaths or None)."""
  from .skeletons import write_swc, skeletons_from_labels
  out = normalize_cloudpath(out)
  root = local_path(out)
  if root is None:
    raise IicatsError(f"--out {out}: the demo writes its ground truth files locally; use a "
                      "local folder (run `iicats pipeline` for gs:// or s3:// data)")
  gt_dir = os.path.join(root, "ground_truth")
  swc_dir = os.path.join(gt_dir, "skeletons")
  inputs = {"image": join(out, "image"), "gt_labels": join(out, "ground_truth", "neurons"),
            "gt_skeletons": swc_dir, "nuclei": None, "synapses": None}
  if layer_exists(inputs["image"]) and os.path.isdir(swc_dir):
    # already prepared by an earlier (interrupted) run: resume
    for name in ("nuclei", "synapses"):
      path = os.path.join(gt_dir, f"{name}.csv")
      inputs[name] = path if os.path.exists(path) else None
    return inputs
  if dataset == "fib":
    image, labels, resolution = load_fib_crop()
    skeletons = skeletons_from_labels(labels, resolution)
    source = "iicats_cv/data/fib_heldout_crop.npz (FlyEM medulla FIB-SEM, z >= 150)"
  elif dataset == "synthetic":
    from .synthetic import make_synthetic_volume
    vol = make_synthetic_volume(shape=synthetic_shape, resolution=(10, 10, 10), seed=seed)
    image, labels, resolution = vol.image, vol.neurons, vol.resolution
    skeletons = vol.skeletons
    source = f"iicats_cv.synthetic.make_synthetic_volume(shape={synthetic_shape}, seed={seed})"
  else:
    raise IicatsError(f"--dataset must be fib or synthetic, got '{dataset}'")
  os.makedirs(swc_dir, exist_ok=True)
  import_volume(labels, inputs["gt_labels"], "segmentation", resolution, source=source,
                overwrite=True)
  for skeleton in skeletons:
    write_swc(skeleton, os.path.join(swc_dir, f"{_skeleton_id(skeleton)}.swc"))
  if dataset == "synthetic":
    inputs["nuclei"] = os.path.join(gt_dir, "nuclei.csv")
    inputs["synapses"] = os.path.join(gt_dir, "synapses.csv")
    write_points_csv(inputs["nuclei"], ["x", "y", "z"], vol.nucleus_points_nm)
    write_points_csv(inputs["synapses"],
                     ["pre_x", "pre_y", "pre_z", "post_x", "post_y", "post_z"],
                     np.asarray(vol.synapses_nm).reshape(-1, 6))
  # the image goes last: its presence marks a complete preparation
  import_volume(image, inputs["image"], "image", resolution, source=source, overwrite=True)
  return inputs


def _skeleton_id(skeleton):
  return skeleton["id"] if isinstance(skeleton, dict) else skeleton.id
