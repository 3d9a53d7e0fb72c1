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

  path: a CSV with the header x,y,z (nm); a Neuroglancer state (.json); a Neuroglancer link
  (https://…#!{…}), given as is or in a file. In a state every point annotation of every
  local annotation layer is a seed, converted to nm with the layer's own coordinate space
  (its source's outputDimensions, as Neuroglancer writes them) or else the state's
  `dimensions`.
  """
  if _is_link(path):
    return _points_from_state(_state_of_link(path, path), "the link")
  if not os.path.exists(path):
    raise IicatsError(f"seeds {path}: no such file")
  if path.lower().endswith(".json"):
    try:
      with open(path) as fh:
        return _points_from_state(json.load(fh), path)
    except json.JSONDecodeError as err:
      raise IicatsError(f"seeds {path}: not valid JSON ({err})")
  with open(path, newline="") as fh:
    text = fh.read()
  if _is_link(text.strip()):
    return _points_from_state(_state_of_link(text.strip(), path), path)
  rows = list(csv.reader(text.splitlines()))
  if not rows or [c.strip().lower() for c in rows[0][:3]] != ["x", "y", "z"]:
    raise IicatsError(f"seeds {path}: line 1 must be the header x,y,z (positions in nm), or "
                      "the file a Neuroglancer state or link")
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


def _is_link(text: str) -> bool:
  return text.startswith(("http://", "https://")) and "#!" in text


def _state_of_link(url: str, where: str) -> dict:
  import neuroglancer
  try:
    return neuroglancer.parse_url(url).to_json()
  except Exception as err:  # the package raises whatever its JSON decoding meets
    raise IicatsError(f"seeds {where}: not a Neuroglancer link with a state ({err})")


_UNIT_NM = {"m": 1e9, "nm": 1.0, "um": 1e3, "µm": 1e3}


def _nm_per_unit(dimensions: dict, where: str) -> np.ndarray:
  """(3,) nm per coordinate along x, y, z of a Neuroglancer coordinate space
  ({"x": [8e-9, "m"], ...}); axes it lacks count 1 nm."""
  scale = []
  for axis in "xyz":
    value, unit = dimensions.get(axis, [1e-9, "m"])
    if unit not in _UNIT_NM:
      raise IicatsError(f"seeds {where}: unknown unit '{unit}' for dimension {axis}")
    scale.append(value * _UNIT_NM[unit])
  return np.array(scale)


def _legacy_dimensions(layer: dict, state: dict) -> dict:
  """States from before Neuroglancer's coordinate spaces (2020) give a voxelSize in nm."""
  voxel_size = layer.get("voxelSize") or (
    state.get("navigation", {}).get("pose", {}).get("position", {}).get("voxelSize"))
  if voxel_size is None:
    return {}
  return {axis: [float(v), "nm"] for axis, v in zip("xyz", voxel_size)}


def _points_from_state(state: dict, where: str) -> np.ndarray:
  if not isinstance(state, dict):
    raise IicatsError(f"seeds {where}: not a Neuroglancer state (a JSON object)")
  try:
    return _state_points(state, where)
  except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:
    raise IicatsError(f"seeds {where}: a Neuroglancer state this reader does not understand "
                      f"({type(err).__name__}: {err}); it reads 'layers' as a list of "
                      "annotation layers with point annotations. Give the points as a CSV "
                      "x,y,z in nm instead") from None


def _state_points(state: dict, where: str) -> np.ndarray:
  points = []
  for layer in state.get("layers", []):
    if layer.get("type") != "annotation":
      continue
    sources = layer.get("source") or []
    source = (sources[0] if isinstance(sources, list) and sources else sources)
    transform = source.get("transform", {}) if isinstance(source, dict) else {}
    if "matrix" in transform and not np.allclose(
        np.asarray(transform["matrix"], float), np.eye(*np.shape(transform["matrix"]))):
      raise IicatsError(f"seeds {where}: annotation layer '{layer.get('name')}' has a "
                        "transform matrix; give its points as a CSV of x,y,z in nm")
    dimensions = (transform.get("outputDimensions") or state.get("dimensions")
                  or _legacy_dimensions(layer, state))
    if not dimensions:
      print(f"note: seeds {where}: annotation layer '{layer.get('name')}' has no coordinate "
            "space (no dimensions or voxelSize): its coordinates are taken as nm", flush=True)
    names = list(dimensions) or ["x", "y", "z"]
    missing = [axis for axis in "xyz" if axis not in names]
    if missing:
      raise IicatsError(f"seeds {where}: annotation layer '{layer.get('name')}' has no "
                        f"dimension {', '.join(missing)} (its dimensions: {', '.join(names)})")
    axes = [names.index(axis) for axis in "xyz"]
    nm = _nm_per_unit(dimensions, where)
    for annotation in layer.get("annotations", []):
      if annotation.get("type") == "point":
        points.append(np.asarray(annotation["point"], dtype=float)[axes] * nm)
  if not points:
    raise IicatsError(f"seeds {where}: the state has no point annotations")
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
  if len(points_nm) > 1 and np.all(np.ptp(points_nm, axis=0) < resolution):
    print(f"note: seeds {path}: all {len(points_nm)} points lie within one voxel "
          f"({', '.join(f'{v:g}' for v in points_nm[0])} nm, ...): are they in nm (not µm or "
          "voxels)?", flush=True)
  if not inside.all():
    print(f"note: seeds {path}: {int((~inside).sum())} of {len(points_nm)} point(s) lie "
          f"outside the volume (x, y, z extent {extent} nm) and are skipped", flush=True)
  return points_nm[inside]
