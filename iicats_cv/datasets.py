"""The embedded demo datasets, written out as precomputed layers with their ground truth.

- `fib`: the FIB-SEM crop shipped in `iicats_cv/data/fib_heldout_crop.npz` (held-out half of
  the FlyEM medulla cube) with dense neuron labels; GT skeletons are derived with kimimaro.
- `synthetic`: `iicats_cv.synthetic` volumes with nuclei, mitochondria, synapses and GT
  skeletons, which exercise bERL, nERL and tracking.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np

from .errors import IicatsError
from .layers import join, local_path, normalize_cloudpath, layer_exists
from .volume_io import import_volume

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
FIB_CROP = os.path.join(DATA_DIR, "fib_heldout_crop.npz")


def load_fib_crop():
  """The held-out FIB crop the `fib` demo runs on (200×200×100 voxels of the cube's z ≥ 150
  half, which no shipped model trained or was calibrated on: do not train on it either).
  -> (image uint8 (x,y,z), neurons uint32 (x,y,z), resolution nm (x,y,z))."""
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


def write_ground_truth_files(gt_dir, skeletons, nuclei_nm=None, synapses_nm=None) -> dict:
  """SWC files (one per skeleton) and nuclei/synapse CSVs (nm) under gt_dir."""
  from .skeletons import write_swc
  swc_dir = os.path.join(gt_dir, "skeletons")
  os.makedirs(swc_dir, exist_ok=True)
  for skeleton in skeletons:
    write_swc(skeleton, os.path.join(swc_dir, f"{_skeleton_id(skeleton)}.swc"))
  paths = {"gt_skeletons": swc_dir, "nuclei": None, "synapses": None}
  if nuclei_nm is not None:
    paths["nuclei"] = os.path.join(gt_dir, "nuclei.csv")
    write_points_csv(paths["nuclei"], ["x", "y", "z"], nuclei_nm)
  if synapses_nm is not None:
    paths["synapses"] = os.path.join(gt_dir, "synapses.csv")
    write_points_csv(paths["synapses"], ["pre_x", "pre_y", "pre_z", "post_x", "post_y", "post_z"],
                     np.asarray(synapses_nm).reshape(-1, 6))
  return paths


def write_synthetic(out: str, shape=(160, 160, 96), resolution=(10, 10, 10), seed: int = 0,
                    image_path: str | None = None, gt_dir: str | None = None) -> dict:
  """A synthetic volume as layers OUT/{neurons,nuclei,mitochondria,synapses}, the image at
  image_path (default OUT/image) and ground truth files in gt_dir (default OUT/ground_truth).
  Returns the paths."""
  from .synthetic import make_synthetic_volume
  out = normalize_cloudpath(out)
  root = local_path(out)
  if root is None:
    raise IicatsError(f"{out}: synthetic data is written to a local folder")
  vol = make_synthetic_volume(shape=tuple(shape), resolution=tuple(resolution), seed=seed)
  source = f"iicats_cv.synthetic.make_synthetic_volume(shape={tuple(shape)}, seed={seed})"
  paths = {name: join(out, name) for name in ("neurons", "nuclei", "mitochondria", "synapses")}
  for name, array in (("neurons", vol.neurons), ("nuclei", vol.nuclei),
                      ("mitochondria", vol.mitochondria), ("synapses", vol.synapse_mask)):
    import_volume(array, paths[name], "segmentation", vol.resolution, source=source,
                  overwrite=True)
  paths.update(write_ground_truth_files(gt_dir or os.path.join(root, "ground_truth"),
                                        vol.skeletons, vol.nucleus_points_nm, vol.synapses_nm))
  # the image goes last: its presence marks a complete dataset
  paths["image"] = import_volume(vol.image, image_path or join(out, "image"), "image",
                                 vol.resolution, source=source, overwrite=True)
  return paths


DEMO_MARKER = "demo.json"  # in OUT/ground_truth: which dataset (and seed) the folder holds


def _demo_text(marker: dict) -> str:
  seed = marker.get("seed")
  return f"the {marker['dataset']} dataset" + ("" if seed is None else f" (seed {seed})")


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as fh:
    return json.load(fh)


def prepare_demo(dataset: str, out: str, seed: int = 0) -> dict:
  """Write the dataset's image and ground truth under OUT/ and return the pipeline inputs:
  {"image", "gt_labels", "gt_skeletons", "nuclei", "synapses"} (paths/cloudpaths or None).
  A folder prepared by an earlier run of the same dataset is reused as it is; one prepared
  for another dataset or seed is refused (IicatsError), so its results are never reported as
  this dataset's."""
  out = normalize_cloudpath(out)
  root = local_path(out)
  if root is None:
    raise IicatsError(f"--out {out}: the demo writes its ground truth files locally; use a "
                      "local folder (run `iicats pipeline` for gs:// or s3:// data)")
  if dataset not in ("fib", "synthetic"):
    raise IicatsError(f"--dataset must be fib or synthetic, got '{dataset}'")
  gt_dir = os.path.join(root, "ground_truth")
  inputs = {"image": join(out, "image"), "gt_labels": join(out, "ground_truth", "neurons"),
            "gt_skeletons": os.path.join(gt_dir, "skeletons"), "nuclei": None,
            "synapses": None}
  wanted = {"dataset": dataset, "seed": seed if dataset == "synthetic" else None}
  if layer_exists(inputs["image"]):
    # folders of older versions have no marker: only the synthetic dataset writes nuclei
    legacy = "synthetic" if os.path.exists(os.path.join(gt_dir, "nuclei.csv")) else "fib"
    found = _read_json(os.path.join(gt_dir, DEMO_MARKER)) or {
      "dataset": legacy, "seed": wanted["seed"] if legacy == "synthetic" else None}
    if found != wanted:
      raise IicatsError(f"--out {out}: holds the demo of {_demo_text(found)}, not of "
                        f"{_demo_text(wanted)}: give another --out")
    for name in ("nuclei", "synapses"):
      path = os.path.join(gt_dir, f"{name}.csv")
      inputs[name] = path if os.path.exists(path) else None
    return inputs
  os.makedirs(gt_dir, exist_ok=True)
  with open(os.path.join(gt_dir, DEMO_MARKER), "w") as fh:
    json.dump(wanted, fh)
  if dataset == "synthetic":
    paths = write_synthetic(join(out, "ground_truth"), seed=seed, image_path=inputs["image"],
                            gt_dir=gt_dir)
    inputs.update({k: paths[k] for k in ("gt_skeletons", "nuclei", "synapses")})
    return inputs
  from .skeletons import skeletons_from_labels
  image, labels, resolution = load_fib_crop()
  source = "iicats_cv/data/fib_heldout_crop.npz (FlyEM medulla FIB-SEM, z >= 150)"
  import_volume(labels, inputs["gt_labels"], "segmentation", resolution, source=source,
                overwrite=True)
  write_ground_truth_files(gt_dir, skeletons_from_labels(labels, resolution))
  # the image goes last: its presence marks a complete preparation
  import_volume(image, inputs["image"], "image", resolution, source=source, overwrite=True)
  return inputs


def _skeleton_id(skeleton):
  return skeleton["id"] if isinstance(skeleton, dict) else skeleton.id
