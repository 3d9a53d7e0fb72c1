"""The embedded demo datasets, written out as precomputed layers with their ground truth.

- `fib`: the FIB-SEM crop shipped in `iicats_cv/data/fib_heldout_crop.npz` (held-out half of
  the FlyEM medulla cube) with dense neuron labels, and the skeletons kimimaro derives from
  them (`fib_heldout_crop_skeletons.npz`, written by `write_fib_crop_skeletons`).
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
FIB_CROP_SKELETONS = os.path.join(DATA_DIR, "fib_heldout_crop_skeletons.npz")


def load_fib_crop():
  """The held-out FIB crop the `fib` demo runs on (200×200×100 voxels of the cube's z ≥ 150
  half, which no shipped model trained or was calibrated on: do not train on it either).
  -> (image uint8 (x,y,z), neurons uint32 (x,y,z), resolution nm (x,y,z))."""
  with np.load(FIB_CROP) as npz:
    image = npz["image"].transpose(2, 1, 0).copy()
    neurons = npz["neurons"].transpose(2, 1, 0).copy()
    resolution = tuple(float(r) for r in npz["resolution_nm_xyz"])
  return image, neurons, resolution


def write_fib_crop_skeletons(path: str = FIB_CROP_SKELETONS) -> str:
  """Skeletonise the FIB crop's neuron labels (skeletons.skeletons_from_labels, kimimaro) and
  store them at path; the demo reads them from there, since kimimaro takes about 8 s on them.
  Run again after changing skeletons_from_labels (tests compare a few labels). Returns path."""
  from .skeletons import skeletons_from_labels
  _, neurons, resolution = load_fib_crop()
  skeletons = skeletons_from_labels(neurons, resolution)
  resolution = np.asarray(resolution, np.float64)
  # voxel indices: skeletons_from_labels puts every node at a voxel centre
  voxels = [np.rint(s.vertices_nm / resolution - 0.5).astype(np.int32) for s in skeletons]
  np.savez_compressed(
    path, ids=np.array([s.id for s in skeletons], np.uint32),
    node_counts=np.array([len(v) for v in voxels], np.int64),
    edge_counts=np.array([len(s.edges) for s in skeletons], np.int64),
    voxels=np.concatenate(voxels), edges=np.concatenate([s.edges for s in skeletons]),
    radii=np.concatenate([s.radii for s in skeletons]).astype(np.float32),
    resolution_nm_xyz=resolution)
  return path


def load_fib_crop_skeletons(path: str = FIB_CROP_SKELETONS) -> list:
  """The FIB crop's ground-truth skeletons (metrics.Skeleton, nodes in nm at voxel centres,
  sorted by id), as write_fib_crop_skeletons stored them."""
  from .metrics import Skeleton
  with np.load(path) as npz:
    resolution = npz["resolution_nm_xyz"]
    node_ends, edge_ends = np.cumsum(npz["node_counts"]), np.cumsum(npz["edge_counts"])
    nodes = np.split((npz["voxels"] + 0.5) * resolution, node_ends[:-1])
    radii = np.split(npz["radii"].astype(np.float64), node_ends[:-1])
    edges = np.split(npz["edges"], edge_ends[:-1])
    return [Skeleton(id=int(i), vertices_nm=v, edges=e, radii=r)
            for i, v, e, r in zip(npz["ids"], nodes, edges, radii)]


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
  image, labels, resolution = load_fib_crop()
  source = "iicats_cv/data/fib_heldout_crop.npz (FlyEM medulla FIB-SEM, z >= 150)"
  import_volume(labels, inputs["gt_labels"], "segmentation", resolution, source=source,
                overwrite=True)
  write_ground_truth_files(gt_dir, load_fib_crop_skeletons())
  # the image goes last: its presence marks a complete preparation
  import_volume(image, inputs["image"], "image", resolution, source=source, overwrite=True)
  return inputs


def _skeleton_id(skeleton):
  return skeleton["id"] if isinstance(skeleton, dict) else skeleton.id
