"""Blockwise sliding-window inference with normalised bump blending.

Patches lie on one grid anchored at the dataset's origin, so a voxel is always predicted from
the same patches, whatever block (task) it belongs to: the output does not depend on the task
shape. Arrays are (x, y, z) / (c, x, y, z).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from .model import (AFFINITY_CHANNELS, ORGANELLE_CHANNELS, UNet3D, long_range_offsets,
                    normalize_image)


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


def _channel_offsets(config) -> list:
  """Per model output channel: (axis, distance) of an affinity, None for an organelle."""
  return ([(axis, 1) for axis in range(len(AFFINITY_CHANNELS))]
          + [None] * len(ORGANELLE_CHANNELS) + long_range_offsets(config.out_channels))


def in_plane_orientations(config) -> list:
  """The in-plane symmetries that test-time augmentation averages over, as (transpose x<->y,
  flip x, flip y): the 8 of the square, or the 4 flips where the patch is not square in x,y or
  an x long-range affinity has no y partner. z is never flipped: anisotropic models never saw
  it mirrored in training."""
  in_plane = {o for o in _channel_offsets(config) if o is not None and o[0] < 2}
  square = (config.patch_size[0] == config.patch_size[1]
            and all((1 - axis, d) in in_plane for axis, d in in_plane))
  return [(t, fx, fy) for t in ((False, True) if square else (False,))
          for fx in (False, True) for fy in (False, True)]


def forward_probabilities(model: UNet3D, x: torch.Tensor, augment: bool = False,
                          use_amp: bool = False) -> torch.Tensor:
  """Sigmoid outputs of a batch x float32 (B, 1, X, Y, Z) -> float32 (B, C, X, Y, Z).

  augment: average over in_plane_orientations (test-time augmentation). An affinity of
  channel (axis, d) links v and v - d·e_axis; on a mirrored patch it links the mirror images,
  so the mirrored output is mirrored back and shifted d voxels along that axis, and the
  first d voxels (whose partner lies outside the patch) keep the unmirrored prediction.
  """
  device_type = "cuda" if x.is_cuda else "cpu"

  def forward(batch):
    with torch.autocast(device_type=device_type, enabled=use_amp):
      return torch.sigmoid(model(batch).float())

  plain = forward(x)
  if not augment:
    return plain
  offsets = _channel_offsets(model.config)
  orientations = in_plane_orientations(model.config)
  if any(transpose for transpose, _, _ in orientations):
    # the x <-> y transpose swaps each x affinity with its y partner; with the swap it is its
    # own inverse, so the same call maps predictions into a transposed frame and back
    swap = [c if o is None or o[0] == 2 else offsets.index((1 - o[0], o[1]))
            for c, o in enumerate(offsets)]

  def in_frame(probabilities, transpose):
    return probabilities.transpose(2, 3)[:, swap] if transpose else probabilities

  total = plain.clone()
  for transpose, flip_x, flip_y in orientations[1:]:
    flips = [axis + 2 for axis, flip in ((0, flip_x), (1, flip_y)) if flip]
    image = x.transpose(2, 3) if transpose else x
    out = forward(torch.flip(image, flips) if flips else image)
    if flips:
      out = torch.flip(out, flips)
      reference = in_frame(plain, transpose)
      for c, offset in enumerate(offsets):
        if offset is None or offset[0] + 2 not in flips:
          continue
        axis, d = offset
        shifted = torch.roll(out[:, c], d, dims=axis + 1)
        shifted.narrow(axis + 1, 0, d).copy_(reference[:, c].narrow(axis + 1, 0, d))
        out[:, c] = shifted
    total += in_frame(out, transpose)
  return total / len(orientations)


_PENDING = object()  # predict_block: a patch waiting for its batch


@torch.no_grad()
def predict_block(model: UNet3D, image, image_start, block_start, block_stop, patch_starts,
                  batch_size: int = 4, device: str = "cpu", patch_cache=None, on_final=None,
                  z_align: int | None = None, augment: bool = False,
                  progress: bool = False, resolution=None) -> np.ndarray:
  """Blend model outputs of the given patches over one block.

  image: uint8 (X, Y, Z) covering every patch, its first voxel at global `image_start`
    (regions beyond the dataset must already be padded); or a callable read(lo, hi) -> uint8
    array of the global box [lo, hi), padded the same way. Patches run one z-layer (one patch
    z start) at a time, and the next layer's image is read while this one computes.
  patch_cache: optional object with get(start) -> float32 (C, *patch) or None and
    put(start, probabilities): patches that cross the block's faces, which the neighbouring
    blocks need as well, are looked up there first and stored once computed, so each is
    computed once however the volume is cut into tasks. The output is the same bit for bit
    whichever task computed a shared patch (on one device, at one torch thread count): the
    cache holds the computed float32, patches are added in one global order, and no patch
    runs alone in a batch.
  on_final: optional callable(z0, z1, probabilities (C, bx, by, z1 - z0)) called (in a
    background thread) with each z-slab [z0, z1) (global) of the block as soon as no later
    patch touches it; slab ends fall on multiples of z_align from block_start, or on the block
    end. The call returns after every on_final and cache write has finished.
  augment: test-time augmentation, the mean over the in-plane mirror images of each patch
    (forward_probabilities): 4-8× the compute.
  progress: a tqdm bar over the z-layers of patches.
  resolution: the image's voxel size (nm, x, y, z); with it, black regions of a patch
    (watershed.image_background: padding, unwritten chunks) are filled with the mirror image
    of the tissue beside them before the patch runs (fill_background), and predict 0.
  Returns float32 (C, bx, by, bz) probabilities for the block [block_start, block_stop); each
  voxel is the weighted mean of the patches covering it (weights sum to 1). All-zero patches
  are not run and predict 0.
  """
  config = model.config
  patch = np.array(config.patch_size)
  block_start, block_stop = np.asarray(block_start), np.asarray(block_stop)
  shape = tuple(block_stop - block_start)
  weights = bump_weights(patch)
  out = np.zeros((len(config.out_channels),) + shape, dtype=np.float32)
  weight_sum = np.zeros(shape, dtype=np.float32)
  scratch = np.empty((len(config.out_channels),) + tuple(patch), dtype=np.float32)
  use_amp = device.startswith("cuda")
  patch_starts = np.asarray(patch_starts).reshape(-1, 3)
  if callable(image):
    read = image
  else:
    image_start = np.asarray(image_start)

    def read(lo, hi):
      return image[tuple(slice(a, b) for a, b in zip(lo - image_start, hi - image_start))]

  def accumulate(start, prob):
    lo = np.maximum(start, block_start)
    hi = np.minimum(start + patch, block_stop)
    src = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
    dst = tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, block_start))
    w = weights[src]
    if prob is not None:
      weighted = scratch[(slice(None),) + tuple(slice(0, h - l) for l, h in zip(lo, hi))]
      np.multiply(prob[(slice(None),) + src], w, out=weighted)
      out[(slice(None),) + dst] += weighted
    weight_sum[dst] += w

  # Patches are accumulated in their global order (z, then x, y), whether computed, cached or
  # all-zero, so a voxel's float32 sums do not depend on which task computed a shared patch:
  # the layers come out the same from a re-run and from another task shape.
  waiting = []  # [start, probabilities, or None for an all-zero patch, or _PENDING]

  def accumulate_ready():
    while waiting and waiting[0][1] is not _PENDING:
      accumulate(*waiting.pop(0))

  def run(batch):
    tiles = [tile for _, tile, _, _ in batch]
    # A patch run alone gets other values (7e-6 apart on CPU: another convolution algorithm
    # for a batch of one), while batches of 2-8 agree bit for bit, so a lone patch runs
    # beside an all-zero tile: the values no longer depend on the task that computed them.
    if len(tiles) == 1:
      tiles.append(np.zeros_like(tiles[0]))
    x = torch.from_numpy(np.stack(tiles)[:, None]).to(device)
    probs = forward_probabilities(model, x, augment, use_amp).cpu().numpy()
    for (entry, _, shared, background_voxels), prob in zip(batch, probs):
      if background_voxels is not None:
        prob[:, background_voxels] = 0
      entry[1] = prob
      if shared:
        pending.append(background.submit(patch_cache.put, entry[0], prob))
    accumulate_ready()

  def final(z0, z1):
    sl = (slice(None), slice(None), slice(None), slice(z0 - block_start[2], z1 - block_start[2]))
    out[sl] /= weight_sum[None, :, :, sl[3]]
    if on_final is not None:
      pending.append(background.submit(on_final, z0, z1, out[sl]))

  layers = np.unique(patch_starts[:, 2])
  xy_lo, xy_hi = patch_starts[:, :2].min(0), patch_starts[:, :2].max(0) + patch[:2]

  def fetch(z):
    return read(np.r_[xy_lo, z], np.r_[xy_hi, z + patch[2]])

  pending = []
  done_z = int(block_start[2])

  def advance(ready):
    """Finalise the voxels below global z `ready` (rounded down to the write alignment)."""
    nonlocal done_z
    if z_align and ready < block_stop[2]:
      ready = done_z + (ready - done_z) // z_align * z_align
    if ready > done_z:
      final(done_z, ready)
      done_z = ready

  # a part-filled batch waits for the next layer's patches (a batch of one runs on one core
  # of a CPU), and the voxels its patches cover wait with it
  batch, deferred = [], None
  with ThreadPoolExecutor(max_workers=2) as background:
    upcoming = background.submit(fetch, layers[0]) if len(layers) else None
    for i, z in enumerate(tqdm(layers, desc="predict", unit="layer", disable=not progress)):
      layer_image = upcoming.result()
      upcoming = background.submit(fetch, layers[i + 1]) if i + 1 < len(layers) else None
      for start in patch_starts[patch_starts[:, 2] == z]:
        shared = patch_cache is not None and bool(
          np.any(start < block_start) or np.any(start + patch > block_stop))
        cached = patch_cache.get(start) if shared else None
        if cached is not None:
          waiting.append([start, cached])
          accumulate_ready()
          continue
        offset = np.r_[start[:2] - xy_lo, 0]
        tile = layer_image[tuple(slice(o, o + p) for o, p in zip(offset, patch))]
        if not tile.any():
          waiting.append([start, None])
          accumulate_ready()
          continue
        background_voxels = None
        if resolution is not None:
          # from the patch alone: the same patch gets the same input in any task's window
          tile, background_voxels = fill_background(tile, resolution)
        waiting.append([start, _PENDING])
        batch.append((waiting[-1], normalize_image(tile, config), shared, background_voxels))
        if len(batch) >= batch_size:
          run(batch)
          batch = []
          if deferred is not None:
            advance(deferred)
            deferred = None
      last = i + 1 == len(layers)
      if batch and last:
        run(batch)
        batch = []
      # voxels below the next layer's start see no more patches
      ready = int(block_stop[2]) if last else min(int(layers[i + 1]), int(block_stop[2]))
      if batch:
        deferred = ready
      else:
        advance(ready)
    for future in pending:
      future.result()
  return out


def fill_background(tile: np.ndarray, resolution) -> tuple[np.ndarray, np.ndarray | None]:
  """uint8 (X, Y, Z) patch -> (the patch with its black regions (watershed.image_background)
  replaced by the mirror image of the nearest tissue across their edge, those regions as
  bool (X, Y, Z), or None where there are none).

  The networks never saw black padding in training: within 8 voxels of it they predicted
  affinities of 0.96-0.99 against 0.84-0.87 (the FIB crop beside 32 black voxels, against
  the same crop alone), a strip without membranes that joined every neuron along the edge.
  The mirror image is what the volume's own edges get (pad_to_region); a voxel whose mirror
  point is black too takes its nearest tissue voxel."""
  if tile.min() > 0:  # the common case, in a fraction of the time of the comparison below
    return tile, None
  from scipy import ndimage
  from .watershed import image_background
  background = image_background(tile, resolution)
  if not background.any() or background.all():
    return tile, None
  nearest = ndimage.distance_transform_edt(background, sampling=resolution,
                                           return_distances=False, return_indices=True)
  points = np.nonzero(background)
  near = tuple(axis[points] for axis in nearest)
  mirror = tuple(np.clip(2 * n - p, 0, size - 1)
                 for n, p, size in zip(near, points, tile.shape))
  use_mirror = ~background[mirror]
  filled = tile.copy()
  filled[points] = np.where(use_mirror, tile[mirror], tile[near])
  return filled, background


def default_overlap(patch_size) -> np.ndarray:
  """Patch overlap (voxels, x,y,z) that InferenceTask uses: a quarter of the patch."""
  return np.asarray(patch_size) // 4


def predict_volume(model: UNet3D, image: np.ndarray, batch_size: int = 4,
                   device: str = "cpu", augment: bool = False,
                   progress: bool = False) -> np.ndarray:
  """A whole in-memory uint8 (X, Y, Z) volume -> float32 (C, X, Y, Z) probabilities, on the
  patch grid and overlap that InferenceTask uses for a dataset of this shape (progress: a
  tqdm bar)."""
  patch = np.array(model.config.patch_size)
  start, stop = np.zeros(3, int), np.array(image.shape)
  starts = patches_for_block(start, stop, start, stop, patch, patch - default_overlap(patch))
  return predict_block(model, image, start, start, stop, starts, batch_size, device,
                       augment=augment, progress=progress)


def quantize(probabilities: np.ndarray) -> np.ndarray:
  """float32 probabilities in [0, 1] -> uint8 (round(p * 255), halves rounded up)."""
  scaled = np.clip(probabilities, 0.0, 1.0) * np.float32(255.0)
  scaled += np.float32(0.5)
  return scaled.astype(np.uint8)


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
