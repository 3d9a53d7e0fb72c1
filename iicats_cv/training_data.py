"""Training volumes read from precomputed layers (what `iicats train` feeds to train())."""
from __future__ import annotations

from .errors import IicatsError
from .layers import (IMAGE_DTYPES, box_text, open_layer, read_box, region_bbox,
                     resolution_text, scale_at_resolution, uint8_image)
from .train import TrainingVolume


def _per_image(values, count, name):
  values = list(values)
  if not values:
    return [None] * count
  if len(values) != count:
    raise IicatsError(f"--{name}: given {len(values)} time(s) for {count} --image(s); give one "
                      "per --image ('none' where a dataset has no such labels)")
  return [None if v.lower() == "none" else v for v in values]


def load_training_volumes(images, labels=(), nuclei=(), mitochondria=(), synapses=(),
                          bounds=(), mip=0):
  """Read each dataset's region into memory -> (list[TrainingVolume], resolution nm).

  mip: the images' mip (regions are voxels there); label layers are read at their scale of
  the same resolution."""
  n = len(images)
  columns = {"labels": _per_image(labels, n, "labels"),
             "nucleus": _per_image(nuclei, n, "nuclei"),
             "mitochondria": _per_image(mitochondria, n, "mitochondria"),
             "synapse": _per_image(synapses, n, "synapses")}
  regions = _per_image(bounds, n, "bounds")
  if all(value is None for values in columns.values() for value in values):
    raise IicatsError("nothing to learn from: give --labels or an organelle layer (--nuclei, "
                      "--mitochondria, --synapses) for at least one --image")
  volumes, resolution = [], None
  for i, path in enumerate(images):
    image_cv = open_layer(path, mip=mip, layer_type="image", dtypes=IMAGE_DTYPES,
                          num_channels=1, what="training image")
    box = region_bbox(regions[i], image_cv, path)
    resolution = resolution or tuple(float(r) for r in image_cv.resolution)
    arrays = {"image": uint8_image(image_cv, box, path)}
    for field, values in columns.items():
      if values[i] is None:
        continue
      cv = open_layer(values[i], num_channels=1, what=f"training {field}")
      if field == "labels" and (cv.dtype.kind not in "ui" or cv.layer_type != "segmentation"):
        raise IicatsError(f"training labels {values[i]}: an {cv.layer_type} layer of "
                          f"{cv.dtype.name}; neuron labels are a segmentation layer of integer "
                          "ids")
      cv.mip = scale_at_resolution(cv, image_cv.resolution, f"training {field} {values[i]}")
      if not cv.bounds.contains_bbox(box):
        raise IicatsError(f"training {field} {values[i]}: does not cover {path}'s region "
                          f"{box_text(box)} (voxels at {resolution_text(image_cv.resolution)})")
      arrays[field] = read_box(cv, box, f"training {field}", values[i])[..., 0]
      if field == "labels" and not arrays[field].any():
        raise IicatsError(f"training labels {values[i]}: no labelled voxel in {path}'s region "
                          f"{box_text(box)}")
    volumes.append(TrainingVolume(name=path, **arrays))
  return volumes, resolution
