"""Read local array files (.npy, .npz, .tif/.tiff, .h5/.hdf5, or a folder of 2D sections) and
write them as precomputed layers (what `iicats import` does)."""
from __future__ import annotations

import os
import shutil

import numpy as np
from cloudfiles import CloudFiles
from tqdm import tqdm

from .errors import IicatsError
from .layers import (create_layer, layer_exists, local_path, normalize_cloudpath,
                     resolve_cloudpath)

SUFFIXES = (".npy", ".npz", ".tif", ".tiff", ".h5", ".hdf5")


SECTION_SUFFIXES = (".tif", ".tiff", ".png")


def read_array(path: str, key: str | None = None) -> np.ndarray:
  """Load one array from a local file; `key` picks the array/dataset in .npz/.h5 files. A
  folder of 2D sections (.tif/.tiff/.png, one per z in name order) is stacked: (z, y, x)."""
  if not os.path.exists(path):
    raise IicatsError(f"{path}: no such file")
  if os.path.isdir(path):
    return read_sections(path)
  suffix = os.path.splitext(path)[1].lower()
  try:
    if suffix == ".npy":
      return np.load(path, allow_pickle=False)
    if suffix == ".npz":
      with np.load(path, allow_pickle=False) as npz:
        names = list(npz.files)
        name = key or (names[0] if len(names) == 1 else None)
        if name not in names:
          raise IicatsError(f"{path}: choose an array with --key (it has: {', '.join(names)})")
        return npz[name]
    if suffix in (".tif", ".tiff"):
      import tifffile
      return tifffile.imread(path)
    if suffix in (".h5", ".hdf5"):
      import h5py
      with h5py.File(path, "r") as h5:
        names = []
        h5.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        name = key or (names[0] if len(names) == 1 else None)
        if name not in names:
          raise IicatsError(f"{path}: choose a dataset with --key (it has: {', '.join(names)})")
        return h5[name][...]
  except IicatsError:
    raise
  except Exception as err:
    raise IicatsError(f"{path}: cannot read ({type(err).__name__}: {err})")
  raise IicatsError(f"{path}: unsupported file type '{suffix}' (use {', '.join(SUFFIXES)})")


def read_sections(folder: str) -> np.ndarray:
  """A folder of 2D images, one section each, sorted by name with numbers compared as numbers
  (s2.png before s10.png), as a (z, y, x) array."""
  import re
  names = sorted((n for n in os.listdir(folder) if n.lower().endswith(SECTION_SUFFIXES)),
                 key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
  if not names:
    raise IicatsError(f"{folder}: a folder with no sections (expected "
                      f"{', '.join(SECTION_SUFFIXES)} files, one per z)")
  sections = []
  for name in tqdm(names, desc="sections", unit="section", leave=False):
    section = _read_section(os.path.join(folder, name))
    if sections and (section.shape, section.dtype) != (sections[0].shape, sections[0].dtype):
      raise IicatsError(f"{folder}/{name}: {section.shape} {section.dtype}, but {names[0]} is "
                        f"{sections[0].shape} {sections[0].dtype}: sections must match")
    sections.append(section)
  return np.stack(sections)


def _read_section(path: str) -> np.ndarray:
  try:
    if path.lower().endswith(".png"):
      from PIL import Image
      with Image.open(path) as image:
        section = np.asarray(image)
    else:
      import tifffile
      section = tifffile.imread(path)
  except Exception as err:
    raise IicatsError(f"{path}: cannot read ({type(err).__name__}: {err})")
  if section.ndim != 2:
    raise IicatsError(f"{path}: a section must be one 2D grey image, got shape {section.shape}")
  return section


def to_xyz(array: np.ndarray, axes: str, source: str = "volume") -> np.ndarray:
  """Reorder a 3D array from `axes` ('zyx' or 'xyz') to (x, y, z); source names it in
  errors."""
  if array.ndim != 3:
    raise IicatsError(f"{source}: expected a 3D volume, got shape {array.shape}")
  if 0 in array.shape:
    raise IicatsError(f"{source}: empty volume, shape {array.shape}")
  if axes == "xyz":
    return array
  if axes == "zyx":
    return array.transpose(2, 1, 0)
  raise IicatsError(f"--axes must be zyx or xyz, got '{axes}'")


# grey values of a non-uint8 image mapped onto 0..255: its 0.05th to 99.95th percentiles, so
# that a few hot or dead pixels of a uint16 detector do not flatten the contrast
IMAGE_WINDOW_PERCENTILES = (0.05, 99.95)


def uint8_window(image: np.ndarray) -> tuple[float, float]:
  """The grey values (lo, hi) of a non-uint8 image that import maps to 0 and 255: its
  IMAGE_WINDOW_PERCENTILES, from at most ~10⁷ evenly strided voxels."""
  step = max(1, int(np.ceil((image.size / 1e7) ** (1 / 3))))
  sample = np.asarray(image[::step, ::step, ::step], dtype=np.float64)
  sample = sample[np.isfinite(sample)]
  if not sample.size:
    return 0.0, 0.0
  lo, hi = np.percentile(sample, IMAGE_WINDOW_PERCENTILES)
  return float(lo), float(hi)


def to_uint8(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
  """Grey values of any numeric dtype -> uint8: window (lo, hi) mapped linearly onto 0..255,
  clipped (NaN counts as lo); an empty window (hi <= lo) gives zeros."""
  lo, hi = window
  data = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=lo)
  if hi <= lo:
    return np.zeros(data.shape, np.uint8)
  return np.rint(np.clip((data - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def import_volume(array_xyz: np.ndarray, dest: str, layer_type: str, resolution, offset=(0, 0, 0),
                  chunk_size=(64, 64, 64), overwrite: bool = False, source: str = "",
                  window: tuple[float, float] | None = None) -> str:
  """Write an (x, y, z) array as a precomputed layer. Images are stored as uint8: others are
  mapped linearly from window (default: uint8_window) to 0..255, clipped and recorded in the
  provenance; segmentations are stored as uint64 with compressed_segmentation (uint32 kept
  as is)."""
  dest = normalize_cloudpath(dest)
  params = {"source": source}
  if layer_type == "image":
    if array_xyz.dtype != np.uint8:
      window = window or uint8_window(array_xyz)
      params["grey_values_mapped_to_0_255"] = list(window)
      array_xyz = to_uint8(array_xyz, window)
    dtype, encoding = "uint8", "raw"
  elif layer_type == "segmentation":
    if not np.issubdtype(array_xyz.dtype, np.integer) and array_xyz.dtype != bool:
      raise IicatsError(f"{source or dest}: segmentation must be integer labels, "
                        f"got {array_xyz.dtype}")
    if array_xyz.dtype.kind == "i" and array_xyz.size and array_xyz.min() < 0:
      raise IicatsError(f"{source or dest}: segmentation has negative labels")
    dtype = "uint32" if array_xyz.dtype in (np.uint32, np.uint16, np.uint8, bool) else "uint64"
    array_xyz = array_xyz.astype(dtype)
    encoding = "compressed_segmentation"
  else:
    raise IicatsError(f"--type must be image or segmentation, got '{layer_type}'")
  if layer_exists(dest):
    if not overwrite:
      raise IicatsError(f"{dest}: a layer already exists there (use --overwrite to replace it)")
    # the whole old layer goes: chunks the new one does not cover, its other scales, meshes
    # and skeletons would otherwise stay and be read as part of it
    if local_path(dest):  # file:// deletes leave the folders behind
      shutil.rmtree(local_path(dest))
    else:
      files = CloudFiles(resolve_cloudpath(dest))
      files.delete(list(files.list()))
  cv = create_layer(dest, layer_type=layer_type, dtype=dtype, resolution=resolution,
                    voxel_offset=offset, volume_size=array_xyz.shape, chunk_size=chunk_size,
                    encoding=encoding, step="import", params=params,
                    overwrite=overwrite)
  cv[:, :, :] = np.ascontiguousarray(array_xyz)
  return dest
