"""Residual symmetric 3D U-Net for affinities + organelles, and its checkpoint format.

Output channels (in this order): affinity x, affinity y, affinity z (each between a voxel and
its neighbour at -1 along the axis), then nucleus, mitochondria, synapse probabilities.
Tensors are (batch, channel, x, y, z), matching CloudVolume's (x, y, z) axis order.

Checkpoints are safetensors files: weights plus a JSON metadata record (architecture, input
resolution, patch size, output channels, normalisation, training data and command, metrics).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, asdict

import numpy as np
import torch
from torch import nn

from .errors import IicatsError

AFFINITY_CHANNELS = ("affinity_x", "affinity_y", "affinity_z")
ORGANELLE_CHANNELS = ("nucleus", "mitochondria", "synapse")


def long_range_channels(distances) -> tuple:
  """Channel names of long-range affinities: x, y, z to the -d neighbour for each distance d
  (voxels), e.g. (3,) -> ("affinity_x3", "affinity_y3", "affinity_z3"). Models put them after
  the organelle channels; the affinities layer after the three short-range ones."""
  return tuple(f"{name}{int(d)}" for d in distances for name in AFFINITY_CHANNELS)


def long_range_offsets(out_channels) -> list:
  """(axis 0/1/2, distance) of each long-range channel in a model's out_channels, in order."""
  first = len(AFFINITY_CHANNELS) + len(ORGANELLE_CHANNELS)
  return [("xyz".index(name[len("affinity_")]), int(name[len("affinity_") + 1:]))
          for name in out_channels[first:] if name.startswith("affinity_")]


# local shape descriptors (Sheridan et al. 2022), an auxiliary training target only: the head
# rows that predict them are dropped from the saved checkpoint (iicats_cv.train)
LSD_CHANNELS = ("lsd_offset_x", "lsd_offset_y", "lsd_offset_z", "lsd_var_x", "lsd_var_y",
                "lsd_var_z", "lsd_cov_xy", "lsd_cov_xz", "lsd_cov_yz", "lsd_size")
CHECKPOINT_FORMAT = "iicats-cv/unet3d/1"


@dataclass
class ModelConfig:
  """Architecture and I/O contract of a checkpoint."""
  in_channels: int = 1
  width: tuple = (12, 24, 48)
  # per-level pooling factors (x,y,z): (2,2,1) keeps z for anisotropic ssEM
  downsample: tuple = ((2, 2, 2), (2, 2, 2))
  out_channels: tuple = AFFINITY_CHANNELS + ORGANELLE_CHANNELS
  patch_size: tuple = (48, 48, 48)        # x,y,z voxels at inference
  resolution: tuple = (10.0, 10.0, 10.0)   # nm, the resolution it was trained at
  # input normalisation: (image/255 - mean) / std
  norm_mean: float = 0.5
  norm_std: float = 0.25

  def to_json(self) -> str:
    return json.dumps(asdict(self))

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    raw = json.loads(text)
    raw["width"] = tuple(raw["width"])
    raw["downsample"] = tuple(tuple(d) for d in raw["downsample"])
    for key in ("out_channels", "patch_size", "resolution"):
      raw[key] = tuple(raw[key])
    return cls(**raw)


def _conv(cin, cout, kernel):
  pad = tuple(k // 2 for k in kernel)
  return nn.Conv3d(cin, cout, kernel, padding=pad)


class ResBlock(nn.Module):
  """conv(3x3x1-ish) -> two 3x3x3 convs with a residual connection (rsunet style)."""

  def __init__(self, cin, cout, anisotropic: bool):
    super().__init__()
    first = (3, 3, 1) if anisotropic else (3, 3, 3)
    self.entry = _conv(cin, cout, first)
    self.body = nn.Sequential(
      nn.GroupNorm(4, cout), nn.ELU(inplace=True), _conv(cout, cout, (3, 3, 3)),
      nn.GroupNorm(4, cout), nn.ELU(inplace=True), _conv(cout, cout, (3, 3, 3)),
    )
    self.out = nn.Sequential(nn.GroupNorm(4, cout), nn.ELU(inplace=True))

  def forward(self, x):
    x = self.entry(x)
    return self.out(x + self.body(x))


class UNet3D(nn.Module):
  """Residual symmetric U-Net. forward(x) -> logits (B, C_out, X, Y, Z).

  `embed(x)` returns the decoder's last feature map (B, width[0], X, Y, Z), the voxel
  embedding used by few-shot organelle heads.
  """

  def __init__(self, config: ModelConfig):
    super().__init__()
    self.config = config
    widths = list(config.width)
    if len(config.downsample) != len(widths) - 1:
      raise ValueError("need one downsample factor per level transition")
    self.down_blocks = nn.ModuleList()
    self.pools = nn.ModuleList()
    cin = config.in_channels
    for level, w in enumerate(widths):
      aniso = level < len(config.downsample) and config.downsample[level][2] == 1
      self.down_blocks.append(ResBlock(cin, w, anisotropic=aniso))
      cin = w
      if level < len(config.downsample):
        self.pools.append(nn.MaxPool3d(config.downsample[level]))
    self.ups = nn.ModuleList()
    self.up_blocks = nn.ModuleList()
    for level in reversed(range(len(widths) - 1)):
      factor = config.downsample[level]
      self.ups.append(nn.Sequential(
        nn.Upsample(scale_factor=factor, mode="trilinear", align_corners=False),
        _conv(widths[level + 1], widths[level], (1, 1, 1))))
      self.up_blocks.append(ResBlock(widths[level], widths[level], anisotropic=factor[2] == 1))
    self.head = nn.Conv3d(widths[0], len(config.out_channels), 1)

  def embed(self, x):
    skips = []
    for level, block in enumerate(self.down_blocks):
      x = block(x)
      if level < len(self.pools):
        skips.append(x)
        x = self.pools[level](x)
    for up, block in zip(self.ups, self.up_blocks):
      x = block(up(x) + skips.pop())
    return x

  def forward(self, x):
    return self.head(self.embed(x))

  def min_input_multiple(self) -> np.ndarray:
    """Input sizes (x,y,z) must be multiples of this."""
    return np.prod(np.array(self.config.downsample, dtype=int), axis=0)


def normalize_image(image: np.ndarray, config: ModelConfig) -> np.ndarray:
  """uint8 image (any shape) -> float32 normalised network input."""
  return ((image.astype(np.float32) / 255.0) - config.norm_mean) / config.norm_std


def reuse_freed_memory() -> bool:
  """Let this process reuse the memory it frees instead of returning it to the OS (glibc).

  A CPU forward pass allocates and frees activations of tens of MB per layer. glibc serves
  such blocks with fresh mmaps whose pages the kernel zeroes on first touch, so every patch
  pays page faults again: measured 13% of the forward time on a 2-core machine, and 17% more
  inside the blending loop, whose numpy temporaries keep glibc's adaptive threshold low.
  Fixing the mmap threshold at its ceiling (32 MB) and trimming only above 1 GB keeps the
  blocks in the heap (PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for the same
  reason). Process-wide; a no-op (returns False) where the C library is not glibc.
  """
  import ctypes
  import ctypes.util
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3
  return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def save_checkpoint(path: str, model: UNet3D, metadata: dict | None = None) -> None:
  """Write weights + metadata to a safetensors file (atomically)."""
  from safetensors.torch import save_file
  meta = {"format": CHECKPOINT_FORMAT, "config": model.config.to_json(),
          "metadata": json.dumps(metadata or {})}
  tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
  tmp = f"{path}.tmp"
  save_file(tensors, tmp, metadata=meta)
  # safetensors creates the file owner-only (0600): give it the mode any new file gets, so
  # workers running as other users can read a checkpoint on a shared filesystem
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)
  os.replace(tmp, path)


# models shipped in iicats_cv/data, by the name `--checkpoint` accepts (see MODEL_CARD.md)
SHIPPED_MODELS = {"default": "default_model.safetensors", "vnc": "vnc_model.safetensors"}


def default_checkpoint_path(name: str = "default") -> str:
  return os.path.join(os.path.dirname(__file__), "data", SHIPPED_MODELS[name])


def resolve_checkpoint(path: str | None) -> str:
  """A checkpoint file path, a cloudpath (gs://, s3://, file://: fetched once per machine into
  a local cache), or a shipped model's name (None = "default") -> its local file path."""
  if (path or "default") in SHIPPED_MODELS:
    path = default_checkpoint_path(path or "default")
  elif path.startswith("file://"):
    path = path[len("file://"):]
  elif "://" in path:
    path = _fetched_checkpoint(path)
  if not os.path.exists(path):
    raise IicatsError(f"checkpoint {path}: file not found")
  return path


_PUBLISHED_NAME = re.compile(r"^[0-9a-f]{16}\.safetensors$")  # publish_checkpoint's names


def _fetched_checkpoint(cloudpath: str) -> str:
  """A local copy of a checkpoint in a bucket: kept in the temporary folder when its name is
  publish_checkpoint's (unique to its content, so never stale), else fetched afresh."""
  import tempfile
  from cloudfiles import CloudFiles
  from .layers import resolve_cloudpath
  directory, name = cloudpath.rstrip("/").rsplit("/", 1)
  cache = os.path.join(tempfile.gettempdir(), "iicats-checkpoints")
  local = os.path.join(cache, name)
  if _PUBLISHED_NAME.match(name) and os.path.exists(local):
    return local
  data = CloudFiles(resolve_cloudpath(directory)).get(name)
  if data is None:
    raise IicatsError(f"checkpoint {cloudpath}: no such object")
  os.makedirs(cache, exist_ok=True)
  if not _PUBLISHED_NAME.match(name):
    local = tempfile.mkstemp(suffix=".safetensors", dir=cache)[1]
  partial = f"{local}.{os.getpid()}.part"
  with open(partial, "wb") as fh:
    fh.write(data)
  os.replace(partial, local)  # atomic: another worker process never reads half a file
  return local


def publish_checkpoint(path: str | None, prefix: str) -> str:
  """Where a fleet's workers read a checkpoint: a shipped model's name as it is (every
  install has it); any other checkpoint (a file, or an object that may change) copied to
  PREFIX/<sha1 of its bytes>.safetensors (once) and that cloudpath, so workers on other
  machines need no copy of the driver's file and never cache a stale one."""
  import hashlib
  from cloudfiles import CloudFiles
  from .layers import join, resolve_cloudpath
  if (path or "default") in SHIPPED_MODELS:
    return path or ""
  local = resolve_checkpoint(path)
  with open(local, "rb") as fh:
    data = fh.read()
  name = hashlib.sha1(data).hexdigest()[:16] + ".safetensors"
  files = CloudFiles(resolve_cloudpath(prefix))
  if not files.exists(name):
    files.put(name, data, compress=None, content_type="application/octet-stream")
  return join(prefix, name)


def load_checkpoint(path: str | None = None, device: str = "cpu") -> tuple[UNet3D, dict]:
  """Load a checkpoint -> (model in eval mode, metadata dict). Clear errors when unusable.

  path: a .safetensors file, a shipped model's name (SHIPPED_MODELS: "default" for 10 nm
  isotropic EM, "vnc" for ~4.6×4.6×47 nm ssTEM organelles), or None for "default"."""
  from safetensors import safe_open
  from safetensors.torch import load_file
  path = resolve_checkpoint(path)
  try:
    with safe_open(path, framework="pt") as handle:
      header = handle.metadata() or {}
    tensors = load_file(path, device="cpu")
  except Exception as err:
    raise IicatsError(f"checkpoint {path}: not a readable safetensors checkpoint ({err})")
  if header.get("format") != CHECKPOINT_FORMAT:
    raise IicatsError(f"checkpoint {path}: format '{header.get('format')}' is not "
                      f"'{CHECKPOINT_FORMAT}'")
  try:
    config = ModelConfig.from_json(header["config"])
    metadata = json.loads(header.get("metadata", "{}"))
    model = UNet3D(config)
    model.load_state_dict(tensors, strict=True)
  except Exception as err:
    raise IicatsError(f"checkpoint {path}: weights do not match its architecture ({err})")
  broken = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
  if broken:
    raise IicatsError(f"checkpoint {path}: {len(broken)} weight tensor(s) hold NaN or inf "
                      f"({', '.join(broken[:3])}): its training diverged")
  model.eval().to(device)
  return model, metadata


def checkpoint_metadata(path: str | None = None) -> dict:
  """The metadata record of a checkpoint (file or shipped model name), without its weights."""
  from safetensors import safe_open
  path = resolve_checkpoint(path)
  try:
    with safe_open(path, framework="pt") as handle:
      return json.loads((handle.metadata() or {}).get("metadata", "{}"))
  except Exception as err:
    raise IicatsError(f"checkpoint {path}: not a readable safetensors checkpoint ({err})")


def trained_outputs(metadata: dict) -> set | None:
  """What a checkpoint's training taught: a subset of {"affinities"} | ORGANELLE_CHANNELS, or
  None where its record does not say (a checkpoint of an older version fine-tuned from
  another, whose training data went unrecorded)."""
  if "trained_outputs" in metadata:
    return set(metadata["trained_outputs"])
  if "initialised_from" in metadata or not metadata.get("training_data"):
    return None
  return {"affinities" if name == "labels" else name
          for volume in metadata["training_data"] for name in volume["labels"]}


def update_checkpoint_metadata(source: str | None, out: str, updates: dict) -> None:
  """Write checkpoint `source`'s weights to `out` (atomically; may be `source` itself) with its
  metadata record updated by `updates`; the weights are copied unchanged."""
  model, metadata = load_checkpoint(source)
  save_checkpoint(out, model, {**metadata, **updates})
