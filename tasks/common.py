"""What every task shares: the block grid, done markers, and table objects in the bucket."""
from __future__ import annotations

import io
import json

import numpy as np
from cloudfiles import CloudFiles

from iicats_cv.errors import IicatsError
from iicats_cv.layers import read_box, resolve_cloudpath


def block_grid(bounds_start, bounds_stop, task_shape):
  """Blocks [(start, stop, index)] tiling the bounds (x,y,z) with task_shape, clipped at the end.

  `index` is the block's linear position in the grid (x fastest), used for id offsets.
  """
  start = np.asarray(bounds_start, dtype=int)
  stop = np.asarray(bounds_stop, dtype=int)
  shape = np.asarray(task_shape, dtype=int)
  counts = -(-(stop - start) // shape)
  blocks = []
  for k in range(counts[2]):
    for j in range(counts[1]):
      for i in range(counts[0]):
        lo = start + shape * np.array([i, j, k])
        hi = np.minimum(lo + shape, stop)
        index = i + counts[0] * (j + counts[1] * k)
        blocks.append((lo.tolist(), hi.tolist(), int(index)))
  return blocks


def read_image(image_cv, box, image_path, window=None) -> np.ndarray:
  """uint8 (x, y, z) of an image layer over box, mapped with window (lo, hi) -> 0..255 when
  given (volume_io.to_uint8; layers not of uint8 need one). A missing chunk is an IicatsError
  naming it and --fill-missing, a corrupt one names it too (layers.read_box)."""
  image = read_box(image_cv, box, "image layer", image_path,
                   missing_hint="; --fill-missing reads missing chunks as black, as Igneous' "
                                "--fill-missing does")[..., 0]
  if window is None and image.dtype == np.uint8:
    return image
  if window is None:
    raise IicatsError(f"image layer {image_path}: {image.dtype} grey values need a window "
                      "mapped onto the model's 0-255 (layers.image_window)")
  from iicats_cv.volume_io import to_uint8
  return to_uint8(image, window)


# the chunk size of every layer the pipeline writes: task shapes are multiples of it
LAYER_CHUNK_SIZE = (64, 64, 64)


def check_task_shape(task_shape, chunk_size, layer: str):
  """Task shapes must be multiples of the chunk size so every write is chunk-aligned."""
  if any(t % c for t, c in zip(task_shape, chunk_size)):
    raise IicatsError(f"{layer}: task shape {tuple(task_shape)} is not a multiple of the chunk "
                      f"size {tuple(chunk_size)}")


def block_name(start) -> str:
  return "_".join(str(int(s)) for s in start)


def mark_done(state_prefix: str, stage: str, name: str, info: dict | None = None) -> None:
  """Record that one task of a stage finished (so a resumed run skips it)."""
  CloudFiles(resolve_cloudpath(state_prefix)).put_json(f"done/{stage}/{name}", info or {})


def done_names(state_prefix: str, stage: str) -> set:
  cf = CloudFiles(resolve_cloudpath(state_prefix))
  return {path.rsplit("/", 1)[-1] for path in cf.list(prefix=f"done/{stage}/")}


def put_npz(cloudpath_prefix: str, key: str, arrays: dict) -> None:
  """Store arrays as one compressed npz object (portable, fast, no database)."""
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  CloudFiles(resolve_cloudpath(cloudpath_prefix)).put(key, buffer.getvalue(), compress=None,
                                   content_type="application/octet-stream")


def get_npz(cloudpath_prefix: str, key: str) -> dict:
  data = CloudFiles(resolve_cloudpath(cloudpath_prefix)).get(key)
  if data is None:
    raise IicatsError(f"{cloudpath_prefix}/{key}: missing (did the previous stage finish?)")
  with np.load(io.BytesIO(data)) as npz:
    return {k: npz[k] for k in npz.files}


def put_json(cloudpath_prefix: str, key: str, obj) -> None:
  CloudFiles(resolve_cloudpath(cloudpath_prefix)).put(key, json.dumps(obj, indent=1).encode(),
                                   content_type="application/json", compress=None)


def get_json(cloudpath_prefix: str, key: str):
  data = CloudFiles(resolve_cloudpath(cloudpath_prefix)).get(key)
  return None if data is None else json.loads(data)
