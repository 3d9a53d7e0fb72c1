"""Ground-truth skeletons and points: SWC files, kimimaro skeletons of label volumes,
precomputed skeleton layers, and nuclei / synapse CSV files.

Positions are (x, y, z) nm in the segmentation layer's frame. SWC coordinates are read as nm;
type 1 (soma) nodes are the nucleus nodes. Every malformed input raises IicatsError naming the
file and line.
"""
from __future__ import annotations

import csv
import os
from typing import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components

from .errors import IicatsError
from .metrics import Skeleton, as_skeleton

SWC_FIELDS = ("id", "type", "x", "y", "z", "radius", "parent")
SWC_SOMA = 1
NUCLEI_COLUMNS = ("x", "y", "z")
SYNAPSE_COLUMNS = ("pre_x", "pre_y", "pre_z", "post_x", "post_y", "post_z")


# --------------------------------------------------------------------------------------------
# SWC


def _swc_rows(path: str):
  """Parsed SWC nodes -> (ids int64 (N,), types int64 (N,), xyz float64 (N, 3),
  radii float64 (N,), parents int64 (N,), lines int64 (N,) line number of each node)."""
  try:
    with open(path, encoding="utf-8") as fh:
      text = fh.read()
  except FileNotFoundError:
    raise IicatsError(f"{path}: no such SWC file")
  except UnicodeDecodeError:
    raise IicatsError(f"{path}: not a text SWC file")
  except OSError as err:
    raise IicatsError(f"{path}: cannot read ({err.strerror or err})")
  ids, types, xyz, radii, parents, lines = [], [], [], [], [], []
  for number, line in enumerate(text.splitlines(), start=1):
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
      continue
    fields = stripped.split()
    if len(fields) < 7:
      raise IicatsError(
        f"{path}:{number}: expected 7 fields (id type x y z radius parent), got {len(fields)}")
    values = []
    for name, text_value in zip(SWC_FIELDS, fields):
      cast = int if name in ("id", "type", "parent") else float
      try:
        value = cast(text_value)
      except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise IicatsError(f"{path}:{number}: field '{name}' is not {kind}: '{text_value}'")
      if cast is float and not np.isfinite(value):
        raise IicatsError(f"{path}:{number}: field '{name}' is not finite: '{text_value}'")
      values.append(value)
    node, kind, x, y, z, radius, parent = values
    if node < 0:
      raise IicatsError(f"{path}:{number}: node id {node} is negative")
    ids.append(node)
    types.append(kind)
    xyz.append((x, y, z))
    radii.append(radius)
    parents.append(parent)
    lines.append(number)
  if not ids:
    raise IicatsError(f"{path}: no nodes (an SWC file has lines 'id type x y z radius parent')")
  return (np.array(ids, np.int64), np.array(types, np.int64), np.array(xyz, np.float64),
          np.array(radii, np.float64), np.array(parents, np.int64), np.array(lines, np.int64))


def _check_duplicates(path, ids, lines):
  """Duplicate node ids -> IicatsError naming the second occurrence's line."""
  order = np.argsort(ids, kind="stable")
  dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
  if dup.size:
    first, second = order[dup[0]], order[dup[0] + 1]
    raise IicatsError(f"{path}:{lines[second]}: node id {ids[second]} appears twice "
                      f"(first on line {lines[first]})")


def _parent_index(path, ids, parents, lines) -> np.ndarray:
  """Index of each node's parent (-1 for roots, parent < 0); missing parents raise."""
  order = np.argsort(ids)
  sorted_ids = ids[order]
  has_parent = parents >= 0
  pos = np.clip(np.searchsorted(sorted_ids, parents), 0, len(ids) - 1)
  found = sorted_ids[pos] == parents
  missing = np.flatnonzero(has_parent & ~found)
  if missing.size:
    k = missing[0]
    raise IicatsError(f"{path}:{lines[k]}: parent {parents[k]} of node {ids[k]} is not in the "
                      "file")
  return np.where(has_parent, order[pos], -1)


def _check_cycles(path, ids, parent, lines):
  """Each tree holds exactly one root; a component without one holds a cycle -> IicatsError
  naming a line on the cycle."""
  n = len(ids)
  child = np.flatnonzero(parent >= 0)
  graph = coo_matrix((np.ones(len(child), np.int8), (child, parent[child])), shape=(n, n))
  n_components, component = connected_components(graph, directed=False)
  rooted = np.zeros(n_components, bool)
  rooted[component[parent < 0]] = True
  if rooted.all():
    return
  start = int(np.flatnonzero(~rooted[component])[0])
  seen, node = {}, start
  while node not in seen:  # walk up the parents of one node: at most one cycle long
    seen[node] = len(seen)
    node = int(parent[node])
  cycle = [k for k, step in seen.items() if step >= seen[node]]
  first = min(cycle, key=lambda k: lines[k])
  shown = " -> ".join(str(ids[k]) for k in cycle[:8]) + (" ..." if len(cycle) > 8 else "")
  raise IicatsError(f"{path}:{lines[first]}: parent links form a cycle ({shown} -> "
                    f"{ids[cycle[0]]})")


def _swc_skeleton_id(path: str) -> int | None:
  """The integer id of an SWC file named like '123.swc', else None."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return int(stem) if stem.isdigit() else None


def read_swc(path: str, skeleton_id: int | None = None) -> Skeleton:
  """Read one SWC file ('id type x y z radius parent' per line, '#' comments, coordinates in
  nm, parent -1 for roots; extra columns are ignored) into a Skeleton.

  The skeleton id is skeleton_id, else the file name's integer stem ('123.swc' -> 123),
  else 0. Type 1 nodes are soma (nucleus) nodes. Node order is the file's order. Malformed
  lines, non-numeric fields, duplicate node ids, missing parents, cycles and empty files raise
  IicatsError naming the file and line."""
  path = str(path)
  ids, types, xyz, radii, parents, lines = _swc_rows(path)
  _check_duplicates(path, ids, lines)
  parent = _parent_index(path, ids, parents, lines)
  _check_cycles(path, ids, parent, lines)
  child = np.flatnonzero(parent >= 0)
  edges = np.stack([child, parent[child]], axis=1)
  if skeleton_id is None:
    skeleton_id = _swc_skeleton_id(path) or 0
  return Skeleton(id=skeleton_id, vertices_nm=xyz, edges=edges,
                  soma=np.flatnonzero(types == SWC_SOMA), radii=radii,
                  name=os.path.basename(path))


def read_swc_dir(directory: str) -> list[Skeleton]:
  """Read every *.swc file of a directory (sorted by name) -> list of Skeleton.

  Files named '<integer>.swc' keep that id; the others get ids above the largest such one,
  in name order. No .swc file, or not a directory -> IicatsError."""
  directory = str(directory)
  if directory.startswith("file://"):
    directory = directory[len("file://"):]
  if not os.path.isdir(directory):
    raise IicatsError(f"{directory}: not a directory of SWC files")
  names = sorted(n for n in os.listdir(directory) if n.lower().endswith(".swc"))
  if not names:
    raise IicatsError(f"{directory}: no .swc files there")
  numbered = [_swc_skeleton_id(n) for n in names]
  next_id = max([i for i in numbered if i is not None], default=0) + 1
  skeletons = []
  for name, number in zip(names, numbered):
    if number is None:
      number, next_id = next_id, next_id + 1
    skeletons.append(read_swc(os.path.join(directory, name), skeleton_id=number))
  return skeletons


def _orient(skeleton: Skeleton) -> np.ndarray:
  """Parent index of each node (-1 for roots) of a forest, rooting each tree at its first
  soma node or else its first node. Edges that close a cycle -> IicatsError."""
  n = len(skeleton.vertices_nm)
  edges = skeleton.edges
  graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])),
                     shape=(n, n)).tocsr()
  n_components, component = connected_components(graph, directed=False)
  if len(edges) != n - n_components or np.any(edges[:, 0] == edges[:, 1]):
    raise IicatsError(f"skeleton {skeleton.id}: its edges are not a forest (cycles or repeated "
                      "edges), which SWC cannot store")
  roots = np.full(n_components, -1, np.int64)
  for node in skeleton.soma[::-1].tolist():
    roots[component[node]] = node
  firsts = np.unique(component, return_index=True)[1]
  roots = np.where(roots >= 0, roots, firsts)
  parent = np.full(n, -1, np.int64)
  for root in roots.tolist():  # one search per tree
    order, pred = breadth_first_order(graph, root, directed=False, return_predecessors=True)
    parent[order] = pred[order]
  parent[roots] = -1
  return parent


def write_swc(skeleton, path: str) -> str:
  """Write a Skeleton (or dict, see metrics.as_skeleton) as SWC: node k gets id k + 1 in the
  skeleton's node order, type 1 for soma nodes and 0 otherwise, radius from radii (else 1),
  coordinates in nm. Returns path."""
  skeleton = as_skeleton(skeleton)
  parent = _orient(skeleton)
  types = np.zeros(len(parent), np.int64)
  types[skeleton.soma] = SWC_SOMA
  radii = skeleton.radii if skeleton.radii is not None else np.ones(len(parent))
  rows = [f"{k + 1} {types[k]} {x:.10g} {y:.10g} {z:.10g} {r:.6g} {p + 1 if p >= 0 else -1}"
          for k, ((x, y, z), r, p) in enumerate(zip(skeleton.vertices_nm.tolist(),
                                                    radii.tolist(), parent.tolist()))]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    fh.write(f"# skeleton {skeleton.id} (iicats-cv), coordinates in nm\n")
    fh.write("# id type x y z radius parent\n")
    fh.write("\n".join(rows) + "\n")
  return path


# --------------------------------------------------------------------------------------------
# kimimaro


def teasar_params_for(resolution_nm: Sequence[float]) -> dict:
  """kimimaro TEASAR parameters with the physical constants (nm) scaled to the voxel size:
  kimimaro's defaults (const 300 nm, soma thresholds 750 / 3500 nm) are for ~10 nm voxels;
  they are multiplied by the geometric mean voxel size / 10 nm."""
  scale = float(np.prod(np.asarray(resolution_nm, float)) ** (1 / 3)) / 10.0
  return {"scale": 1.5, "const": 300 * scale, "pdrf_scale": 100000, "pdrf_exponent": 4,
          "soma_acceptance_threshold": 3500 * scale, "soma_detection_threshold": 750 * scale,
          "soma_invalidation_const": 300 * scale, "soma_invalidation_scale": 2}


def skeletons_from_labels(labels: np.ndarray, resolution_nm: Sequence[float],
                          offset_vx: Sequence[int] = (0, 0, 0), teasar_params: dict | None = None,
                          dust_threshold: int = 1000, parallel: int = 1) -> list[Skeleton]:
  """Skeletonise every label of a volume with kimimaro (TEASAR).

  labels: unsigned integer (x, y, z) array, 0 = background; resolution_nm: voxel size
  (x, y, z) nm; offset_vx: voxel offset of labels[0, 0, 0] in the layer. Node positions are
  voxel centres in nm in the layer frame, (voxel + offset + 0.5) * resolution, so that
  floor(position / resolution) is the node's voxel. Labels smaller than dust_threshold voxels
  are skipped. No soma nodes are marked. Returns skeletons sorted by label id."""
  import kimimaro
  labels = np.asarray(labels)
  if labels.ndim != 3 or labels.dtype.kind not in "ui":
    raise IicatsError(f"labels must be a 3D integer volume, got {labels.dtype} {labels.shape}")
  resolution = np.asarray(resolution_nm, np.float64)
  params = teasar_params_for(resolution) if teasar_params is None else teasar_params
  result = kimimaro.skeletonize(np.asfortranarray(labels), teasar_params=params,
                                anisotropy=tuple(resolution), dust_threshold=dust_threshold,
                                progress=False, fix_branching=True, fix_borders=True,
                                parallel=parallel)
  offset = np.asarray(offset_vx, np.float64)
  skeletons = []
  for label in sorted(result):
    skel = result[label]
    voxels = np.rint(np.asarray(skel.vertices, np.float64) / resolution)
    skeletons.append(Skeleton(id=int(label), vertices_nm=(voxels + offset + 0.5) * resolution,
                              edges=np.asarray(skel.edges, np.int64),
                              radii=np.asarray(skel.radii, np.float64)))
  return skeletons


# --------------------------------------------------------------------------------------------
# precomputed skeleton layers


def _list_skeleton_ids(cv) -> list[int]:
  """Ids of every skeleton of a skeleton source: the labels in each shard's index (sharded),
  or the file names that are integers (unsharded)."""
  from cloudfiles import CloudFiles
  meta = cv.skeleton.meta
  names = CloudFiles(meta.join(cv.cloudpath, meta.skeleton_path)).list()
  if not meta.is_sharded():
    return sorted(int(n) for n in (os.path.basename(n) for n in names) if n.isdigit())
  ids = set()
  for name in (n for n in names if n.endswith(".shard")):
    ids.update(int(i) for i in cv.skeleton.reader.list_labels(name, path=meta.skeleton_path))
  return sorted(ids)


def read_skeleton_layer(cloudpath: str, ids: Sequence[int] | None = None) -> list[Skeleton]:
  """Skeletons of a precomputed segmentation layer with a `skeletons` source (CloudVolume's
  cv.skeleton.get). Vertices are already nm (the layer's transform applied); vertex_types == 1
  marks soma nodes when the layer stores that attribute. ids: which skeletons (default: all
  listed in an unsharded layer)."""
  from cloudvolume import CloudVolume
  from .layers import normalize_cloudpath, resolve_cloudpath
  cloudpath = normalize_cloudpath(cloudpath)
  try:
    cv = CloudVolume(resolve_cloudpath(cloudpath), progress=False)
    if not cv.info.get("skeletons"):
      raise IicatsError(f"skeleton layer {cloudpath}: its info names no 'skeletons' source")
    listed = _list_skeleton_ids(cv)
    if not listed:
      raise IicatsError(f"skeleton layer {cloudpath}: holds no skeletons")
    ids = listed if ids is None else [int(i) for i in ids]
    missing = sorted(set(ids) - set(listed))
    if missing:
      raise IicatsError(f"skeleton layer {cloudpath}: no skeleton {_ids_text(missing)} "
                        f"(it has {len(listed)}: {_ids_text(listed)})")
    found = cv.skeleton.get(ids)
  except IicatsError:
    raise
  except Exception as err:
    raise IicatsError(f"skeleton layer {cloudpath}: cannot read skeletons "
                      f"({type(err).__name__}: {err})")
  skeletons = []
  for skel in sorted(found, key=lambda s: int(s.id)):
    types = getattr(skel, "vertex_types", None)
    soma = np.flatnonzero(np.asarray(types) == SWC_SOMA) if types is not None and len(
      types) == len(skel.vertices) else np.zeros(0, np.int64)
    skeletons.append(Skeleton(id=int(skel.id), vertices_nm=np.asarray(skel.vertices, np.float64),
                              edges=np.asarray(skel.edges, np.int64), soma=soma,
                              radii=np.asarray(skel.radii, np.float64)
                              if getattr(skel, "radii", None) is not None
                              and len(skel.radii) == len(skel.vertices) else None,
                              name=f"{cloudpath} #{int(skel.id)}"))
  return skeletons


def _ids_text(ids, most: int = 8) -> str:
  ids = list(ids)
  return ", ".join(map(str, ids[:most])) + (f", … ({len(ids) - most} more)" if len(ids) > most
                                             else "")


def load_skeletons(source, ids: Sequence[int] | None = None) -> list[Skeleton]:
  """Skeletons from a list (Skeleton or dicts), an SWC directory (plain path or file://), or a
  precomputed layer cloudpath with skeletons (sharded or not). ids: only these skeletons
  (e.g. the proofread neurons of a ground-truth layer); each must exist."""
  if isinstance(source, (list, tuple)):
    skeletons = [as_skeleton(s) for s in source]
  else:
    source = str(source)
    local = source[len("file://"):] if source.startswith("file://") else (
      None if "://" in source else source)
    if local is not None and os.path.isdir(local) and not os.path.exists(
        os.path.join(local, "info")):
      skeletons = read_swc_dir(local)
    elif local is not None and not os.path.exists(local):
      raise IicatsError(f"{source}: no such SWC directory or skeleton layer")
    else:
      return read_skeleton_layer(source, ids)
  if ids is None:
    return skeletons
  have = {s.id for s in skeletons}
  missing = sorted(set(int(i) for i in ids) - have)
  if missing:
    raise IicatsError(f"skeletons {source if isinstance(source, str) else ''}: no skeleton "
                      f"{_ids_text(missing)} (ids there: {_ids_text(sorted(have))})")
  wanted = set(int(i) for i in ids)
  return [s for s in skeletons if s.id in wanted]


# --------------------------------------------------------------------------------------------
# points CSV


def _read_points_csv(path: str, columns: Sequence[str], what: str) -> np.ndarray:
  """Rows of the named columns (nm) -> float64 (M, len(columns)). The header must name every
  column (any order, extra columns ignored)."""
  path = str(path)
  try:
    with open(path, newline="", encoding="utf-8") as fh:
      rows = list(csv.reader(fh))
  except FileNotFoundError:
    raise IicatsError(f"{path}: no such {what} file")
  except (UnicodeDecodeError, csv.Error) as err:
    raise IicatsError(f"{path}: not a {what} CSV file ({err})")
  numbered = [(k, row) for k, row in enumerate(rows, start=1)
              if row and any(c.strip() for c in row) and not row[0].lstrip().startswith("#")]
  if not numbered:
    raise IicatsError(f"{path}: empty; expected a header line {','.join(columns)} (nm)")
  header_line, header = numbered[0]
  names = [c.strip().lower() for c in header]
  missing = [c for c in columns if c not in names]
  if missing:
    raise IicatsError(f"{path}:{header_line}: expected columns {','.join(columns)} (nm), "
                      f"found {','.join(names)} (missing {','.join(missing)})")
  index = [names.index(c) for c in columns]
  out = np.zeros((len(numbered) - 1, len(columns)))
  for r, (line, row) in enumerate(numbered[1:]):
    if len(row) != len(names):
      raise IicatsError(f"{path}:{line}: expected {len(names)} fields, got {len(row)}")
    for c, k in enumerate(index):
      try:
        out[r, c] = float(row[k])
      except ValueError:
        raise IicatsError(f"{path}:{line}: column '{columns[c]}' is not a number: '{row[k]}'")
      if not np.isfinite(out[r, c]):
        raise IicatsError(f"{path}:{line}: column '{columns[c]}' is not finite: '{row[k]}'")
  return out


def read_nuclei_csv(path: str) -> np.ndarray:
  """Ground-truth nucleus points from a CSV with header x,y,z (nm) -> float64 (M, 3)."""
  return _read_points_csv(path, NUCLEI_COLUMNS, "nuclei")


def read_synapses_csv(path: str) -> np.ndarray:
  """Ground-truth synapses from a CSV with header pre_x,pre_y,pre_z,post_x,post_y,post_z (nm)
  -> float64 (P, 2, 3): [:, 0] pre-synaptic, [:, 1] post-synaptic point."""
  return _read_points_csv(path, SYNAPSE_COLUMNS, "synapses").reshape(-1, 2, 3)
