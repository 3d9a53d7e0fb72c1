"""Supervoxels (fragments) from affinities: seeded watershed on the boundary distance transform.

As lsd does it, with boundary = 1 - the lowest incident affinity; seeds are maxima of the distance transform of the
foreground (boundary < threshold); a marker watershed floods the boundary map; small fragments
are merged into their best-connected neighbour. Arrays are (x, y, z) / (3, x, y, z).

Blockwise runs must agree with a run over the whole volume away from their read window's
faces, so both the flood and the seeds are local: the flood follows a strict order set by
each voxel's own boundary value, seed distance and global position (flood_order), and a
global lattice of extra seeds (_seed_lattice) leaves no voxel whose fragment hangs on a seed
beyond the window.
"""
from __future__ import annotations

import cc3d
import edt
import fastremap
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from .rag import unique_pairs

# Added to the boundary map on predicted synapse voxels when the synapse evidence is used.
# Chosen on seeds 0-5 of benchmarks/constraints.py from 0.15-0.3: 0.2 and 0.25 both halved
# the synapses whose partners end up in one segment and the fragments holding two neurons.
SYNAPSE_BOUNDARY = 0.2


# Black (0) regions at least this wide on every axis (nm) are no tissue: alignment padding,
# chunks never written, a volume's empty corner. Smaller ones are dark tissue (in the VNC
# stack 3e-5 of the voxels are black 5×5-voxel squares), and one or two missing sections
# of 40 nm stay tissue, bridged by the model as it learnt in training.
BACKGROUND_SIDE_NM = 100.0


def image_background(image: np.ndarray, resolution) -> np.ndarray:
  """Voxels of black image regions that hold a box BACKGROUND_SIDE_NM on a side of zeros.

  image: (X, Y, Z) grey values of any dtype, 0 = no data; resolution: nm (x, y, z).
  Returns bool (X, Y, Z): the morphological opening of image == 0 by that box (every zero
  voxel of such a box), by maximum filters, which separate by axis."""
  zero = np.asarray(image) == 0
  if not zero.any():
    return zero
  # odd sides: the erosion's and the dilation's boxes then sit on the same centre
  size = tuple(int(np.ceil(BACKGROUND_SIDE_NM / float(r))) // 2 * 2 + 1 for r in resolution)
  # erosion of the zero set: no non-zero voxel in the box; then dilation by the same box
  core = ndimage.maximum_filter(~zero, size=size, mode="nearest") == 0
  return ndimage.maximum_filter(core, size=size, mode="constant", cval=False) & zero


def boundary_map(affinities: np.ndarray) -> np.ndarray:
  """affinities float32 (3, X, Y, Z) in [0, 1], or uint8 (3, X, Y, Z) in [0, 255] standing for
  value / 255 -> boundary float32 (X, Y, Z) in [0, 1].

  1 - the lowest of a voxel's six affinities (to its -1 neighbours and from its +1
  neighbours), so both voxels beside a boundary count as boundary: seeds then never sit on a
  one-voxel-thin membrane, and the map is symmetric around it. uint8 affinities are scaled
  after the minimum, which equals scaling them first (the scaling is monotonic) without a
  float32 copy of all three channels.
  """
  lowest = affinities.min(axis=0)
  for axis in range(3):
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    src[axis] = slice(1, None)
    dst[axis] = slice(None, -1)
    np.minimum(lowest[tuple(dst)], affinities[axis][tuple(src)], out=lowest[tuple(dst)])
  if lowest.dtype == np.uint8:
    lowest = lowest.astype(np.float32)
    lowest /= 255.0
  if lowest.dtype == np.float32:
    return np.subtract(1.0, lowest, out=lowest)  # the minimum's own array, not the input
  return (1.0 - lowest).astype(np.float32)


def fragments(affinities: np.ndarray, resolution=(1.0, 1.0, 1.0), threshold: float = 0.5,
              seed_distance_nm: float | None = None, min_size: int = 50,
              per_section: bool = False, synapse: np.ndarray | None = None,
              synapse_boundary: float = 0.0, origin=(0, 0, 0),
              background: np.ndarray | None = None) -> np.ndarray:
  """Seeded watershed fragments from affinities.

  affinities: float32 (3, X, Y, Z) in [0, 1], or uint8 scaled by 1/255 (boundary_map).
  resolution: voxel size in nm (x, y, z), for an anisotropic distance transform.
  threshold: boundary value below which a voxel is foreground (inside a cell).
  seed_distance_nm: minimum spacing of seeds (default: 3 voxels of the finest axis).
  min_size: fragments smaller than this (voxels) merge into their best neighbour.
  per_section: run 2D per z section (anisotropic ssEM).
  synapse: bool (X, Y, Z), the predicted synapses (vesicle cloud and postsynaptic density);
    synapse_boundary is added to the boundary map on its voxels. Networks fade the membrane
    at a dense cleft, where the watershed then floods both partners into one fragment that
    no cannot-link can split; a faded membrane (affinity ~0.55) inside a synapse comes back
    above the threshold, the cytoplasm of a bouton (~0.9) stays below it.
  origin: global voxel coordinate (x, y, z) of the array's first voxel; it places the seed
    lattice (_seed_lattice) and breaks ties in the flooding order (flood_order), so a block's
    fragments do not depend on its read window.
  background: bool (X, Y, Z), voxels that are no tissue (image_background): no seed lies
    there, and they get label 0.
  Returns uint64 (X, Y, Z) labels 1..N, 0 only on background.
  """
  boundary = boundary_map(affinities)
  if synapse is not None and synapse_boundary > 0:
    boundary = np.minimum(1.0, boundary + np.float32(synapse_boundary) * (synapse > 0))
  if background is not None and background.any():
    boundary[background] = 1.0
  if per_section:
    labels = np.zeros(boundary.shape, dtype=np.uint64)
    next_id = 0
    for z in range(boundary.shape[2]):
      section = _watershed(boundary[:, :, z:z + 1], resolution, threshold, seed_distance_nm,
                           (origin[0], origin[1], origin[2] + z))
      section[section > 0] += next_id
      next_id = max(next_id, int(section.max()))
      labels[:, :, z:z + 1] = section
  else:
    labels = _watershed(boundary, resolution, threshold, seed_distance_nm, origin)
  if background is not None and background.any():
    labels[background] = 0
  if min_size > 1:
    labels = merge_small_fragments(labels, boundary, min_size)
  labels, _ = fastremap.renumber(labels, in_place=True, preserve_zero=True)
  return labels.astype(np.uint64, copy=False)


FLOOD_SEED_REACH = 16  # voxels of the finest axis (flood_order)


def flood_order(boundary: np.ndarray, to_seed_nm: np.ndarray, resolution,
                origin=(0, 0, 0)) -> np.ndarray:
  """float64 (X, Y, Z) flooding keys, all distinct in practice: the boundary quantised to 255
  levels, then, on a plateau of one level, the voxels nearest a seed first (to_seed_nm: float
  (X, Y, Z) distance to the nearest marker voxel, in quarter-voxel steps), then a hash of the
  global voxel coordinate (origin + index).

  skimage floods a plateau in the order its voxels entered the queue, which depends on the
  whole array: the same block read with another margin got other fragments 40 voxels inside
  its margin (adapted Rand 0.005 on the synthetic demo volume), and 64³ and 512³ tasks gave
  segmentations 0.010 apart. A strict order set by each voxel's own values and position makes
  the flood, and so the fragments, local. Nearest-seed-first keeps the queue's breadth-first
  growth on plateaus (deepest-first or the hash alone cost the FIB crop 0.04 VOI). Distances
  stop counting at FLOOD_SEED_REACH voxels, well inside a block's margin, since the nearest
  seed of a voxel farther away (in extracellular space) may lie beyond the read window.
  """
  # The three fields are integers packed into bits 32+, 20-31 and 0-19 of a float64, which
  # skimage floods on: sums of integers below 2^53 are exact, and building the key in float64
  # needs no int64 copy beside it.
  levels = boundary * 255
  np.rint(levels, out=levels)
  key = levels.astype(np.float64)
  del levels
  key *= 2.0 ** 32
  steps = to_seed_nm * (4.0 / min(resolution))
  np.rint(steps, out=steps)
  np.minimum(steps, 4 * FLOOD_SEED_REACH, out=steps)
  steps *= 2.0 ** 20  # exact in float32: at most 64 × 2^20
  key += steps
  del steps
  x, y, z = (np.arange(n, dtype=np.int64) + int(o) for n, o in zip(boundary.shape, origin))
  xy_hash = (x[:, None] * 73856093) ^ (y[None, :] * 19349663)
  for k, z_k in enumerate(z.tolist()):  # one section at a time: no int64 volume beside key
    key[:, :, k] += (xy_hash ^ (z_k * 83492791)) & 0xFFFFF
  return key


def _watershed(boundary, resolution, threshold, seed_distance_nm, origin=(0, 0, 0)):
  foreground = boundary < threshold
  if not foreground.any():
    return np.ones(boundary.shape, dtype=np.uint64)
  dist = edt.edt(foreground, anisotropy=tuple(float(r) for r in resolution), parallel=1)
  spacing = seed_distance_nm or 3 * min(resolution)
  footprint = np.maximum(1, np.round(spacing / np.asarray(resolution, float))).astype(int)
  if boundary.shape[2] == 1:
    footprint[2] = 1
  maxima = (dist == ndimage.maximum_filter(dist, size=tuple(2 * footprint + 1))) & foreground
  markers = cc3d.connected_components(maxima, connectivity=26).astype(np.int64)
  del maxima
  markers = _seed_unseeded_components(markers, foreground, dist)
  if markers.max() == 0:
    return np.ones(boundary.shape, dtype=np.uint64)
  to_seed = edt.edt(markers == 0, anisotropy=tuple(float(r) for r in resolution), parallel=1)
  markers, to_seed = _seed_lattice(markers, foreground, to_seed, resolution, origin)
  del dist, foreground
  key = flood_order(boundary, to_seed, resolution, origin)
  del to_seed
  # skimage holds its markers twice (masked, then padded as its output) and copies the output
  # once more: int32 halves those copies, and is exact below 2^31 seeds
  if markers.max() < 2 ** 31:
    markers = markers.astype(np.int32)
  return watershed(key, markers=markers).astype(np.uint64)


# voxels of the finest axis: half the watershed tasks' default margin (48 voxels), so the
# seed that a block's voxel floods from lies inside its read window. 12 also made the GT-
# affinity seamlessness test exact, but its finer fragments turned 3 false nucleus blobs of
# the default model on the FIB crop into nucleus instances (ARAND 0.41 against 0.041).
LATTICE_SPACING = 24


def _seed_lattice(markers, foreground, to_seed, resolution, origin):
  """Adds a seed at every foreground point of a global lattice (spacing LATTICE_SPACING voxels
  of the finest axis, fewer along a coarse axis) farther than that from every seed.

  A fragment whose only seed lies beyond a block's read window is flooded there by its
  neighbours instead, deep inside the block; with a seed within reach of every voxel, the
  block's fragments no longer hang on seeds it cannot see. markers int64 (X, Y, Z);
  foreground bool; to_seed float (nm to the nearest marker). Returns (markers, to_seed).
  """
  res = np.asarray(resolution, float)
  spacing_nm = LATTICE_SPACING * res.min()
  step = np.maximum(1, np.round(spacing_nm / res)).astype(int)
  if foreground.shape[2] == 1:
    step[2] = 1
  first = [(-int(o)) % int(s) for o, s in zip(origin, step)]
  lattice = tuple(slice(f, None, s) for f, s in zip(first, step))
  new = foreground[lattice] & (to_seed[lattice] > spacing_nm)
  if not new.any():
    return markers, to_seed
  points = np.zeros(markers.shape, bool)
  points[lattice] = new
  markers[points] = markers.max() + 1 + np.arange(np.count_nonzero(points))
  to_seed = edt.edt(markers == 0, anisotropy=tuple(res), parallel=1)
  return markers, to_seed


def _seed_unseeded_components(markers, foreground, dist):
  """Adds a seed at the distance-transform peak of every foreground component that holds none
  and lies inside the array.

  The maximum filter spans membranes, so the narrow end of a neurite beside a thicker cell
  loses its only maxima to the cell's higher distance values; without its own seed the
  watershed floods it from across the membrane and the fragment merges two neurons.
  markers int64 (X, Y, Z), 0 = none; foreground bool; dist float32. Returns markers.
  """
  components = cc3d.connected_components(foreground, connectivity=6)
  n = int(components.max())
  seeded = np.zeros(n + 1, dtype=bool)
  seeded[np.unique(components[markers > 0])] = True
  seeded[0] = True
  # a component the array's faces cut may have its maxima beyond them: seeding it here would
  # make a block's fragments depend on where its read window ends (a single section's z
  # faces are the section itself, not a cut)
  for axis in range(3):
    if components.shape[axis] > 1:
      for index in (0, -1):
        seeded[np.unique(np.take(components, index, axis=axis))] = True
  if seeded.all():
    return markers
  voxels = np.nonzero(~seeded[components])
  component = components[voxels]
  # per unseeded component, its voxel of highest distance (the first one on ties)
  order = np.lexsort((-dist[voxels], component))
  first = np.ones(len(order), dtype=bool)
  first[1:] = component[order[1:]] != component[order[:-1]]
  peaks = tuple(axis[order[first]] for axis in voxels)
  markers[peaks] = markers.max() + 1 + np.arange(np.count_nonzero(first))
  return markers


def merge_small_fragments(labels: np.ndarray, boundary: np.ndarray, min_size: int) -> np.ndarray:
  """Merge fragments smaller than min_size voxels into the neighbour they share the lowest mean
  boundary with (a few rounds, so small fragments chained together end up merged too).

  labels: uint64 (X, Y, Z); boundary: float32 (X, Y, Z). Returns relabelled uint64 labels.
  """
  from scipy.sparse import coo_matrix
  from scipy.sparse.csgraph import connected_components
  for _ in range(3):
    ids, counts = fastremap.unique(labels, return_counts=True)
    small_ids = ids[(counts < min_size) & (ids != 0)]
    if len(small_ids) == 0:
      break
    us, vs, ws = [], [], []
    for axis in range(3):
      a = np.moveaxis(labels, axis, 0)
      b = np.moveaxis(boundary, axis, 0)
      # a mask selects the fragment faces without copying the whole strided views
      differs = a[1:] != a[:-1]
      u, v = a[1:][differs], a[:-1][differs]
      w = np.maximum(b[1:][differs], b[:-1][differs])
      del differs
      sel = (np.isin(u, small_ids) | np.isin(v, small_ids)) & (u != 0) & (v != 0)
      us.append(u[sel])
      vs.append(v[sel])
      ws.append(w[sel])
    u, v, w = np.concatenate(us), np.concatenate(vs), np.concatenate(ws)
    if len(u) == 0:
      break
    first, second, inverse = unique_pairs(u, v)
    mean = np.bincount(inverse, weights=w) / np.bincount(inverse)
    # one row per (small fragment, neighbour), best (lowest boundary) first
    frm = np.concatenate([first, second])
    to = np.concatenate([second, first])
    score = np.concatenate([mean, mean])
    keep = np.isin(frm, small_ids)
    frm, to, score = frm[keep], to[keep], score[keep]
    order = np.lexsort((score, frm))
    frm, to = frm[order], to[order]
    first = np.ones(len(frm), dtype=bool)
    first[1:] = frm[1:] != frm[:-1]
    frm, to = frm[first], to[first]
    # connected components of the "best neighbour" links; each takes its largest member's id
    nodes, index = np.unique(np.concatenate([frm, to]), return_inverse=True)
    n = len(nodes)
    graph = coo_matrix((np.ones(len(frm)), (index[:len(frm)], index[len(frm):])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = counts[np.searchsorted(ids, nodes)]
    order = np.lexsort((-sizes, component))
    leader = np.empty(component.max() + 1, dtype=np.uint64)
    leader[component[order[::-1]]] = nodes[order[::-1]]
    mapping = dict(zip(nodes.tolist(), leader[component].tolist()))
    labels = fastremap.remap(labels, mapping, preserve_missing_labels=True, in_place=True)
  return labels


AXES = "xyz"


def face_agreement(labels: np.ndarray, core_lo, core_hi) -> dict:
  """Whether a block's own watershed puts the two voxels straddling each face of its core into
  one fragment; the evidence that stitches fragments cut by task boundaries.

  labels: uint64 (X, Y, Z) fragments of the block computed with context around it.
  core_lo, core_hi: the block (core) box within `labels`, (x, y, z) voxel indices.
  Returns {"x_low": bool (Y, Z), "x_high": ..., "z_high": bool (X, Y)} over the core's extent
  of the face, for each face with at least one voxel of context beyond it.
  """
  lo, hi = np.asarray(core_lo, int), np.asarray(core_hi, int)
  out = {}
  for axis, name in enumerate(AXES):
    for side, inner, outer in (("low", lo[axis], lo[axis] - 1), ("high", hi[axis] - 1, hi[axis])):
      if not 0 <= outer < labels.shape[axis]:
        continue
      index = [slice(a, b) for a, b in zip(lo, hi)]
      index[axis] = inner
      mine = labels[tuple(index)]
      index[axis] = outer
      out[f"{name}_{side}"] = mine == labels[tuple(index)]
  return out
