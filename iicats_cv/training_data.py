"""Training volumes read from precomputed layers (what `iicats train` feeds to train())."""
from __future__ import annotations

import numpy as np
from cloudvolume import Bbox

from .errors import IicatsError
from .layers import open_layer
from .train import TrainingVolume


def _per_image(values, count, name):
  values = list(values)
  if not values:
    return [None] * count
  if len(values) != count:
    raise IicatsError(f"--{name}: given {len(values)} time(s) for {count} --image(s); give one "
                      "per --image ('none' where a dataset has no such labels)")
  return [None if v.lower() == "none" else v for v in values]


def region_bbox(text, cv, name):
  """--bounds text (x0,y0,z0,x1,y1,z1 voxels, 'all' or None) -> Bbox inside layer `cv`."""
  if text is None or text == "all":
    return cv.bounds
  try:
    values = [int(v) for v in text.split(",")]
    assert len(values) == 6
  except (ValueError, AssertionError):
    raise IicatsError(f"--bounds {text}: expected x0,y0,z0,x1,y1,z1 or 'all'")
  box = Bbox(values[:3], values[3:])
  if not cv.bounds.contains_bbox(box):
    raise IicatsError(f"--bounds {text}: outside the bounds {cv.bounds} of {name}")
  return box


def load_training_volumes(images, labels=(), nuclei=(), mitochondria=(), synapses=(),
                          bounds=()):
  """Read each dataset's region into memory -> (list[TrainingVolume], resolution nm)."""
  n = len(images)
  columns = {"labels": _per_image(labels, n, "labels"),
             "nucleus": _per_image(nuclei, n, "nuclei"),
             "mitochondria": _per_image(mitochondria, n, "mitochondria"),
             "synapse": _per_image(synapses, n, "synapses")}
  regions = _per_image(bounds, n, "bounds")
  volumes, resolution = [], None
  for i, path in enumerate(images):
    image_cv = open_layer(path, layer_type="image", dtypes=("uint8",), num_channels=1,
                          what="training image")
    box = region_bbox(regions[i], image_cv, path)
    resolution = resolution or tuple(float(r) for r in image_cv.resolution)
    arrays = {"image": np.asarray(image_cv[box])[..., 0]}
    for field, values in columns.items():
      if values[i] is None:
        continue
      cv = open_layer(values[i], num_channels=1, what=f"training {field}")
      if not np.allclose(cv.resolution, image_cv.resolution) or \
          not cv.bounds.contains_bbox(box):
        raise IicatsError(f"training {field} {values[i]}: resolution/bounds do not cover "
                          f"{path} {box}")
      arrays[field] = np.asarray(cv[box])[..., 0]
    volumes.append(TrainingVolume(name=path, **arrays))
  return volumes, resolution
