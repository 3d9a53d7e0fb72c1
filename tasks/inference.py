"""InferenceTask: EM image block (+ patch context) -> affinities and organelles layers."""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
from cloudvolume import Bbox
from taskqueue import queueable

from iicats_cv.inference import patches_for_block, predict_block, quantize, read_region, \
  pad_to_region
from iicats_cv.layers import open_layer, create_layer
from iicats_cv.model import load_checkpoint, AFFINITY_CHANNELS, ORGANELLE_CHANNELS
from .common import block_grid, check_task_shape, mark_done, block_name, done_names

_MODELS = {}


def _model(checkpoint, device):
  key = (checkpoint, device)
  if key not in _MODELS:
    _MODELS[key] = load_checkpoint(checkpoint or None, device=device)[0]
  return _MODELS[key]


def _device():
  return "cuda" if torch.cuda.is_available() else "cpu"


@queueable
def inference_task(image_path: str, affinities_path: str, organelles_path: str,
                   checkpoint: str, start: list, stop: list, overlap: list,
                   batch_size: int = 4, state_prefix: str = ""):
  """Predict affinities + organelles for the block [start, stop) (x,y,z voxels)."""
  device = _device()
  model = _model(checkpoint, device)
  image_cv = open_layer(image_path, layer_type="image", dtypes=("uint8",), num_channels=1,
                        what="image layer")
  bounds = image_cv.bounds
  patch = np.array(model.config.patch_size)
  stride = patch - np.asarray(overlap)
  starts = patches_for_block(start, stop, bounds.minpt, bounds.maxpt, patch, stride)
  want_lo, want_hi = read_region(starts, patch)
  have_lo = np.maximum(want_lo, bounds.minpt)
  have_hi = np.minimum(want_hi, bounds.maxpt)
  image = np.asarray(image_cv[Bbox(have_lo, have_hi)])[..., 0]
  image = pad_to_region(image, have_lo, have_hi, want_lo, want_hi)
  probs = predict_block(model, image, want_lo, start, stop, starts, batch_size, device)
  slices = tuple(slice(a, b) for a, b in zip(start, stop))
  aff_cv = open_layer(affinities_path)
  org_cv = open_layer(organelles_path)
  n_aff = len(AFFINITY_CHANNELS)
  for cv, data in ((aff_cv, probs[:n_aff]), (org_cv, probs[n_aff:])):
    out = data if cv.dtype == np.float32 else quantize(data)
    cv[slices] = np.moveaxis(out, 0, -1)
  if state_prefix:
    mark_done(state_prefix, "inference", block_name(start))


def create_inference_tasks(image_path: str, affinities_path: str, organelles_path: str,
                           checkpoint: str | None = None, task_shape=(128, 128, 128),
                           dtype: str = "uint8", batch_size: int = 4, state_prefix: str = "",
                           chunk_size=(64, 64, 64)):
  """Create the output layers (validated, with provenance) and one task per block."""
  image_cv = open_layer(image_path, layer_type="image", dtypes=("uint8",), num_channels=1,
                        what="image layer")
  model, meta = load_checkpoint(checkpoint or None)
  config = model.config
  if not np.allclose(image_cv.resolution, config.resolution, rtol=0.35):
    import warnings
    warnings.warn(f"image layer {image_path}: resolution {tuple(image_cv.resolution)} differs "
                  f"from the model's training resolution {config.resolution}")
  check_task_shape(task_shape, chunk_size, affinities_path)
  overlap = [p // 4 for p in config.patch_size]
  bounds = image_cv.bounds
  params = {"image": image_path, "checkpoint": checkpoint or "default",
            "patch_size": list(config.patch_size), "overlap": overlap, "dtype": dtype,
            "task_shape": list(task_shape)}
  for path, channels in ((affinities_path, AFFINITY_CHANNELS),
                         (organelles_path, ORGANELLE_CHANNELS)):
    create_layer(path, layer_type="image", dtype=dtype, resolution=image_cv.resolution,
                 voxel_offset=bounds.minpt, volume_size=bounds.size3(), chunk_size=chunk_size,
                 num_channels=len(channels), step="inference",
                 params={**params, "channels": list(channels)})
  done = done_names(state_prefix, "inference") if state_prefix else set()
  return [
    partial(inference_task, image_path=image_path, affinities_path=affinities_path,
                   organelles_path=organelles_path, checkpoint=checkpoint or "",
                   start=lo, stop=hi, overlap=overlap, batch_size=batch_size,
                   state_prefix=state_prefix)
    for lo, hi, _ in block_grid(bounds.minpt, bounds.maxpt, task_shape)
    if block_name(lo) not in done
  ]
