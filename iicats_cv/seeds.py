"""Seed points for tracking: a CSV of x,y,z in nm, or a Neuroglancer state whose point
annotation layer marks identified cells (e.g. from staining)."""
from __future__ import annotations

import csv
import json
import os

import numpy as np

from .errors import IicatsError


def read_seed_points(path: str) -> np.ndarray:
  """-> float64 (N, 3) seed positions in nm (x, y, z).

  CSV: a header with x,y,z (nm). JSON: a Neuroglancer state; every point annotation of
  every annotation layer is a seed. State coordinates are converted to nm with the state's
  `dimensions` (e.g. {"x": [8e-9, "m"], ...}).
  """
  if not os.path.exists(path):
    raise IicatsError(f"seeds {path}: no such file")
  if path.lower().endswith(".json"):
    return _points_from_state(path)
  with open(path, newline="") as fh:
    rows = list(csv.reader(fh))
  if not rows or [c.strip().lower() for c in rows[0][:3]] != ["x", "y", "z"]:
    raise IicatsError(f"seeds {path}: line 1 must be the header x,y,z (positions in nm)")
  points = []
  for number, row in enumerate(rows[1:], start=2):
    if not row or not "".join(row).strip():
      continue
    try:
      point = [float(v) for v in row[:3]]
    except ValueError:
      raise IicatsError(f"seeds {path}: line {number}: not three numbers: {','.join(row)}")
    if len(point) != 3 or not np.all(np.isfinite(point)):
      raise IicatsError(f"seeds {path}: line {number}: expected x,y,z, got {','.join(row)}")
    points.append(point)
  if not points:
    raise IicatsError(f"seeds {path}: no seed points")
  return np.array(points, dtype=np.float64)


def _points_from_state(path: str) -> np.ndarray:
  try:
    with open(path) as fh:
      state = json.load(fh)
  except json.JSONDecodeError as err:
    raise IicatsError(f"seeds {path}: not valid JSON ({err})")
  dims = state.get("dimensions", {})
  scale = []
  for axis in "xyz":
    value, unit = dims.get(axis, [1e-9, "m"])
    factor = {"m": 1e9, "nm": 1.0, "um": 1e3, "µm": 1e3}.get(unit)
    if factor is None:
      raise IicatsError(f"seeds {path}: unknown unit '{unit}' for dimension {axis}")
    scale.append(value * factor)
  points = []
  for layer in state.get("layers", []):
    if layer.get("type") != "annotation":
      continue
    for annotation in layer.get("annotations", []):
      if annotation.get("type") == "point":
        points.append(np.asarray(annotation["point"][:3], dtype=float) * scale)
  if not points:
    raise IicatsError(f"seeds {path}: the state has no point annotations")
  return np.array(points, dtype=np.float64)


def seeds_in_volume(points_nm: np.ndarray, bounds_vx, resolution, path: str) -> np.ndarray:
  """The seeds (float64 (N, 3), nm, x,y,z) that lie in the volume of bounds_vx (a CloudVolume
  Bbox in voxels) at resolution (nm, x,y,z): none is an IicatsError naming the volume's
  extent; some outside are skipped with a note (a points file may cover more than the run)."""
  resolution = np.asarray(resolution, dtype=float)
  lo = np.asarray(bounds_vx.minpt, dtype=float) * resolution
  hi = np.asarray(bounds_vx.maxpt, dtype=float) * resolution
  inside = np.all((points_nm >= lo) & (points_nm < hi), axis=1)
  extent = ", ".join(f"{a:g}-{b:g}" for a, b in zip(lo, hi))
  if not inside.any():
    first = ", ".join(f"{v:g}" for v in points_nm[0])
    raise IicatsError(f"seeds {path}: none of the {len(points_nm)} point(s) lies in the volume "
                      f"(x, y, z extent {extent} nm; the first is at {first} nm)")
  if not inside.all():
    print(f"note: seeds {path}: {int((~inside).sum())} of {len(points_nm)} point(s) lie "
          f"outside the volume (x, y, z extent {extent} nm) and are skipped", flush=True)
  return points_nm[inside]
