"""Blockwise sliding-window inference with normalised bump blending.

Patches lie on one grid anchored at the dataset's origin, so a voxel is always predicted from
the same patches, whatever block (task) it belongs to: the output does not depend on the task
shape. Arrays are (x, y, z) / (c, x, y, z).
"""
from __future__ import annotations

import numpy as np
import torch

from .model import UNet3D, normalize_image


def bump_weights(patch_size) -> np.ndarray:
  """Separable bump exp(-Σ 1/(1-t²)), t ∈ (-1, 1) at voxel centres; float32 (X, Y, Z).

  Scaled so the patch centre has weight 1; floored at 1e-6 so the border voxels of the dataset,
  seen by a single patch, keep a usable weight after normalisation.
  """
  logs = []
  for n in patch_size:
    t = (np.arange(n) + 0.5) / (n / 2.0) - 1.0
    logs.append(-1.0 / (1.0 - t * t) + 1.0)
  total = logs[0][:, None, None] + logs[1][None, :, None] + logs[2][None, None, :]
  return np.maximum(np.exp(total), 1e-6).astype(np.float32)


def grid_starts(dataset_start: int, dataset_stop: int, patch: int, stride: int) -> np.ndarray:
  """Patch starts along one axis: every `stride` from the dataset start, plus one patch that
  ends exactly at the dataset stop. A dataset shorter than the patch gets one patch."""
  length = dataset_stop - dataset_start
  if length <= patch:
    return np.array([dataset_start])
  starts = list(range(dataset_start, dataset_stop - patch, stride))
  starts.append(dataset_stop - patch)
  return np.unique(np.array(starts))


def patches_for_block(block_start, block_stop, dataset_start, dataset_stop, patch, stride):
  """Global patch starts (K, 3) whose extent intersects the block [start, stop)."""
  axes = []
  for a in range(3):
    starts = grid_starts(dataset_start[a], dataset_stop[a], patch[a], stride[a])
    keep = (starts < block_stop[a]) & (starts + patch[a] > block_start[a])
    axes.append(starts[keep])
  grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
  return grid.reshape(-1, 3)


def read_region(patch_starts, patch):
  """Bounding box [start, stop) (x,y,z) of all the patches."""
  return patch_starts.min(axis=0), patch_starts.max(axis=0) + np.array(patch)


@torch.no_grad()
def predict_block(model: UNet3D, image: np.ndarray, image_start, block_start, block_stop,
                  patch_starts, batch_size: int = 4, device: str = "cpu") -> np.ndarray:
  """Blend model outputs of the given patches over one block.

  image: uint8 (X, Y, Z) covering every patch, its first voxel at global `image_start`
  (regions beyond the dataset must already be padded). Returns float32 (C, bx, by, bz)
  probabilities for the block [block_start, block_stop); each voxel is the weighted mean of the
  patches covering it (weights sum to 1). All-zero patches are not run and predict 0.
  """
  config = model.config
  patch = np.array(config.patch_size)
  block_start, block_stop = np.asarray(block_start), np.asarray(block_stop)
  shape = tuple(block_stop - block_start)
  weights = bump_weights(patch)
  out = np.zeros((len(config.out_channels),) + shape, dtype=np.float32)
  weight_sum = np.zeros(shape, dtype=np.float32)
  use_amp = device.startswith("cuda")

  def accumulate(starts, probs):
    for start, prob in zip(starts, probs):
      lo = np.maximum(start, block_start)
      hi = np.minimum(start + patch, block_stop)
      src = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
      dst = tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, block_start))
      w = weights[src]
      if prob is not None:
        out[(slice(None),) + dst] += prob[(slice(None),) + src] * w
      weight_sum[dst] += w

  batch, batch_starts = [], []

  def flush():
    if not batch:
      return
    x = torch.from_numpy(np.stack(batch)[:, None]).to(device)
    with torch.autocast(device_type="cuda", enabled=use_amp):
      probs = torch.sigmoid(model(x).float()).cpu().numpy()
    accumulate(batch_starts, probs)
    batch.clear()
    batch_starts.clear()

  image_start = np.asarray(image_start)
  for start in patch_starts:
    offset = start - image_start
    sl = tuple(slice(o, o + p) for o, p in zip(offset, patch))
    tile = image[sl]
    if not tile.any():
      accumulate([start], [None])
      continue
    batch.append(normalize_image(tile, config))
    batch_starts.append(start)
    if len(batch) >= batch_size:
      flush()
  flush()
  out /= weight_sum[None]
  return out


def quantize(probabilities: np.ndarray) -> np.ndarray:
  """float32 probabilities in [0, 1] -> uint8 (round(p * 255))."""
  return np.clip(np.rint(probabilities * 255.0), 0, 255).astype(np.uint8)


def pad_to_region(image: np.ndarray, have_start, have_stop, want_start, want_stop) -> np.ndarray:
  """Pad an image covering [have_start, have_stop) to [want_start, want_stop) by reflection.

  Used where patches extend past the dataset bounds (datasets smaller than a patch), so the
  padding depends only on the dataset, never on the block.
  """
  before = np.asarray(have_start) - np.asarray(want_start)
  after = np.asarray(want_stop) - np.asarray(have_stop)
  if (before <= 0).all() and (after <= 0).all():
    return image
  pad = [(max(int(b), 0), max(int(a), 0)) for b, a in zip(before, after)]
  mode = "reflect" if all(s > 1 for s in image.shape) else "edge"
  return np.pad(image, pad, mode=mode)
