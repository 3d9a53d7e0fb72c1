"""InferenceTask: EM image block (+ patch context) -> affinities and organelles layers."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
from functools import partial

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import Bbox
from taskqueue import queueable

from iicats_cv.errors import IicatsError
from iicats_cv.layers import (IMAGE_DTYPES, check_existing_layer, create_layer, image_window,
                             join, local_path, open_layer, region_bbox, resolution_text,
                             resolve_cloudpath)
from .common import (LAYER_CHUNK_SIZE, block_grid, block_name, check_task_shape, done_names,
                     mark_done, read_image)

# PyTorch (and the model and inference modules, which need it) is imported where a task
# first predicts: a worker process that runs the other stages' tasks starts 1.2 s sooner.
_MODELS = {}
TORCH_THREADS = None  # a worker process of several sets 1: each of them keeps to one core


def _model(checkpoint, device):
  key = (checkpoint, device)
  if key not in _MODELS:
    import torch
    from iicats_cv.model import load_checkpoint, reuse_freed_memory
    if TORCH_THREADS:
      torch.set_num_threads(TORCH_THREADS)
    if device == "cpu":
      reuse_freed_memory()
    _MODELS[key] = load_checkpoint(checkpoint or None, device=device)[0]
  return _MODELS[key]


def _device():
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


class PatchCache:
  """Model outputs of patches that cross task faces, under a cloudpath prefix (one .npy per
  patch, float32 (C, *patch)): the first task to need such a patch computes and stores it,
  the neighbouring tasks read it. On local (or shared) disk the files are read and written
  directly, each write renamed into place so that a parallel reader never sees half a file."""

  def __init__(self, prefix: str):
    self.directory = local_path(prefix)
    self.files = None if self.directory else CloudFiles(resolve_cloudpath(prefix))

  @staticmethod
  def _key(start) -> str:
    return "_".join(str(int(v)) for v in start) + ".npy"

  def get(self, start):
    if self.directory:
      try:
        return np.load(os.path.join(self.directory, self._key(start)))
      except FileNotFoundError:
        return None
    data = self.files.get(self._key(start))
    return None if data is None else np.load(io.BytesIO(data))

  def put(self, start, probabilities) -> None:
    probabilities = np.ascontiguousarray(probabilities, np.float32)
    if self.directory:
      os.makedirs(self.directory, exist_ok=True)
      path = os.path.join(self.directory, self._key(start))
      partial_path = f"{path}.{os.getpid()}.{threading.get_ident()}.part"
      with open(partial_path, "wb") as fh:
        np.save(fh, probabilities)
      os.replace(partial_path, path)
      return
    buffer = io.BytesIO()
    np.save(buffer, probabilities)
    self.files.put(self._key(start), buffer.getvalue(), compress=None)


def patch_cache_prefix(affinities_path: str, image_path: str, model_metadata: dict,
                       augment: bool = False, image_mip: int = 0, window=None) -> str:
  """Where a run's patch cache lives: beside the affinities layer, named after the image (its
  mip and grey-value window), the model (its checkpoint metadata) and the augmentation, so a
  cache left by an interrupted run with another model or setting is never read."""
  model = json.dumps(model_metadata, sort_keys=True, default=str)
  image = image_path if not image_mip else f"{image_path}@{image_mip}"
  if window is not None:
    image += f"[{window[0]:g},{window[1]:g}]"
  digest = hashlib.sha1(f"{image}|{model}|{augment}".encode()).hexdigest()[:12]
  return f"{affinities_path.rstrip('/')}/patch_cache/{digest}"


def clear_patch_cache(affinities_path: str) -> None:
  """Delete the patch caches under an affinities layer (after the inference stage)."""
  local = local_path(affinities_path)
  if local:  # file:// deletes leave the folders behind
    shutil.rmtree(os.path.join(local, "patch_cache"), ignore_errors=True)
    return
  files = CloudFiles(resolve_cloudpath(affinities_path))
  files.delete(list(files.list(prefix="patch_cache/")))


@queueable
def inference_task(image_path: str, affinities_path: str, organelles_path: str,
                   checkpoint: str, start: list, stop: list, overlap: list,
                   batch_size: int = 4, state_prefix: str = "", patch_cache: str = "",
                   augment: bool = False, image_mip: int = 0, fill_missing: bool = False,
                   window: list | None = None):
  """Predict affinities + organelles for the block [start, stop) (x,y,z voxels at the image's
  mip image_mip, the output layers' mip 0).

  The image is read one z-layer of patches at a time, the next layer while this one computes,
  and each finished z-slab of output chunks is written while the next computes. The patch
  grid spans the image's whole bounds, so patches reaching past the output region read real
  context, and a region's prediction equals the whole image's there.
  patch_cache: cloudpath prefix of a PatchCache shared by the run's tasks ("" = none).
  augment: test-time augmentation over the in-plane mirror images of each patch.
  fill_missing: read the image's missing chunks as black (0) instead of failing.
  window: grey values [lo, hi] mapped onto the model's 0..255 (needed for non-uint8 images).
  """
  from iicats_cv.inference import patches_for_block, predict_block, quantize, pad_to_region
  from iicats_cv.model import AFFINITY_CHANNELS, ORGANELLE_CHANNELS
  device = _device()
  model = _model(checkpoint, device)
  image_cv = open_layer(image_path, mip=image_mip, layer_type="image", dtypes=IMAGE_DTYPES,
                        num_channels=1, fill_missing=fill_missing, what="image layer")
  aff_cv = open_layer(affinities_path)
  org_cv = open_layer(organelles_path)
  bounds = image_cv.bounds
  patch = np.array(model.config.patch_size)
  stride = patch - np.asarray(overlap)
  starts = patches_for_block(start, stop, bounds.minpt, bounds.maxpt, patch, stride)

  def read(want_lo, want_hi):
    have_lo = np.maximum(want_lo, bounds.minpt)
    have_hi = np.minimum(want_hi, bounds.maxpt)
    image = read_image(image_cv, Bbox(have_lo, have_hi), image_path, window)
    return pad_to_region(image, have_lo, have_hi, want_lo, want_hi)

  n_aff, n_org = len(AFFINITY_CHANNELS), len(ORGANELLE_CHANNELS)

  def write(z0, z1, probs):
    box = tuple(slice(a, b) for a, b in zip(start[:2], stop[:2])) + (slice(z0, z1),)
    # model channels: short-range affinities, organelles, then any long-range affinities
    affinities = np.concatenate([probs[:n_aff], probs[n_aff + n_org:]])
    for cv, data in ((aff_cv, affinities), (org_cv, probs[n_aff:n_aff + n_org])):
      out = data if cv.dtype == np.float32 else quantize(data)
      cv[box] = np.moveaxis(out, 0, -1)

  predict_block(model, read, None, start, stop, starts, batch_size, device,
                patch_cache=PatchCache(patch_cache) if patch_cache else None,
                on_final=write, z_align=int(aff_cv.chunk_size[2]), augment=augment,
                resolution=tuple(float(r) for r in image_cv.resolution))
  if state_prefix:
    mark_done(state_prefix, "inference", block_name(start))


def resolve_window(image_cv, region, image_path: str, window=None) -> list | None:
  """The grey-value window [lo, hi] the run maps onto the model's 0..255: the one given, or
  for a layer not of uint8 its percentiles (image_window, said in one line); None for uint8
  layers without one."""
  if window is not None:
    lo, hi = (float(v) for v in window)
    if not (np.isfinite(lo) and np.isfinite(hi)):
      raise IicatsError(f"--image-window {lo:g},{hi:g}: expected two finite grey values")
    if not hi > lo:
      raise IicatsError(f"--image-window {lo:g},{hi:g}: the second value must be the larger")
    return [lo, hi]
  if image_cv.dtype == np.uint8:
    return None
  window = image_window(image_cv, region, image_path)
  print(f"note: image layer {image_path} is {image_cv.dtype}: grey values {window[0]:g}-"
        f"{window[1]:g} (its 0.05-99.95th percentiles in a sample of chunks) map onto the "
        "model's 0-255; --image-window LO,HI sets them", flush=True)
  if not window[1] > window[0]:
    raise IicatsError(f"image layer {image_path}: its sampled grey values are all "
                      f"{window[0]:g}; give --image-window LO,HI")
  return window


def create_inference_tasks(image_path: str, affinities_path: str, organelles_path: str,
                           checkpoint: str | None = None, task_shape=(128, 128, 128),
                           dtype: str = "uint8", batch_size: int = 4, state_prefix: str = "",
                           chunk_size=LAYER_CHUNK_SIZE, share_patches: bool = True,
                           augment: bool = False, mip: int = 0, bounds=None,
                           fill_missing: bool = False, window=None):
  """Create the output layers (validated, with provenance) and one task per block.

  mip: the image's mip to predict from (its resolution is the outputs'); bounds: the region
  to predict, x0,y0,z0,x1,y1,z1 voxels at that mip (layers.region_bbox; None: the whole
  image), which becomes the output layers' bounds.

  share_patches: the tasks share the patches that cross their faces through a PatchCache
  beside the affinities layer (each computed once when tasks run one after another; call
  clear_patch_cache after the stage).
  augment: test-time augmentation (the mean over the in-plane mirror images of each patch;
  4-8× the compute). fill_missing: the image's missing chunks are black (0), and all-black
  patches are skipped. window: grey values [lo, hi] mapped onto the model's 0..255
  (default for a layer not of uint8: resolve_window's)."""
  from iicats_cv.inference import default_overlap
  from iicats_cv.model import (AFFINITY_CHANNELS, ORGANELLE_CHANNELS, load_checkpoint,
                               publish_checkpoint)
  if affinities_path.rstrip("/") == organelles_path.rstrip("/"):
    raise IicatsError(f"--affinities and --organelles are both {affinities_path}: give each "
                      "its own layer")
  image_cv = open_layer(image_path, mip=mip, layer_type="image", dtypes=IMAGE_DTYPES,
                        num_channels=1, what="image layer")
  bounds = region_bbox(bounds, image_cv, f"image layer {image_path}")
  window = resolve_window(image_cv, bounds, image_path, window)
  model, meta = load_checkpoint(checkpoint or None)
  config = model.config
  if not np.allclose(image_cv.resolution, config.resolution, rtol=0.35):
    print(f"warning: image layer {image_path} is at {resolution_text(image_cv.resolution)}, "
          f"checkpoint {checkpoint or 'default'} was trained at "
          f"{resolution_text(config.resolution)}: expect poor "
          f"predictions, or fine-tune it on your ground truth (iicats train --init "
          f"{checkpoint or 'default'} ...)", flush=True)
  check_task_shape(task_shape, chunk_size, affinities_path)
  overlap = default_overlap(config.patch_size).tolist()
  params = {"image": image_path, "image_mip": mip,
            "bounds": bounds.minpt.tolist() + bounds.maxpt.tolist(),
            "checkpoint": checkpoint or "default",
            "patch_size": list(config.patch_size), "overlap": overlap, "dtype": dtype,
            "task_shape": list(task_shape), "test_time_augmentation": augment,
            "fill_missing": fill_missing, "image_window": window}
  affinity_channels = AFFINITY_CHANNELS + config.out_channels[
    len(AFFINITY_CHANNELS) + len(ORGANELLE_CHANNELS):]
  outputs = ((affinities_path, affinity_channels), (organelles_path, ORGANELLE_CHANNELS))
  for path, channels in outputs:  # both checked before either is written
    check_existing_layer(path, layer_type="image", dtype=dtype,
                         resolution=image_cv.resolution, voxel_offset=bounds.minpt,
                         volume_size=bounds.size3(), num_channels=len(channels))
  for path, channels in outputs:
    create_layer(path, layer_type="image", dtype=dtype, resolution=image_cv.resolution,
                 voxel_offset=bounds.minpt, volume_size=bounds.size3(), chunk_size=chunk_size,
                 num_channels=len(channels), step="inference",
                 params={**params, "channels": list(channels)})
  done = done_names(state_prefix, "inference") if state_prefix else set()
  cache = (patch_cache_prefix(affinities_path, image_path, meta, augment, mip, window)
           if share_patches else "")
  # beside the outputs, so that workers on other machines read the same model
  model_path = publish_checkpoint(checkpoint, join(affinities_path, "model"))
  return [
    partial(inference_task, image_path=image_path, affinities_path=affinities_path,
                   organelles_path=organelles_path, checkpoint=model_path,
                   start=lo, stop=hi, overlap=overlap, batch_size=batch_size,
                   state_prefix=state_prefix, patch_cache=cache, augment=augment,
                   image_mip=mip, fill_missing=fill_missing, window=window)
    for lo, hi, _ in block_grid(bounds.minpt, bounds.maxpt, task_shape)
    if block_name(lo) not in done
  ]
