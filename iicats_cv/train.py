"""Training of the affinity + organelle U-Net on in-memory volumes.

Pure in the sense of the library: volumes come in as numpy arrays (x, y, z); reading them
from precomputed layers is the CLI's job (`iicats train`).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from .errors import IicatsError
from .metrics import affinity_average_precision, dice
from .model import (LSD_CHANNELS, ModelConfig, UNet3D, load_checkpoint, normalize_image,
                    reuse_freed_memory, save_checkpoint, ORGANELLE_CHANNELS, long_range_offsets,
                    trained_outputs)


@dataclass
class TrainingVolume:
  """One training volume. All arrays are (x, y, z) and share one shape.

  image: uint8. labels: neuron instances (uint), 0 = unlabelled/extracellular, or None when the
  volume has no neuron labels. nucleus/mitochondria/synapse: bool or uint masks, or None when
  that organelle is not annotated here (its loss is then masked out).
  """
  name: str
  image: np.ndarray
  labels: np.ndarray | None = None
  nucleus: np.ndarray | None = None
  mitochondria: np.ndarray | None = None
  synapse: np.ndarray | None = None
  weight: float = 1.0

  def organelle(self, name):
    return getattr(self, name)


def affinities_from_labels(labels: np.ndarray, distance: int = 1
                           ) -> tuple[np.ndarray, np.ndarray]:
  """Affinity targets and validity masks from instance labels.

  labels: (X, Y, Z) uint. Returns (affs, mask), both float32 (3, X, Y, Z): channel c at voxel v
  is 1 when v and v - distance * e_c carry the same non-zero label. The mask is 0 within
  `distance` of the low border of each axis, where the neighbour lies outside the array.
  """
  affs = np.zeros((3,) + labels.shape, dtype=np.float32)
  mask = np.zeros_like(affs)
  for axis in range(3):
    here = [slice(None)] * 3
    there = [slice(None)] * 3
    here[axis] = slice(distance, None)
    there[axis] = slice(None, -distance)
    a, b = labels[tuple(here)], labels[tuple(there)]
    affs[(axis,) + tuple(here)] = (a == b) & (a != 0)
    mask[(axis,) + tuple(here)] = 1
  return affs, mask


def local_shape_descriptors(labels: np.ndarray, sigma) -> np.ndarray:
  """Local shape descriptors of instance labels (Sheridan et al. 2022, lsd's definition).

  labels: uint (X, Y, Z), 0 = unlabelled; sigma: Gaussian std per axis in voxels (x, y, z).
  Returns float32 (10, X, Y, Z) in [0, 1], 0 where labels == 0; channels as LSD_CHANNELS:
  for each voxel, the Gaussian-weighted moments of its own object around it: the offset from
  the voxel to the object's local centre of mass (/ sigma, 0.5 = none), the variances (/
  sigma²) and covariances (/ sigma², 0.5 = none) of its voxels, and the local share of the
  window it fills. Each object is filtered within its bounding box plus 3 sigma."""
  sigma = np.asarray(sigma, dtype=np.float64)
  margin = np.ceil(3 * sigma).astype(int)
  out = np.zeros((len(LSD_CHANNELS),) + labels.shape, dtype=np.float32)
  boxes = ndimage.find_objects(labels.astype(np.int64, copy=False))

  def smooth(values):
    return ndimage.gaussian_filter(values, sigma, mode="constant", truncate=3.0)

  for label, box in enumerate(boxes, start=1):
    if box is None:
      continue
    box = tuple(slice(max(s.start - m, 0), min(s.stop + m, n))
                for s, m, n in zip(box, margin, labels.shape))
    inside = labels[box] == label
    weight = inside.astype(np.float32)
    coords = np.meshgrid(*(np.arange(s.start, s.stop, dtype=np.float32) for s in box),
                         indexing="ij")
    mass = smooth(weight)
    total = np.maximum(mass, 1e-6)
    means = [smooth(weight * c) / total for c in coords]
    pairs = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
    moments = [smooth(weight * coords[i] * coords[j]) / total - means[i] * means[j]
               for i, j in pairs]
    channels = ([(m - c) / s * 0.5 + 0.5 for m, c, s in zip(means, coords, sigma)]
                + [v / (sigma[i] * sigma[j]) for v, (i, j) in zip(moments[:3], pairs)]
                + [v / (sigma[i] * sigma[j]) * 0.5 + 0.5
                   for v, (i, j) in zip(moments[3:], pairs[3:])] + [mass])
    for c, values in enumerate(channels):
      out[(c,) + box][inside] = np.clip(values[inside], 0, 1)
  return out


# the LSD_CHANNELS of the x <-> y transposed volume, by their index in the original
LSD_XY_TRANSPOSED = (1, 0, 2, 4, 3, 5, 6, 8, 7, 9)
# Training stops when the loss's moving average rises above this many times its lowest (or
# than ln 2, a constant 0.5 prediction's balanced cross-entropy, where that is higher): the
# loss of a diverging run (`--lr 1000`: 0.7 to about 99,000 in 6 iterations) long before it
# turns NaN. An ordinary run's moving average stays within a few times its lowest.
DIVERGED = 10.0


def mirror_shape_descriptors(flipped: np.ndarray, axis: int) -> np.ndarray:
  """local_shape_descriptors (10, X, Y, Z) of labels mirrored along `axis` (0, 1, 2 = x, y,
  z), from `flipped`, the labels' own descriptors flipped along that axis: mirrored, a voxel's
  object centre lies on the other side and its covariances with that axis change sign (0.5
  encodes zero for both)."""
  out = np.array(flipped)
  inside = out[9] > 0  # the size channel: every labelled voxel weighs on itself
  for c in (axis,) + tuple(6 + k for k, pair in enumerate(((0, 1), (0, 2), (1, 2)))
                           if axis in pair):
    out[c] = np.where(inside, 1 - out[c], 0)
  return out


def affinity_error_map(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per-voxel class-balanced BCE of predicted short-range affinities against the labels' own.

  probabilities: float32 (3, X, Y, Z) x, y, z affinities; labels: uint (X, Y, Z) instances.
  Returns float32 (X, Y, Z): the sum over the three channels, weighted as the training loss
  weights them (masked_balanced_bce), 0 where no affinity is defined."""
  target, mask = affinities_from_labels(labels)
  p = np.clip(probabilities, 1e-4, 1 - 1e-4)
  bce = -(target * np.log(p) + (1 - target) * np.log1p(-p))
  positive = float(np.clip(target[mask > 0].mean() if mask.any() else 0.5, 0.05, 0.95))
  weight = np.where(target > 0.5, 0.5 / positive, 0.5 / (1 - positive))
  return (bce * weight * mask).sum(0).astype(np.float32)


def window_sums(values: np.ndarray, window) -> np.ndarray:
  """Sum of `values` (X, Y, Z) over every window of shape `window` inside it: float64
  (X - wx + 1, Y - wy + 1, Z - wz + 1), element [i, j, k] the window starting there."""
  table = np.pad(values.astype(np.float64), [(1, 0)] * 3).cumsum(0).cumsum(1).cumsum(2)
  wx, wy, wz = window
  return (table[wx:, wy:, wz:] - table[:-wx, wy:, wz:] - table[wx:, :-wy, wz:]
          - table[wx:, wy:, :-wz] + table[:-wx, :-wy, wz:] + table[:-wx, wy:, :-wz]
          + table[wx:, :-wy, :-wz] - table[:-wx, :-wy, :-wz])


class PatchSampler:
  """Random training patches with EM augmentations, deterministic from a seed.

  hard: optional per-volume error maps (X, Y, Z over the volume's z range, or None): a
  `hard_fraction` of the patches then start with probability proportional to the error they
  hold (hard-example mining). focus: optional per-volume maps of the same kind (e.g. where
  chosen ground-truth labels lie): a further `focus_fraction` of the patches start in
  proportion to them. The rest start uniformly."""

  def __init__(self, volumes, config: ModelConfig, isotropic: bool, seed: int = 0,
               z_range=None, augment: bool = True, hard=None, hard_fraction: float = 0.0,
               shape_descriptors=None, focus=None, focus_fraction: float = 0.0):
    self.volumes = volumes
    self.config = config
    self.augment = augment
    self.patch = np.array(config.patch_size, dtype=int)
    self.isotropic = isotropic
    # (axis, distance) of every affinity channel: short-range 0-2, long-range from channel 6
    self.affinities = [(axis, 1, axis) for axis in range(3)] + [
      (axis, d, 6 + i) for i, (axis, d) in enumerate(long_range_offsets(config.out_channels))]
    self.rng = np.random.default_rng(seed)
    self.z_range = z_range  # per volume (z0, z1) or None for all
    weights = np.array([v.weight for v in volumes], dtype=float)
    self.p = weights / weights.sum()
    self.fractions = (hard_fraction, focus_fraction)
    # float16 (10, X, Y, Z) local_shape_descriptors per volume, None where it has no labels
    self.shape_descriptors = shape_descriptors or [None] * len(volumes)
    first = (config.out_channels.index(LSD_CHANNELS[0])
             if LSD_CHANNELS[0] in config.out_channels else None)
    self.lsd = None if first is None else slice(first, first + len(LSD_CHANNELS))
    self.hard_starts = [self._start_distribution(m) for m in hard or [None] * len(volumes)]
    self.focus_starts = [self._start_distribution(m) for m in focus or [None] * len(volumes)]

  def _start_distribution(self, weights):
    """(shape of the patch starts, cumulative weight over them) for a weight map (X, Y, Z) of
    a volume's z range; None (uniform starts) for no map or an all-zero one."""
    if weights is None:
      return None
    # a patch start's window is what the loss sees: the patch after its context voxel
    size = np.minimum(self.patch + 1, weights.shape)
    context = (size > self.patch).astype(int)
    sums = window_sums(weights[context[0]:, context[1]:, context[2]:], size - context)
    return (sums.shape, np.cumsum(sums.ravel())) if sums.sum() > 0 else None

  def _z_bounds(self, index, vol):
    if self.z_range is None:
      return 0, vol.image.shape[2]
    return self.z_range[index]

  def sample(self, index=None):
    """-> (image float32 (1,X,Y,Z), target (C,X,Y,Z), mask (C,X,Y,Z)), C = the model's
    out_channels (affinities x,y,z; nucleus, mitochondria, synapse; long-range affinities)."""
    rng = self.rng
    if index is None:
      index = rng.choice(len(self.volumes), p=self.p)
    vol = self.volumes[index]
    z0, z1 = self._z_bounds(index, vol)
    shape = np.array(vol.image.shape[:2] + (z1 - z0,))
    size = np.minimum(self.patch + 1, shape)
    for starts, fraction in zip((self.hard_starts[index], self.focus_starts[index]),
                                self.fractions):
      if starts is not None and rng.random() < fraction:
        starts_shape, cumulative = starts
        flat = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1])),
                   len(cumulative) - 1)
        start = np.array(np.unravel_index(flat, starts_shape))
        break
    else:
      start = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, size)])
    start[2] += z0
    sl = tuple(slice(a, a + p) for a, p in zip(start, size))
    image = vol.image[sl]
    target = np.zeros((len(self.config.out_channels),) + image.shape, dtype=np.float32)
    mask = np.zeros_like(target)
    if vol.labels is not None:
      target[:3], mask[:3] = affinities_from_labels(vol.labels[sl])
      for d in sorted({d for _, d, c in self.affinities if c >= 6}):
        affs, valid = affinities_from_labels(vol.labels[sl], d)
        for axis, distance, c in self.affinities:
          if distance == d and c >= 6:
            target[c], mask[c] = affs[axis], valid[axis]
      descriptors = self.shape_descriptors[index]
      if self.lsd is not None and descriptors is not None:
        target[self.lsd] = descriptors[(slice(None),) + sl]
        mask[self.lsd] = vol.labels[sl] > 0
    for c, name in enumerate(ORGANELLE_CHANNELS):
      organelle = vol.organelle(name)
      if organelle is not None:
        target[3 + c] = organelle[sl] > 0
        mask[3 + c] = 1
    # drop the one-voxel context used for the low-border affinities
    crop = (slice(None),) + tuple(slice(1, None) if s > p else slice(None)
                                  for s, p in zip(size, self.patch))
    image = image[crop[1:]]
    target, mask = target[crop], mask[crop]
    if self.augment:
      image, target, mask = self._augment(image, target, mask)
    img = normalize_image(image, self.config)[None]
    if self.augment:
      img = img * rng.uniform(0.8, 1.2) + rng.uniform(-0.3, 0.3)
    return img.astype(np.float32), target, mask

  def _augment(self, image, target, mask):
    rng = self.rng
    # flips mirror the affinity definition (v vs v - d e) by d voxels: shift it back
    for axis in ((0, 1, 2) if self.isotropic else (0, 1)):
      if rng.random() < 0.5:
        image = np.flip(image, axis)
        target = np.flip(target, axis + 1)
        mask = np.flip(mask, axis + 1)
        for along, distance, c in self.affinities:
          if along != axis:
            continue
          target[c] = np.roll(target[c], distance, axis)
          mask[c] = np.roll(mask[c], distance, axis)
          edge = [slice(None)] * 3
          edge[axis] = slice(0, distance)
          mask[(c,) + tuple(edge)] = 0
        if self.lsd is not None:
          target[self.lsd] = mirror_shape_descriptors(target[self.lsd], axis)
    if rng.random() < 0.5 and image.shape[0] == image.shape[1]:
      # x <-> y: each affinity channel trades places with its partner on the other axis
      swap = list(range(len(target)))
      for axis, distance, c in self.affinities:
        if axis < 2:
          swap[c] = next(o for a, d, o in self.affinities if a == 1 - axis and d == distance)
      if self.lsd is not None:
        swap[self.lsd] = [self.lsd.start + c for c in LSD_XY_TRANSPOSED]
      image = image.transpose(1, 0, 2)
      target = target.transpose(0, 2, 1, 3)[swap]
      mask = mask.transpose(0, 2, 1, 3)[swap]
    if not self.isotropic and rng.random() < 0.1:
      # missing section: one z slice blanked, as in ssEM
      image = image.copy()
      image[:, :, rng.integers(0, image.shape[2])] = 0
    return (np.ascontiguousarray(image), np.ascontiguousarray(target),
            np.ascontiguousarray(mask))


def masked_balanced_bce(logits, target, mask):
  """BCE per channel, class-balanced inside the mask; channels without labels are skipped."""
  losses = []
  for c in range(target.shape[1]):
    m = mask[:, c]
    total = m.sum()
    if total < 1:
      continue
    t = target[:, c]
    pos = (t * m).sum()
    frac = (pos / total).clamp(0.05, 0.95)
    w = m * torch.where(t > 0.5, 0.5 / frac, 0.5 / (1 - frac))
    losses.append((F.binary_cross_entropy_with_logits(logits[:, c], t, reduction="none")
                   * w).sum() / total)
  return torch.stack(losses).mean()


def masked_soft_dice(logits, target, mask, channels) -> torch.Tensor:
  """Mean over `channels` of 1 - soft Dice (2·Σpt + 1) / (Σp + Σt + 1), summed over the batch
  inside the mask; channels without labels are skipped. The +1 makes a patch without the
  organelle push its predictions down instead of being undefined."""
  losses = []
  for c in channels:
    m = mask[:, c]
    if m.sum() < 1:
      continue
    p = torch.sigmoid(logits[:, c]) * m
    t = target[:, c] * m
    losses.append(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
  return torch.stack(losses).mean() if losses else logits.sum() * 0


def train(volumes, out_path: str, config: ModelConfig | None = None, iterations: int = 2000,
          batch_size: int = 2, lr: float = 2e-3, val_fraction: float = 0.2, seed: int = 0,
          resume: bool = False, device: str | None = None, command: str = "",
          checkpoint_every: int = 250, progress: bool = True, init: str | None = None,
          dice_weight: float = 0.0, hard_fraction: float = 0.0, lsd_sigma_nm: float = 0.0,
          lsd_weight: float = 1.0, focus_labels=(), focus_fraction: float = 0.0) -> dict:
  """Train a UNet3D on `volumes` (list[TrainingVolume]) and write a checkpoint to out_path.

  The top `val_fraction` of each volume's z range (at least one patch deep) is held out for
  validation; 0 trains on every section and skips validation (for volumes so thin that a
  held-out patch would cost much of the labelled data, when the evaluation region lies outside
  the training layers anyway). Resumable: the optimiser state lives in `out_path + '.state'`
  until training finishes.
  init: start from this checkpoint's weights (a file or a shipped model's name) instead of a
    random initialisation: fine-tuning. Its architecture is kept; `config` may only change
    the resolution.
  dice_weight: add this times the organelle channels' soft Dice loss (masked_soft_dice) to
    the class-balanced BCE, which alone leaves rare organelles over-predicted at p > 0.5.
  hard_fraction: hard-example mining for fine-tuning: before training, the starting model
    predicts every labelled training region, and this fraction of the patches is drawn where
    its affinities are most wrong (affinity_error_map; PatchSampler).
  focus_labels, focus_fraction: this fraction of the patches is drawn where these ground-truth
    neuron labels lie (in proportion to their voxels in the patch): a rare cell type the
    model gets wrong, such as the dark glia of the FIB medulla cube (docs/MEASUREMENTS.md).
  lsd_sigma_nm: > 0 adds local shape descriptors of the neuron labels at this Gaussian scale
    as an auxiliary target (MSE, times lsd_weight), the multi-task LSD setup of Sheridan et
    al. 2022; the saved checkpoint keeps only `config`'s channels.
  Returns the metadata written into the checkpoint (including validation metrics).
  """
  config = config or ModelConfig()
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  if device == "cpu":
    reuse_freed_memory()
  torch.manual_seed(seed)
  kept = len(config.out_channels)
  training_config = (replace(config, out_channels=config.out_channels + LSD_CHANNELS)
                     if lsd_sigma_nm > 0 else config)
  model = UNet3D(training_config).to(device)
  initial = None
  if init:
    start, start_meta = load_checkpoint(init, device=device)
    if replace(start.config, resolution=config.resolution) != config:
      raise IicatsError(f"--init {init}: its architecture ({start.config}) is not the one "
                        f"asked for ({config})")
    weights = start.state_dict()
    for name in ("head.weight", "head.bias"):  # new descriptor rows keep their random start
      weights[name] = torch.cat([weights[name], model.state_dict()[name][kept:]])
    model.load_state_dict(weights)
    initial = {"checkpoint": init, "training_command": start_meta.get("training_command")}
  optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
  scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=iterations)
  use_amp = device.startswith("cuda")
  scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
  state_path = out_path + ".state"
  start_iter = 0
  if resume and os.path.exists(state_path):
    try:
      state = torch.load(state_path, map_location=device, weights_only=True)
      model.load_state_dict(state["model"])
      optimizer.load_state_dict(state["optimizer"])
      scheduler.load_state_dict(state["scheduler"])
      start_iter = int(state["iteration"])
    except Exception as err:
      why = str(err).split("\n", 1)[0]
      raise IicatsError(f"--resume: {state_path} is not a training state of this model and "
                        f"these options ({type(err).__name__}: {why}); "
                        "resume with the options it was started with, or delete it to start "
                        "afresh") from None
    if start_iter >= iterations:
      raise IicatsError(f"--resume: {state_path} has already run {start_iter} iterations; "
                        f"--iterations {iterations} leaves nothing to do")
  train_range, val_range = [], []
  for vol in volumes:
    nz = vol.image.shape[2]
    need = config.patch_size[2] + 1
    cut = nz if val_fraction == 0 else min(int(round(nz * (1 - val_fraction))), nz - need)
    if cut < need:
      needed, what = ((need, "a training patch") if val_fraction == 0 else
                      (2 * need, "a training and a validation patch"))
      hint = "" if val_fraction == 0 else " (or train on every slice: --val-fraction 0)"
      raise IicatsError(f"training volume {vol.name}: {nz} z slices; need at least {needed} "
                        f"for {what}{hint}")
    train_range.append((0, cut))
    val_range.append((cut, nz))
  isotropic = all(d[2] == 2 for d in config.downsample)
  organelles = [config.out_channels.index(name) for name in ORGANELLE_CHANNELS]
  hard = None
  if hard_fraction > 0:
    from .inference import predict_volume
    model.eval()
    hard = [None if vol.labels is None else affinity_error_map(
              predict_volume(model, np.ascontiguousarray(vol.image[..., z0:z1]),
                             device=device, progress=progress)[:3], vol.labels[..., z0:z1])
            for vol, (z0, z1) in zip(volumes, train_range)]
  focus = None
  if focus_fraction > 0 and len(focus_labels):
    focus = [None if vol.labels is None else
             np.isin(vol.labels[..., z0:z1], focus_labels).astype(np.float32)
             for vol, (z0, z1) in zip(volumes, train_range)]
    if not any(m is not None and m.any() for m in focus):
      raise IicatsError(f"--focus-labels {','.join(map(str, focus_labels))}: none of these "
                        "labels lies in the training region of any --labels layer")
  descriptors = None
  if lsd_sigma_nm > 0:
    sigma = lsd_sigma_nm / np.asarray(config.resolution, dtype=float)
    descriptors = [None if vol.labels is None else
                   local_shape_descriptors(vol.labels, sigma).astype(np.float16)
                   for vol in tqdm(volumes, desc="shape descriptors", disable=not progress)]
  sampler = PatchSampler(volumes, training_config, isotropic, seed=seed + start_iter,
                         z_range=train_range, hard=hard, hard_fraction=hard_fraction,
                         shape_descriptors=descriptors, focus=focus,
                         focus_fraction=focus_fraction)
  started = time.time()
  model.train()
  bar = tqdm(range(start_iter, iterations), desc="train", disable=not progress,
             initial=start_iter, total=iterations)
  running = best = None  # the loss's moving average, and its lowest
  for it in bar:
    batch = [sampler.sample() for _ in range(batch_size)]
    img, target, mask = (torch.from_numpy(np.stack(x)).to(device) for x in zip(*batch))
    with torch.autocast(device_type="cuda", enabled=use_amp):
      logits = model(img)
    logits = logits.float()
    loss = masked_balanced_bce(logits[:, :kept], target[:, :kept], mask[:, :kept])
    if lsd_sigma_nm > 0:
      squared = (torch.sigmoid(logits[:, kept:]) - target[:, kept:]) ** 2 * mask[:, kept:]
      loss = loss + lsd_weight * squared.sum() / mask[:, kept:].sum().clamp(min=1)
    if dice_weight:
      loss = loss + dice_weight * masked_soft_dice(logits, target, mask, organelles)
    if not torch.isfinite(loss):
      raise IicatsError(f"training diverged: the loss is {loss.item()} at iteration {it + 1} "
                        f"(learning rate {lr:g}); lower --lr. {out_path} is not written")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
    best = running if best is None else min(best, running)
    if running > DIVERGED * max(best, math.log(2)):
      raise IicatsError(f"training diverged: the loss rose to {running:.4g} at iteration "
                        f"{it + 1} from {best:.4g} (learning rate {lr:g}); lower --lr. "
                        f"{out_path} is not written")
    bar.set_postfix(loss=f"{running:.4f}")
    if (it + 1) % checkpoint_every == 0 and it + 1 < iterations:
      torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "iteration": it + 1}, state_path)
  validation = validate(model, volumes, val_range, training_config, device)
  metadata = {
    "training_command": command, "iterations": iterations, "batch_size": batch_size,
    "learning_rate": lr, "seed": seed, "device": device, "dice_weight": dice_weight,
    "hard_example_fraction": hard_fraction,
    "focus": ({"labels": [int(x) for x in focus_labels], "fraction": focus_fraction}
              if focus is not None else None),
    "shape_descriptors": ({"sigma_nm": lsd_sigma_nm, "weight": lsd_weight}
                          if lsd_sigma_nm > 0 else None),
    "validation_fraction": val_fraction,
    "wall_time_s": round(time.time() - started, 1), "final_train_loss": running,
    "training_data": [{"name": v.name, "shape_xyz": list(v.image.shape),
                       "labels": [k for k in ("labels",) + ORGANELLE_CHANNELS
                                  if getattr(v, k) is not None]} for v in volumes],
    "validation": validation,
  }
  taught = trained_outputs({"training_data": metadata["training_data"]})
  if initial:
    metadata["initialised_from"] = initial
    earlier = trained_outputs(start_meta)
    taught = None if earlier is None else taught | earlier
  if taught is not None:
    metadata["trained_outputs"] = sorted(taught)
  if training_config != config:
    saved = UNet3D(config)
    weights = model.state_dict()
    for name in ("head.weight", "head.bias"):
      weights[name] = weights[name][:kept]
    saved.load_state_dict(weights)
    model = saved
  save_checkpoint(out_path, model.eval(), metadata)
  if os.path.exists(state_path):
    os.remove(state_path)
  return metadata


@torch.no_grad()
def validate(model, volumes, val_range, config, device, patches_per_volume=8) -> dict:
  """Affinity average precision and organelle Dice on fixed held-out patches per volume."""
  isotropic = all(d[2] == 2 for d in config.downsample)
  sampler = PatchSampler(volumes, config, isotropic, seed=12345, z_range=val_range,
                         augment=False)
  model.eval()
  out = {}
  for index, vol in enumerate(volumes):
    z0, z1 = val_range[index]
    if z1 - z0 < 4:
      continue
    preds, targets, masks = [], [], []
    for _ in range(patches_per_volume):
      img, t, m = sampler.sample(index)
      preds.append(torch.sigmoid(model(torch.from_numpy(img[None]).to(device))).cpu().numpy()[0])
      targets.append(t)
      masks.append(m)
    p, t, m = np.stack(preds), np.stack(targets), np.stack(masks)
    scores = {}
    if m[:, :3].any():
      scores.update(affinity_average_precision(p[:, :3], t[:, :3], m[:, :3]))
    for c, name in enumerate(ORGANELLE_CHANNELS):
      if m[:, 3 + c].any():
        scores[f"{name}_dice"] = dice(p[:, 3 + c] > 0.5, t[:, 3 + c] > 0.5)
    out[vol.name] = scores
  return out
