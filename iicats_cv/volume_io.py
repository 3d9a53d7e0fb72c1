"""Read local array files (.npy, .npz, .tif/.tiff, .h5/.hdf5) and write them as precomputed
layers (what `iicats import` does)."""
from __future__ import annotations

import os

import numpy as np

from .errors import IicatsError
from .layers import create_layer, normalize_cloudpath, layer_exists

SUFFIXES = (".npy", ".npz", ".tif", ".tiff", ".h5", ".hdf5")


def read_array(path: str, key: str | None = None) -> np.ndarray:
  """Load one array from a local file; `key` picks the array/dataset in .npz/.h5 files."""
  if not os.path.exists(path):
    raise IicatsError(f"{path}: no such file")
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


def to_xyz(array: np.ndarray, axes: str) -> np.ndarray:
  """Reorder a 3D array from `axes` ('zyx' or 'xyz') to (x, y, z)."""
  if array.ndim != 3:
    raise IicatsError(f"expected a 3D volume, got shape {array.shape}")
  if axes == "xyz":
    return array
  if axes == "zyx":
    return array.transpose(2, 1, 0)
  raise IicatsError(f"--axes must be zyx or xyz, got '{axes}'")


def import_volume(array_xyz: np.ndarray, dest: str, layer_type: str, resolution, offset=(0, 0, 0),
                  chunk_size=(64, 64, 64), overwrite: bool = False, source: str = "") -> str:
  """Write an (x, y, z) array as a precomputed layer. Images must be uint8 (other integer or
  float images are rescaled to 0..255); segmentations are stored as uint64 with
  compressed_segmentation (uint32 kept as is)."""
  dest = normalize_cloudpath(dest)
  if layer_type == "image":
    if array_xyz.dtype != np.uint8:
      data = array_xyz.astype(np.float64)
      lo, hi = np.nanmin(data), np.nanmax(data)
      array_xyz = np.zeros(data.shape, np.uint8) if hi <= lo else \
        np.rint((data - lo) / (hi - lo) * 255).astype(np.uint8)
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
  if layer_exists(dest) and not overwrite:
    raise IicatsError(f"{dest}: a layer already exists there (use --overwrite to replace it)")
  cv = create_layer(dest, layer_type=layer_type, dtype=dtype, resolution=resolution,
                    voxel_offset=offset, volume_size=array_xyz.shape, chunk_size=chunk_size,
                    encoding=encoding, step="import", params={"source": source},
                    overwrite=overwrite)
  cv[:, :, :] = np.ascontiguousarray(array_xyz)
  return dest
