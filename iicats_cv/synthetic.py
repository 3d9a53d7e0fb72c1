"""Synthetic EM volumes with dense ground truth: neurons, nuclei, mitochondria, synapses and
skeletons, made from a seed.

Conventions:
- every volume is a numpy array in (x, y, z) axis order; `resolution` is the voxel size in nm,
  (x, y, z);
- every point is in nm, (x, y, z), in *continuous* coordinates: voxel (i, j, k) covers
  [i*rx, (i+1)*rx) x [j*ry, (j+1)*ry) x [k*rz, (k+1)*rz), its centre is (index + 0.5) *
  resolution, and the voxel holding a point p is floor(p / resolution). Every skeleton node,
  nucleus point and synapse point is checked to lie, by that rule, in its own object;
- neuron label 0 is extracellular space (no glia label): the generator keeps ~20 % of the voxels
  extracellular (parameter `ecs_fraction`).

How a volume is built (everything in physical units, so anisotropic voxels such as (8, 8, 40)
give the same tissue, sampled differently):
1. somata (ellipsoids, one per nucleated neuron) are placed apart from each other;
2. neurites grow as persistent random walks of (position, radius) nodes, branching, narrowing
   now and then into a neck, first from the somata, then as neurite-only cells entering from the
   volume faces, then as neurites passing through the remaining voids (grown both ways from a
   free point) until the tissue is dense. A coarse occupancy grid steers every step away from
   the cells grown before (blocked branches thin down or end), so tubes mostly touch instead of
   crossing;
3. the tubes are rasterised with feature transforms of their densely sampled centrelines, in two
   radius bins: each voxel goes to the cell whose tube surface it lies deepest in (an
   additively weighted Voronoi partition, so cells never overlap, and touching tubes share a
   membrane); the somata are added analytically. All cells then grow by one margin, chosen so
   that `ecs_fraction` of the voxels stay extracellular;
4. each cell is made 6-connected with cc3d: the main piece keeps its id, a large cut-off piece
   with skeleton nodes becomes a neurite-only cell of its own, anything else becomes
   extracellular space. The skeletons (the grown nodes and the soma node at the nucleus
   centroid) keep only nodes whose voxel is in their own cell, contracting dropped nodes, so they
   stay trees;
5. nuclei, mitochondria (tubes along the skeletons, ellipsoids in the somata, some across the
   necks) and synapses (at contact sites, with a PSD and a vesicle cloud) are cut out inside the
   final cells, and the image is rendered: membranes, textured cytoplasm, nuclear envelope and
   chromatin, mitochondrial cristae, PSDs and vesicles, a Gaussian PSF, slow drift, shot noise
   (Poisson, in its Gaussian approximation) and Gaussian read noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cc3d
import edt
import numpy as np
from scipy import ndimage

from .errors import IicatsError


@dataclass
class SyntheticVolume:
  """A synthetic EM volume with its ground truth. Volumes are (X, Y, Z) = shape, (x, y, z) order.

  image: uint8 (X, Y, Z) EM-like image (dark membranes, light extracellular space).
  neurons: uint32 (X, Y, Z) neuron instance ids 1..N, 0 = extracellular space. Nucleated neurons
    come first (ids 1..K), neurite-only cells follow. Every neuron is 6-connected.
  nuclei: uint32 (X, Y, Z) nucleus instance ids 1..K, 0 = none; nucleus k lies inside neuron
    nucleus_cells[k - 1] and its centroid is nucleus_points_nm[k - 1].
  nucleus_points_nm: float64 (K, 3) nucleus centroids, (x, y, z) nm.
  nucleus_cells: int64 (K,) the neuron id holding each nucleus.
  mitochondria: uint32 (X, Y, Z) mitochondrion instance ids 1..M, 0 = none; mitochondrion m lies
    entirely inside neuron mitochondria_cells[m - 1] (and outside its nucleus).
  mitochondria_cells: int64 (M,) the neuron id holding each mitochondrion.
  synapses_nm: float64 (S, 2, 3) (pre, post) points, (x, y, z) nm: the pre point lies in neuron
    synapse_partners[s, 0], the post point in synapse_partners[s, 1], 30-60 nm apart across their
    shared membrane.
  synapse_partners: int64 (S, 2) (presynaptic, postsynaptic) neuron ids.
  synapse_mask: uint8 (X, Y, Z): 1 = presynaptic vesicle cloud, 2 = postsynaptic density.
  skeletons: list of dicts, one per neuron, with keys id (int, the neuron id), vertices_nm
    (float64 (N, 3), (x, y, z) nm, floor(vertices_nm / resolution) is a voxel of that neuron),
    edges (int64 (E, 2), a tree), soma (int64 (0,) or (1,): the node at the nucleus centroid),
    radii (float64 (N,) nm) and name (str).
  resolution: voxel size in nm, (x, y, z).
  seed: the seed it was made from.
  straddling_mitochondria: int64 (T,) ids of mitochondria that run through a neck of their
    neurite (a narrow place), so they are evidence that both sides belong together.
  """
  image: np.ndarray
  neurons: np.ndarray
  nuclei: np.ndarray
  nucleus_points_nm: np.ndarray
  nucleus_cells: np.ndarray
  mitochondria: np.ndarray
  mitochondria_cells: np.ndarray
  synapses_nm: np.ndarray
  synapse_partners: np.ndarray
  synapse_mask: np.ndarray
  skeletons: list
  resolution: tuple
  seed: int = 0
  straddling_mitochondria: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

  @property
  def shape(self) -> tuple:
    return tuple(int(s) for s in self.neurons.shape)

  def summary(self) -> dict:
    """Counts: cells, nucleated cells, nuclei, mitochondria, synapses, skeletons, skeleton nodes,
    and the extracellular fraction of the voxels."""
    return {
      "shape": list(self.shape),
      "resolution": [float(r) for r in self.resolution],
      "cells": int(len(self.skeletons)),
      "nucleated_cells": int(len(self.nucleus_cells)),
      "nuclei": int(len(self.nucleus_points_nm)),
      "mitochondria": int(len(self.mitochondria_cells)),
      "straddling_mitochondria": int(len(self.straddling_mitochondria)),
      "synapses": int(len(self.synapses_nm)),
      "skeletons": int(len(self.skeletons)),
      "skeleton_nodes": int(sum(len(s["vertices_nm"]) for s in self.skeletons)),
      "extracellular_fraction": float(np.count_nonzero(self.neurons == 0) / self.neurons.size),
    }


# --------------------------------------------------------------------------------------------
# geometry helpers


# The generator avoids BLAS and LAPACK (matrix products, np.linalg.norm of a vector, qr, inv):
# OpenBLAS picks its kernels by CPU, and its SkylakeX and Zen kernels rounded differently,
# enough to change the volumes and every figure measured on them. These
# helpers use elementwise arithmetic in a fixed order, which rounds the same everywhere.


def _dot3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Dot products of 3-vectors along the last axis of a and b (broadcast)."""
  return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _norm(v: np.ndarray) -> np.ndarray:
  """Lengths of 3-vectors along the last axis of v."""
  return np.sqrt(_dot3(v, v))


def _inverse3(m: np.ndarray) -> np.ndarray:
  """Inverse of a non-singular float64 (3, 3) matrix, from the cross products of its rows."""
  a, b, c = m
  columns = np.stack([np.cross(b, c), np.cross(c, a), np.cross(a, b)], axis=1)
  return columns / _dot3(a, np.cross(b, c))


def _unit(v: np.ndarray) -> np.ndarray:
  """Rows of v (..., 3) scaled to unit length."""
  return v / np.maximum(_norm(v)[..., None], 1e-12)


def _perpendicular(rng, d: np.ndarray) -> np.ndarray:
  """A random unit vector perpendicular to the unit vector d (3,)."""
  while True:
    v = rng.normal(size=3)
    v -= _dot3(v, d) * d
    n = _norm(v)
    if n > 1e-6:
      return v / n


def _random_rotation(rng) -> np.ndarray:
  """A random rotation matrix float64 (3, 3), uniform over rotations: the Gram-Schmidt
  orthonormalisation of a Gaussian matrix's columns (what QR with a positive diagonal gives),
  with the third column made right-handed."""
  g = rng.normal(size=(3, 3))
  first = _unit(g[:, 0])
  second = _unit(g[:, 1] - _dot3(g[:, 1], first) * first)
  return np.stack([first, second, np.cross(first, second)], axis=1)


def _sphere_directions() -> np.ndarray:
  """The 26 unit directions to the neighbours of a voxel, float64 (26, 3)."""
  g = np.stack(np.meshgrid(*([np.array([-1.0, 0.0, 1.0])] * 3), indexing="ij"), -1)
  g = g.reshape(-1, 3)
  g = g[np.any(g != 0, axis=1)]
  return _unit(g)


def _box(centre_vox, half_vox, shape):
  """Slices of the box centre_vox +- half_vox (per axis, voxels) clipped to shape, and its
  origin (int64 (3,)). None when the box is empty."""
  lo = np.maximum(np.floor(np.asarray(centre_vox) - half_vox).astype(np.int64), 0)
  hi = np.minimum(np.ceil(np.asarray(centre_vox) + half_vox).astype(np.int64) + 1,
                  np.asarray(shape))
  if np.any(hi <= lo):
    return None, lo
  return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), lo


def _centres_nm(box, lo, res) -> list:
  """Voxel-centre coordinates (nm) of a box as three broadcastable arrays (x, y, z)."""
  out = []
  for axis, sl in enumerate(box):
    c = (np.arange(sl.start, sl.stop) + 0.5) * res[axis]
    shape = [1, 1, 1]
    shape[axis] = len(c)
    out.append(c.reshape(shape))
  return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
  """The largest 6-connected component of a bool volume (bool, same shape)."""
  if not mask.any():
    return mask
  cc, n = cc3d.connected_components(mask, connectivity=6, return_N=True)
  if n <= 1:
    return mask
  sizes = np.bincount(cc.ravel(), minlength=n + 1)
  sizes[0] = 0
  return cc == int(np.argmax(sizes))


def _polyline_distance(px, py, pz, pts: np.ndarray, radii: np.ndarray):
  """For voxel-centre coordinates (broadcastable arrays, nm) and a polyline pts (P, 3) nm with
  radii (P,) nm: (distance to the polyline, radius interpolated at the nearest point), float32
  arrays of the broadcast shape."""
  best = None
  rad = None
  if len(pts) == 1:
    pts = np.concatenate([pts, pts])
    radii = np.concatenate([radii, radii])
  for a, b, ra, rb in zip(pts[:-1], pts[1:], radii[:-1], radii[1:]):
    ab = b - a
    L2 = max(float(_dot3(ab, ab)), 1e-9)
    t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (pz - a[2]) * ab[2]) / L2
    t = np.clip(t, 0.0, 1.0)
    d = np.sqrt((px - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2
                + (pz - a[2] - t * ab[2]) ** 2)
    r = ra + t * (rb - ra)
    if best is None:
      best, rad = d, r
    else:
      closer = d < best
      best = np.where(closer, d, best)
      rad = np.where(closer, r, rad)
  return best.astype(np.float32), rad.astype(np.float32)


# --------------------------------------------------------------------------------------------
# growth of the cells


@dataclass
class _Cell:
  """A grown cell: nodes (positions nm, radii nm, parent index, -1 for the root)."""
  id: int
  pos: list
  rad: list
  parent: list
  soma_centre: np.ndarray | None = None   # (3,) nm
  soma_axes: np.ndarray | None = None     # (3, 3): rows = semi-axes vectors (nm)
  necks: list = field(default_factory=list)  # node indices of necks

  def add(self, p, r, parent) -> int:
    self.pos.append(np.asarray(p, np.float64))
    self.rad.append(float(r))
    self.parent.append(int(parent))
    return len(self.pos) - 1


class _Grower:
  """Grows neurites as random walks steered by a coarse occupancy grid (cell ids, isotropic
  cells of `unit` nm) so that new tubes avoid the cells grown before."""

  def __init__(self, rng, extent_nm, unit, r_min, r_max, step):
    self.rng = rng
    self.extent = np.asarray(extent_nm, np.float64)
    self.g = float(unit)
    self.gshape = np.maximum(np.ceil(self.extent / self.g).astype(np.int64), 1)
    # a zero border of `pad` cells lets lookups near and just past the faces skip bounds checks
    self.pad = int(np.ceil((2 * step + r_max) / self.g)) + 2
    padded = np.zeros(tuple(self.gshape + 2 * self.pad), np.int32)
    self.grid = padded[tuple(slice(self.pad, self.pad + n) for n in self.gshape)]
    self._flat = padded.reshape(-1)
    self._strides = np.array(padded.strides, np.int64) // padded.itemsize
    self._scratch = np.zeros(padded.size, np.int32)  # deduplicates stamped cells
    self.tolerance = 0.6 * float(unit)  # overlap allowed between tubes of different cells
    self.r_min, self.r_max, self.step = r_min, r_max, step
    dirs = _sphere_directions()
    self.samples = np.concatenate([np.zeros((1, 3)), dirs, 0.55 * dirs])
    self._balls = {}
    self.taken = 0  # grid cells marked so far

  def occupied_fraction(self) -> float:
    return self.taken / self.grid.size

  def _lookup(self, pts: np.ndarray) -> np.ndarray:
    """Grid values at points (M, 3) nm; 0 outside the grid."""
    # points are at most a step and a radius away from the volume: inside the padded grid
    flat = (np.floor(pts / self.g).astype(np.int64) + self.pad) @ self._strides
    return self._flat[flat]

  def blocked(self, ends: np.ndarray, r: float, cell_id: int) -> np.ndarray:
    """Fraction (K,) of the ball of radius ~r around each of ends (K, 3) nm taken by other
    cells (a little overlap is tolerated, so tubes may touch)."""
    reach = max(r - self.tolerance, 0.5 * r)
    pts = ends[:, None, :] + reach * self.samples[None]
    vals = self._lookup(pts.reshape(-1, 3)).reshape(len(ends), -1)
    return np.count_nonzero((vals != 0) & (vals != cell_id), axis=1) / vals.shape[1]

  def _ball(self, r_cells: float) -> np.ndarray:
    key = round(r_cells * 2) / 2
    if key not in self._balls:
      k = int(np.ceil(key))
      g = np.stack(np.meshgrid(*([np.arange(-k, k + 1)] * 3), indexing="ij"), -1).reshape(-1, 3)
      self._balls[key] = g[np.sum(g * g, axis=1) <= key * key + 1e-9]
    return self._balls[key]

  def stamp_points(self, pos: np.ndarray, radii: np.ndarray, cell_id: int):
    """Marks balls (pos (N, 3) nm, radii (N,) nm) as cell_id where the grid is free."""
    if len(pos) == 0:
      return
    centres = np.floor(pos / self.g).astype(np.int64)
    keys = np.round(radii / self.g * 2) / 2
    for key in np.unique(keys):
      ball = self._ball(float(key))
      sel = centres[keys == key]
      idx = (sel[:, None, :] + ball[None]).reshape(-1, 3)
      ok = np.all((idx >= 0) & (idx < self.gshape), axis=1)
      flat = (idx[ok] + self.pad) @ self._strides
      flat = flat[self._flat[flat] == 0]
      # count each newly taken cell once: one of the duplicates' positions wins the scatter
      order = np.arange(len(flat), dtype=np.int32)
      self._scratch[flat] = order
      self.taken += int(np.count_nonzero(self._scratch[flat] == order))
      self._flat[flat] = cell_id

  def stamp_cell(self, cell: _Cell):
    pos = np.asarray(cell.pos)
    rad = np.asarray(cell.rad)
    # dense points along the tubes (a soma itself is stamped by stamp_soma)
    edges = _tube_edges(cell)
    spacing = np.maximum(0.75 * self.g, 0.5 * np.minimum(rad[edges[:, 0]], rad[edges[:, 1]]))
    pts, radii = _sample_edges(pos, rad, edges, spacing)
    if len(pts) == 0 and cell.soma_centre is None:
      pts, radii = pos, rad
    self.stamp_points(pts, radii, cell.id)

  def stamp_soma(self, cell_id, centre, axes):
    """Marks the ellipsoid (centre (3,) nm, semi-axes rows (3, 3) nm) as cell_id."""
    reach = _norm(axes).max()
    lo = np.maximum(np.floor((centre - reach) / self.g).astype(np.int64), 0)
    hi = np.minimum(np.ceil((centre + reach) / self.g).astype(np.int64) + 1, self.gshape)
    if np.any(hi <= lo):
      return
    gx, gy, gz = [((np.arange(a, b) + 0.5) * self.g - c).reshape(s)
                  for a, b, c, s in zip(lo, hi, centre, [(-1, 1, 1), (1, -1, 1), (1, 1, -1)])]
    inv = _inverse3(axes.T)
    u = [inv[i, 0] * gx + inv[i, 1] * gy + inv[i, 2] * gz for i in range(3)]
    inside = (u[0] ** 2 + u[1] ** 2 + u[2] ** 2) <= 1.0
    sub = self.grid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    new = inside & (sub == 0)
    sub[new] = cell_id
    self.taken += int(np.count_nonzero(new))

  def inside(self, p) -> bool:
    e = self.extent
    return bool(0 <= p[0] < e[0] and 0 <= p[1] < e[1] and 0 <= p[2] < e[2])

  def grow_branches(self, cell: _Cell, queue: list, p_branch: float, p_term: float,
                    p_neck: float, max_nodes: int):
    """Grows the branches in queue [(parent node, direction, radius, primary)] of cell, in
    order; branches may add more branches to the queue."""
    rng = self.rng
    sigma = 0.28
    n_branches = 0
    while queue and len(cell.pos) < max_nodes:
      cur, d, r, primary = queue.pop(0)
      p = cell.pos[cur]
      steps = 0
      neck_left = 0
      shrinks = 0
      max_steps = int(2.5 * np.max(self.extent) / self.step)
      while steps < max_steps and len(cell.pos) < max_nodes:
        noise = rng.normal(size=(6, 3))
        cands = d + sigma * noise[0]
        cands = cands + np.concatenate([np.zeros((1, 3)), 0.7 * noise[1:]])
        cands /= _norm(cands)[:, None]
        ends = p + self.step * cands
        occ = self.blocked(ends, r, cell.id)
        # angle to the persistent direction, ~ sqrt(2 (1 - cos))
        turn = np.sqrt(np.maximum(2.0 - 2.0 * _dot3(cands, cands[0]), 0.0))
        k = int(np.argmin(occ + 0.12 * turn))
        if occ[k] > 0.12:
          if r > 1.15 * self.r_min and shrinks < 3:
            r = max(self.r_min, 0.75 * r)
            shrinks += 1
            continue
          break  # blocked: the branch ends here
        p = ends[k]
        d = cands[k]
        steps += 1
        r = min(max(r * (1 - 0.012) + rng.normal(0, 0.05 * r), self.r_min), self.r_max)
        r_node = r
        if neck_left > 0:
          neck_left -= 1
        elif r >= 1.8 * self.r_min and steps > 3 and rng.random() < p_neck:
          neck_left = 1
          r_node = max(self.r_min, 0.45 * r)
        cur = cell.add(p, r_node, cur)
        if r_node < r:
          cell.necks.append(cur)
        if not self.inside(p):
          break
        if n_branches < 14 and steps > 2 and rng.random() < p_branch:
          n_branches += 1
          perp = _perpendicular(rng, d)
          theta = np.radians(rng.uniform(35, 75))
          child = _unit(d * np.cos(theta) + perp * np.sin(theta))
          d = _unit(d * np.cos(0.3 * theta) - perp * np.sin(0.3 * theta))
          r_child = max(self.r_min, r * rng.uniform(0.6, 0.85))
          queue.append((cur, child, r_child, False))
        if steps > 8 and rng.random() < (p_term * (0.3 if primary else 1.0)):
          break


def _tube_edges(cell: _Cell) -> np.ndarray:
  """Edges (E, 2) int64 (child, parent) of a cell's tubes: every edge but those to the soma
  root (the soma covers them)."""
  parent = np.asarray(cell.parent, np.int64)
  child = np.flatnonzero(parent >= 0)
  edges = np.stack([child, parent[child]], axis=1)
  if cell.soma_centre is not None:
    edges = edges[edges[:, 1] != 0]
  return edges


def _sample_edges(pos: np.ndarray, rad: np.ndarray, edges: np.ndarray, spacing):
  """Points every <= spacing nm (a number, or one per edge (E,)) along edges (E, 2) of nodes
  pos (N, 3) nm with radii (N,) nm, radii interpolated.
  -> (points float64 (P, 3), radii float64 (P,))."""
  if len(edges) == 0:
    return np.zeros((0, 3)), np.zeros(0)
  a = pos[edges[:, 0]]
  b = pos[edges[:, 1]]
  n = np.maximum(np.ceil(_norm(b - a) / spacing).astype(np.int64), 1)
  e = np.repeat(np.arange(len(edges)), n)
  start = np.repeat(np.cumsum(n) - n, n)
  t = (np.arange(n.sum()) - start) / n[e]
  pts = a[e] + t[:, None] * (b[e] - a[e])
  radii = rad[edges[e, 0]] + t * (rad[edges[e, 1]] - rad[edges[e, 0]])
  # the end node of each chain (a leaf) is the start of no edge: add the first nodes too
  pts = np.concatenate([pts, pos[edges[:, 0]]])
  radii = np.concatenate([radii, rad[edges[:, 0]]])
  return pts, radii


# --------------------------------------------------------------------------------------------
# rasterisation


def _rasterise(cells, shape, res, unit, bin_edges):
  """Weighted Voronoi partition of the volume among the cells' tubes and somata.

  -> (depth float32 (X, Y, Z): signed distance (nm) to the surface of the assigned cell,
  negative inside, labels uint32 (X, Y, Z): the cell whose surface is nearest/deepest)."""
  res = np.asarray(res, np.float64)
  depth = np.full(shape, np.inf, np.float32)
  labels = np.zeros(shape, np.uint32)
  pts_all, rad_all, ids_all = [], [], []
  spacing = 0.5 * float(res.min())
  for cell in cells:
    pts, radii = _sample_edges(np.asarray(cell.pos), np.asarray(cell.rad), _tube_edges(cell),
                               spacing)
    if cell.soma_centre is None and len(cell.pos) == 1:
      pts, radii = np.asarray(cell.pos), np.asarray(cell.rad)
    pts_all.append(pts)
    rad_all.append(radii)
    ids_all.append(np.full(len(pts), cell.id, np.uint32))
  pts = np.concatenate(pts_all) if pts_all else np.zeros((0, 3))
  radii = np.concatenate(rad_all) if rad_all else np.zeros(0)
  ids = np.concatenate(ids_all) if ids_all else np.zeros(0, np.uint32)
  vox = np.floor(pts / res).astype(np.int64)
  ok = np.all((vox >= 0) & (vox < np.asarray(shape)), axis=1)
  pts, radii, ids, vox = pts[ok], radii[ok], ids[ok], vox[ok]
  cx, cy, cz = [((np.arange(n) + 0.5) * r).astype(np.float32) for n, r in zip(shape, res)]
  bins = np.digitize(radii, bin_edges)
  for b in np.unique(bins):
    sel = np.flatnonzero(bins == b)
    order = sel[np.argsort(radii[sel], kind="stable")]
    seeds = np.zeros(shape, np.int32)
    seeds[vox[order, 0], vox[order, 1], vox[order, 2]] = order.astype(np.int32) + 1
    ind = ndimage.distance_transform_edt(seeds == 0, sampling=res, return_distances=False,
                                         return_indices=True)
    pid = seeds[ind[0], ind[1], ind[2]] - 1
    del ind
    p = pts.astype(np.float32)
    dist = (cx[:, None, None] - p[pid, 0]) ** 2
    dist += (cy[None, :, None] - p[pid, 1]) ** 2
    dist += (cz[None, None, :] - p[pid, 2]) ** 2
    d = np.sqrt(dist) - radii.astype(np.float32)[pid]
    better = d < depth
    depth[better] = d[better]
    labels[better] = ids[pid[better]]
  for cell in cells:
    if cell.soma_centre is None:
      continue
    axes = cell.soma_axes
    r_mean = float(np.mean(_norm(axes)))
    reach = _norm(axes).max() + 3 * unit
    box, lo = _box(cell.soma_centre / res, reach / res, shape)
    if box is None:
      continue
    gx, gy, gz = _centres_nm(box, lo, res)
    gx, gy, gz = gx - cell.soma_centre[0], gy - cell.soma_centre[1], gz - cell.soma_centre[2]
    inv = _inverse3(axes.T)
    u2 = sum((inv[i, 0] * gx + inv[i, 1] * gy + inv[i, 2] * gz) ** 2 for i in range(3))
    d = ((np.sqrt(u2) - 1.0) * r_mean).astype(np.float32)
    sub_d = depth[box]
    sub_l = labels[box]
    better = d < sub_d
    sub_d[better] = d[better]
    sub_l[better] = cell.id
  return depth, labels


# --------------------------------------------------------------------------------------------
# skeletons and connectivity


def _contract_invalid(parent: np.ndarray, valid: np.ndarray, comp: np.ndarray):
  """Nodes in index order (parent[i] < i). Invalid nodes are removed and their valid
  descendants attached to the nearest valid ancestor; edges across components are cut.
  -> new_parent int64 (N,) (-1 = root or removed), root int64 (N,) tree root of each valid
  node (-1 for invalid)."""
  n = len(parent)
  anc = np.full(n, -1, np.int64)      # nearest valid ancestor-or-self
  new_parent = np.full(n, -1, np.int64)
  root = np.full(n, -1, np.int64)
  for i in range(n):
    p = parent[i]
    up = anc[p] if p >= 0 else -1
    if valid[i]:
      anc[i] = i
      if up >= 0 and comp[up] == comp[i]:
        new_parent[i] = up
        root[i] = root[up]
      else:
        root[i] = i
    else:
      anc[i] = up
  return new_parent, root


def _make_skeleton(cell_id, pos, rad, parent, nodes, soma_node, name) -> dict:
  """A skeleton dict from the nodes (index array, parents among them, in index order)."""
  nodes = np.asarray(nodes, np.int64)
  remap = {int(n): k for k, n in enumerate(nodes)}
  edges = [(remap[int(n)], remap[int(parent[n])]) for n in nodes if parent[n] >= 0]
  soma = [remap[soma_node]] if soma_node is not None and soma_node in remap else []
  return {"id": int(cell_id),
          "vertices_nm": np.asarray(pos, np.float64)[nodes].reshape(-1, 3),
          "edges": np.asarray(edges, np.int64).reshape(-1, 2),
          "soma": np.asarray(soma, np.int64),
          "radii": np.asarray(rad, np.float64)[nodes],
          "name": name}


# --------------------------------------------------------------------------------------------
# the generator


def make_synthetic_volume(shape=(128, 128, 64), resolution=(10, 10, 10), seed: int = 0,
                          n_cells: int | None = None, unit_nm: float | None = None,
                          ecs_fraction: float = 0.2, fill_fraction: float = 0.62,
                          n_synapses: int | None = None) -> SyntheticVolume:
  """An EM-like volume with neurons, nuclei, mitochondria, synapses and skeletons.

  shape: (X, Y, Z) voxels; resolution: voxel size (x, y, z) nm (anisotropic is fine, e.g.
  (8, 8, 40): the tissue is built in nm and sampled).
  seed: the same seed (and arguments) gives byte-identical arrays.
  n_cells: nucleated neurons (somata); default from the volume (>= 2 when they fit).
  unit_nm: length scale of the tissue; neurite radii are 2-6 units, soma radii 14-20 units.
    Default max(finest voxel size, coarsest / 3): 10 nm at (10, 10, 10), 13.3 nm at (8, 8, 40).
  ecs_fraction: target fraction of extracellular voxels (label 0); reached by growing all cells
    by one margin (0..2 units), so it is approximate.
  fill_fraction: neurite-only cells are added (from the faces, then through the voids) until
    this fraction of the volume is taken by the grown tubes (before the margin), or until no
    more fit.
  n_synapses: synapses to place; default ~1 per 35000 cubic units, fewer if contacts run out.
  Returns a SyntheticVolume (see its docstring for fields, dtypes and conventions).
  """
  shape = tuple(int(s) for s in shape)
  res = np.asarray(resolution, np.float64)
  if len(shape) != 3 or len(res) != 3 or min(shape) < 4 or np.any(res <= 0):
    raise IicatsError(f"shape {tuple(shape)} / resolution {tuple(float(r) for r in res)}: "
                      "need 3 axes, >= 4 voxels, > 0 nm")
  rng = np.random.default_rng(seed)
  extent = np.asarray(shape) * res
  u = float(unit_nm) if unit_nm else float(max(res.min(), res.max() / 3.0))
  r_min, r_max = 2.0 * u, 6.0 * u
  step = 2.5 * u
  volume_u3 = float(np.prod(extent / u))

  # 1. somata
  if n_cells is None:
    n_cells = int(np.clip(round(volume_u3 / 400_000), 2, 16))
  grower = _Grower(rng, extent, u, r_min, r_max, step)
  cells: list[_Cell] = []
  soma_r_max = min(20.0 * u, 0.45 * float(extent.min()) / 0.65)
  for _ in range(40 * max(n_cells, 1)):
    if len(cells) >= n_cells:
      break
    R = rng.uniform(14.0 * u, 20.0 * u)
    R = min(R, soma_r_max)
    lo = 0.65 * R
    if np.any(extent - 2 * lo <= 0):
      continue
    c = lo + rng.uniform(0, 1, 3) * (extent - 2 * lo)
    if any(_norm(c - o.soma_centre) < R + _norm(o.soma_axes).max() + 3 * u for o in cells):
      continue
    rot = _random_rotation(rng)
    axes = (rot * (R * rng.uniform(0.9, 1.1, 3))[:, None])
    cell = _Cell(id=len(cells) + 1, pos=[], rad=[], parent=[], soma_centre=c, soma_axes=axes)
    cell.add(c, R, -1)
    cells.append(cell)
  for cell in cells:
    grower.stamp_soma(cell.id, cell.soma_centre, cell.soma_axes)

  # 2. neurites of the somata, then neurite-only cells from the faces
  max_nodes = int(4 * np.max(extent) / step * 6)
  for cell in cells:
    R = float(np.mean(_norm(cell.soma_axes)))
    n_primary = int(rng.integers(3, 7))
    dirs = []
    for _ in range(60):
      if len(dirs) >= n_primary:
        break
      v = _unit(rng.normal(size=3))
      if all(_dot3(v, w) < np.cos(np.radians(45)) for w in dirs):
        dirs.append(v)
    queue = []
    for v in dirs:
      start = cell.soma_centre + 0.8 * R * v
      node = cell.add(start, rng.uniform(4.0 * u, r_max), 0)
      queue.append((node, v, cell.rad[node], True))
    grower.grow_branches(cell, queue, p_branch=0.05, p_term=0.015, p_neck=0.03,
                         max_nodes=max_nodes)
    grower.stamp_cell(cell)
  face_area = np.array([extent[1] * extent[2], extent[0] * extent[2], extent[0] * extent[1]])
  face_p = np.concatenate([face_area, face_area]) / (2 * face_area.sum())
  attempts = 0
  max_extra = int(max(20, volume_u3 / 8000))
  while grower.occupied_fraction() < fill_fraction and attempts < 6 * max_extra:
    attempts += 1
    face = int(rng.choice(6, p=face_p))
    axis, high = face % 3, face >= 3
    start = rng.uniform(0, 1, 3) * extent
    start[axis] = extent[axis] * (1 - 1e-6) if high else 0.0
    inward = np.zeros(3)
    inward[axis] = -1.0 if high else 1.0
    d = _unit(inward + 0.8 * _unit(rng.normal(size=3)))
    if d[axis] * inward[axis] < 0.3:
      d = _unit(d + inward)
    r = rng.uniform(2.5 * u, 5.0 * u)
    if grower.blocked(start[None], r, -1)[0] > 0.1:
      continue
    cell = _Cell(id=len(cells) + 1, pos=[], rad=[], parent=[])
    cell.add(start, r, -1)
    grower.grow_branches(cell, [(0, d, r, True)], p_branch=0.035, p_term=0.01, p_neck=0.02,
                         max_nodes=max_nodes)
    if len(cell.pos) < 4:
      continue
    grower.stamp_cell(cell)
    cells.append(cell)
  # the faces are crowded now: neurites passing through the remaining voids fill them
  attempts = 0
  while grower.occupied_fraction() < fill_fraction and attempts < 40 * max_extra:
    attempts += 1
    start = rng.uniform(0, 1, 3) * extent
    r = rng.uniform(2.5 * u, 5.0 * u)
    if grower.blocked(start[None], r + 1.5 * u, -1)[0] > 0.0:
      continue
    d = _unit(rng.normal(size=3))
    cell = _Cell(id=len(cells) + 1, pos=[], rad=[], parent=[])
    cell.add(start, r, -1)
    grower.grow_branches(cell, [(0, d, r, True), (0, -d, r, True)], p_branch=0.035,
                         p_term=0.01, p_neck=0.02, max_nodes=max_nodes)
    if len(cell.pos) < 5:
      continue
    grower.stamp_cell(cell)
    cells.append(cell)

  # 3. rasterise, grow every cell by one margin to leave ecs_fraction extracellular
  bin_edges = np.array([3.6 * u])  # 2 radius bins: ~1 % of voxels differ from 3 bins
  depth, raw = _rasterise(cells, shape, res, u, bin_edges)
  sample = depth.reshape(-1)[:: max(1, depth.size // 400_000)]
  margin = float(np.clip(np.quantile(sample, 1.0 - ecs_fraction), 0.0, 2.0 * u))
  raw[depth > margin] = 0
  del depth

  # 4. connectivity: one 6-connected piece per cell; skeletons from the nodes
  neurons, nuclei, skeletons, nucleus_cells, nucleus_points, cell_nodes = _finalise_cells(
    cells, raw, res, u, margin, rng)
  del raw

  # 5. organelles, synapses, image
  mitochondria, mito_cells, straddling = _mitochondria(neurons, nuclei, skeletons, cell_nodes,
                                                       cells, res, u, rng)
  if n_synapses is None:
    n_synapses = int(max(4, round(volume_u3 / 35_000)))
  synapses_nm, partners, synapse_mask, vesicles = _synapses(neurons, nuclei, mitochondria, res, u,
                                                            n_synapses, rng)
  image = _render(neurons, nuclei, mitochondria, synapse_mask, vesicles, res, u, rng)
  return SyntheticVolume(
    image=image, neurons=neurons, nuclei=nuclei,
    nucleus_points_nm=np.asarray(nucleus_points, np.float64).reshape(-1, 3),
    nucleus_cells=np.asarray(nucleus_cells, np.int64),
    mitochondria=mitochondria, mitochondria_cells=np.asarray(mito_cells, np.int64),
    synapses_nm=synapses_nm, synapse_partners=partners, synapse_mask=synapse_mask,
    skeletons=skeletons, resolution=tuple(float(r) for r in res), seed=int(seed),
    straddling_mitochondria=np.asarray(straddling, np.int64))


def _finalise_cells(cells, raw, res, u, margin, rng):
  """Makes every cell 6-connected (main piece keeps the id, big cut-off pieces with skeleton
  nodes become new cells, the rest extracellular), cuts the nuclei, builds the skeletons.

  -> (neurons uint32 (X, Y, Z), nuclei uint32 (X, Y, Z), skeletons [dict], nucleus_cells [int],
  nucleus_points [(3,) nm], cell_nodes {neuron id: (cell index, node indices kept)})."""
  shape = raw.shape
  comps, n_comp = cc3d.connected_components(raw, connectivity=6, return_N=True)
  comp_label = np.zeros(n_comp + 1, np.uint32)
  comp_label[comps.reshape(-1)] = raw.reshape(-1)
  comp_size = np.bincount(comps.reshape(-1), minlength=n_comp + 1)
  min_fragment = max(64, int(round(np.pi * (3 * u) ** 2 * 10 * u / np.prod(res))))
  lut = np.zeros(n_comp + 1, np.uint32)
  pieces = []  # (cell index, component, node indices, soma node or None)
  node_info = []
  for ci, cell in enumerate(cells):
    pos = np.asarray(cell.pos)
    parent = np.asarray(cell.parent, np.int64)
    vox = np.floor(pos / res).astype(np.int64)
    inb = np.all((vox >= 0) & (vox < np.asarray(shape)), axis=1)
    vc = np.clip(vox, 0, np.asarray(shape) - 1)
    comp = np.where(inb, comps[vc[:, 0], vc[:, 1], vc[:, 2]], 0)
    valid = inb & (comp > 0) & (comp_label[comp] == cell.id)
    new_parent, root = _contract_invalid(parent, valid, comp)
    node_info.append((new_parent, comp))
    trees = {}
    for i in np.flatnonzero(valid):
      trees.setdefault(int(root[i]), []).append(int(i))
    # one tree per component: the largest, or for the soma's component the soma's tree
    by_comp = {}
    for r, members in trees.items():
      c = int(comp[r])
      if c not in by_comp or len(members) > len(by_comp[c]):
        by_comp[c] = members
    has_soma = cell.soma_centre is not None
    if has_soma:
      if not valid[0]:
        continue  # the soma was lost (never seen): the cell becomes extracellular space
      main = int(comp[0])
      by_comp[main] = trees[0]
    elif by_comp:
      main = max(by_comp, key=lambda c: (comp_size[c], -c))
    else:
      continue
    for c in sorted(by_comp, key=lambda c: (c != main, c)):
      if c != main and (comp_size[c] < min_fragment or len(by_comp[c]) < 2):
        continue
      soma_node = 0 if (c == main and has_soma) else None
      pieces.append((ci, c, by_comp[c], soma_node))
  # ids: nucleated cells first, then the rest, in construction order
  pieces.sort(key=lambda t: (t[3] is None, t[0], t[1]))
  for k, (_, c, _, _) in enumerate(pieces):
    lut[c] = k + 1
  neurons = lut[comps]
  del comps
  # nuclei inside the somata (at least one voxel from the cell boundary)
  nuclei = np.zeros(shape, np.uint32)
  nucleus_cells, nucleus_points = [], []
  skeletons = []
  cell_nodes = {}
  for k, (ci, c, members, soma_node) in enumerate(pieces):
    nid = k + 1
    cell = cells[ci]
    pos = np.asarray(cell.pos).copy()
    rad = np.asarray(cell.rad) + margin
    new_parent, comp = node_info[ci]
    members = list(members)
    if soma_node is not None:
      point = _cut_nucleus(nuclei, neurons, nid, len(nucleus_cells) + 1, cell, res, u, rng)
      if point is not None:
        nucleus_cells.append(nid)
        nucleus_points.append(point)
        pos[0] = point
      else:
        soma_node = None
    skel = _make_skeleton(nid, pos, rad, new_parent, members, soma_node,
                          name=f"synthetic-{nid}")
    skeletons.append(skel)
    cell_nodes[nid] = (ci, np.asarray(members, np.int64))
  return neurons, nuclei, skeletons, nucleus_cells, nucleus_points, cell_nodes


def _cut_nucleus(nuclei, neurons, cell_id, nucleus_id, cell, res, u, rng):
  """Writes the nucleus of a soma into nuclei (ellipsoid ~0.55 of the soma, inside the cell,
  >= 1 voxel from its boundary). -> its centroid (3,) nm, or None."""
  axes = cell.soma_axes
  R = float(np.mean(_norm(axes)))
  centre = cell.soma_centre + rng.normal(0, 0.05 * R, 3)
  scale = rng.uniform(0.5, 0.6) * rng.uniform(0.93, 1.07, 3)
  n_axes = axes * scale[:, None]
  reach = _norm(n_axes).max() + 2 * res.max()
  box, lo = _box(centre / res, reach / res, neurons.shape)
  if box is None:
    return None
  gx, gy, gz = _centres_nm(box, lo, res)
  gx, gy, gz = gx - centre[0], gy - centre[1], gz - centre[2]
  inv = _inverse3(n_axes.T)
  u2 = sum((inv[i, 0] * gx + inv[i, 1] * gy + inv[i, 2] * gz) ** 2 for i in range(3))
  cell_mask = neurons[box] == cell_id
  interior = edt.edt(cell_mask, anisotropy=tuple(res), black_border=False) > 1.01 * res.min()
  mask = _largest_component((u2 <= 1.0) & interior)
  if np.count_nonzero(mask) < 8:
    return None
  sub = nuclei[box]
  sub[mask] = nucleus_id
  idx = np.argwhere(mask)
  point = (idx.mean(axis=0) + lo + 0.5) * res
  v = np.floor(point / res).astype(np.int64) - lo
  if not (np.all(v >= 0) and np.all(v < mask.shape) and mask[tuple(v)]):
    d = edt.edt(mask, anisotropy=tuple(res))
    best = np.unravel_index(int(np.argmax(d)), mask.shape)
    point = (np.asarray(best) + lo + 0.5) * res
  return point


# --------------------------------------------------------------------------------------------
# mitochondria


def _mitochondria(neurons, nuclei, skeletons, cell_nodes, cells, res, u, rng):
  """Mitochondria: tubes along the skeletons (radius ~0.5 of the neurite), some centred on a
  neck, and ellipsoids in the somata, each cut to the interior of its cell (>= 1 voxel from the
  boundary, outside the nucleus, apart from other mitochondria).

  -> (mitochondria uint32 (X, Y, Z), cells [neuron id per mitochondrion], straddling [ids])."""
  shape = neurons.shape
  mito = np.zeros(shape, np.uint32)
  mito_cells, straddling = [], []
  min_voxels = max(12, int(round(0.5 * np.pi * (1.5 * u) ** 2 * 6 * u / np.prod(res))))
  res_min = float(res.min())

  def place(cell_id, pts, radii):
    reach = float(radii.max()) + 2 * res.max()
    lo_pt = pts.min(axis=0) - reach
    hi_pt = pts.max(axis=0) + reach
    box, lo = _box((lo_pt + hi_pt) / 2 / res, (hi_pt - lo_pt) / 2 / res, shape)
    if box is None:
      return None
    gx, gy, gz = _centres_nm(box, lo, res)
    dist, rad = _polyline_distance(gx, gy, gz, pts, radii)
    cell_mask = neurons[box] == cell_id
    interior = edt.edt(cell_mask, anisotropy=tuple(res), black_border=False) > 1.01 * res_min
    taken = mito[box] > 0
    free = ~ndimage.binary_dilation(taken, iterations=1) if taken.any() else ~taken
    mask = (dist <= rad) & interior & free & (nuclei[box] == 0)
    mask = _largest_component(mask)
    if np.count_nonzero(mask) < min_voxels:
      return None
    mid = len(mito_cells) + 1
    mito[box][mask] = mid
    mito_cells.append(cell_id)
    return mid, mask, box, lo

  for skel in skeletons:
    cid = skel["id"]
    ci, members = cell_nodes[cid]
    cell = cells[ci]
    pos = skel["vertices_nm"]
    radii = skel["radii"]
    n = len(pos)
    if n < 2:
      continue
    parent = np.full(n, -1, np.int64)
    parent[skel["edges"][:, 0]] = skel["edges"][:, 1]
    is_soma = np.zeros(n, bool)
    is_soma[skel["soma"]] = True
    # necks: a mitochondrion running through the narrow node
    kept = {int(m): j for j, m in enumerate(members)}
    neck_nodes = [kept[k] for k in cell.necks if k in kept]
    for k in neck_nodes:
      if rng.random() > 0.6:
        continue
      path = [k]
      for _ in range(3):
        if parent[path[0]] < 0 or is_soma[parent[path[0]]]:
          break
        path.insert(0, int(parent[path[0]]))
      has_child = bool(np.any(parent == k))
      c = k
      for _ in range(3):
        kids = np.flatnonzero(parent == c)
        if len(kids) == 0:
          break
        c = int(kids[0])
        path.append(c)
      if not has_child or path.index(k) == 0:
        continue
      pts = pos[path]
      mr = np.clip(0.6 * radii[path], 1.2 * res_min, 3.5 * u)
      mr[path.index(k)] = max(0.42 * radii[k], 0.9 * res_min)
      got = place(cid, pts, mr)
      if got is None:
        continue
      mid, mask, box, lo = got
      # it straddles when it reaches both sides of the neck
      px, py, pz = _centres_nm(box, lo, res)
      here = pos[k]
      toward = pos[path[-1]] - pos[path[0]]
      proj = ((px - here[0]) * toward[0] + (py - here[1]) * toward[1]
              + (pz - here[2]) * toward[2]) / max(_norm(toward), 1e-9)
      sides = np.broadcast_to(proj, mask.shape)[mask]
      if sides.min() < -1.5 * u and sides.max() > 1.5 * u:
        straddling.append(mid)
    # tubes along the neurites
    usable = np.flatnonzero((radii >= 2.6 * u) & ~is_soma & (parent >= 0))
    length = float(np.sum(_norm(pos[skel["edges"][:, 0]] - pos[skel["edges"][:, 1]])))
    n_mito = min(rng.poisson(length / (90 * u)), 10, len(usable))
    for k in rng.permutation(usable)[:n_mito]:
      path = [int(k)]
      n_len = int(rng.integers(2, 6))
      while len(path) < n_len and parent[path[-1]] >= 0 and not is_soma[parent[path[-1]]]:
        path.append(int(parent[path[-1]]))
      if len(path) < 2:
        continue
      pts = pos[path]
      mr = np.clip(rng.uniform(0.55, 0.7) * radii[path], 1.5 * res_min, 3.5 * u)
      place(cid, pts, mr)
    # ellipsoids in the soma
    if len(skel["soma"]):
      R = float(np.mean(_norm(cell.soma_axes)))
      centre = cell.soma_centre
      for _ in range(int(rng.integers(2, 5))):
        v = _unit(rng.normal(size=3))
        c = centre + v * R * rng.uniform(0.72, 0.82)
        t = _perpendicular(rng, v) * rng.uniform(3.0, 6.0) * u
        mr = np.full(2, rng.uniform(1.8, 2.5) * u)
        place(cid, np.stack([c - t, c + t]), mr)
  return mito, mito_cells, straddling


# --------------------------------------------------------------------------------------------
# synapses


def _synapses(neurons, nuclei, mito, res, u, n_synapses, rng):
  """Synapses at contact sites between two cells (in-plane contacts when z is coarse).

  -> (synapses_nm float64 (S, 2, 3) (pre, post) nm, partners int64 (S, 2), synapse_mask uint8
  (X, Y, Z) 1 = vesicle cloud / 2 = PSD, vesicles float32 (X, Y, Z) vesicle darkness 0..1)."""
  shape = neurons.shape
  mask = np.zeros(shape, np.uint8)
  vesicles = np.zeros(shape, np.float32)
  axes = [0, 1] if res[2] > 1.5 * min(res[0], res[1]) else [0, 1, 2]
  cand = []
  for axis in axes:
    a = np.moveaxis(neurons, axis, 0)
    m = (a[:-1] != a[1:]) & (a[:-1] > 0) & (a[1:] > 0)
    flat = np.flatnonzero(m)
    if len(flat) == 0:
      continue
    pick = rng.choice(flat, size=min(len(flat), 3000), replace=False)
    pick.sort()
    idx = np.stack(np.unravel_index(pick, m.shape), axis=1)
    # back to (x, y, z): moveaxis put `axis` first
    order = [None] * 3
    rest = [i for i in range(3) if i != axis]
    order[axis] = 0
    order[rest[0]], order[rest[1]] = 1, 2
    idx = idx[:, order]
    cand.append(np.concatenate([idx, np.full((len(idx), 1), axis)], axis=1))
  if not cand:
    return (np.zeros((0, 2, 3)), np.zeros((0, 2), np.int64), mask, vesicles)
  cand = np.concatenate(cand)
  cand = cand[rng.permutation(len(cand))]
  spacing = 14.0 * u
  border = np.ceil(4 * u / res).astype(np.int64)
  chosen_mid, points, partners = [], [], []
  pair_count = {}
  psd_r, cloud_r = 6.0 * u, 5.5 * u
  psd_thick = max(3.0 * u, 1.6 * float(min(res[0], res[1])))
  res_min = float(res.min())
  for row in cand:
    if len(points) >= n_synapses:
      break
    v0 = row[:3].copy()
    axis = int(row[3])
    v1 = v0.copy()
    v1[axis] += 1
    if np.any(v0 < border) or np.any(v1 >= np.asarray(shape) - border):
      continue
    mid = ((v0 + 0.5) * res + (v1 + 0.5) * res) / 2
    if chosen_mid and np.min(_norm(np.asarray(chosen_mid) - mid)) < spacing:
      continue
    a, b = int(neurons[tuple(v0)]), int(neurons[tuple(v1)])
    pre, post = (a, b) if rng.random() < 0.5 else (b, a)
    if pair_count.get((pre, post), 0) >= 2:
      continue
    # membrane normal from the local centroids of the two cells
    box, lo = _box((v0 + v1) / 2 + 0.5, np.maximum(np.ceil(4 * u / res), 1), shape)
    loc = neurons[box]
    gx, gy, gz = _centres_nm(box, lo, res)
    g = np.broadcast_arrays(gx, gy, gz)
    cpre = np.array([c[loc == pre].mean() for c in g])
    cpost = np.array([c[loc == post].mean() for c in g])
    n = cpost - cpre
    if not np.all(np.isfinite(n)) or _norm(n) < 1e-6:
      continue
    n = _unit(n)
    ok = None
    for delta in (rng.uniform(16.0, 29.0), 20.0, 25.0, 17.0, 29.0, 15.0):
      p_pre = mid - delta * n
      p_post = mid + delta * n
      vp = np.floor(p_pre / res).astype(np.int64)
      vq = np.floor(p_post / res).astype(np.int64)
      if (np.all(vp >= 0) and np.all(vp < shape) and np.all(vq >= 0) and np.all(vq < shape)
          and neurons[tuple(vp)] == pre and neurons[tuple(vq)] == post):
        ok = (p_pre, p_post)
        break
    if ok is None:
      continue
    # PSD and vesicle cloud
    reach = cloud_r + 2 * res.max()
    box, lo = _box(mid / res, reach / res, shape)
    loc = neurons[box]
    gx, gy, gz = _centres_nm(box, lo, res)
    to_pre = edt.edt(loc != pre, anisotropy=tuple(res), black_border=False)
    to_post = edt.edt(loc != post, anisotropy=tuple(res), black_border=False)
    d_mid = np.sqrt((gx - mid[0]) ** 2 + (gy - mid[1]) ** 2 + (gz - mid[2]) ** 2)
    d_pre = np.sqrt((gx - ok[0][0]) ** 2 + (gy - ok[0][1]) ** 2 + (gz - ok[0][2]) ** 2)
    free = (mask[box] == 0) & (nuclei[box] == 0) & (mito[box] == 0)
    psd = (loc == post) & (to_pre <= psd_thick) & (d_mid <= psd_r) & free
    cloud = (loc == pre) & (to_post <= cloud_r) & (d_pre <= cloud_r) & free
    if np.count_nonzero(psd) < 3 or np.count_nonzero(cloud) < 6:
      continue
    sub = mask[box]
    sub[cloud] = 1
    sub[psd] = 2
    # vesicles: rings of ~20 nm radius in the cloud, away from the membrane
    inner = edt.edt(loc == pre, anisotropy=tuple(res), black_border=False)
    spots = np.argwhere(cloud & (inner > 2.0 * u + res_min))
    if len(spots):
      nv = min(len(spots), int(rng.integers(6, 16)))
      centres = (spots[rng.choice(len(spots), nv, replace=False)] + lo + 0.5) * res
      rv = max(2.0 * u, 1.6 * res_min)
      dv = np.full(loc.shape, np.inf, np.float32)
      for c in centres:
        dv = np.minimum(dv, np.sqrt((gx - c[0]) ** 2 + (gy - c[1]) ** 2 + (gz - c[2]) ** 2))
      ring = np.exp(-((dv - rv) / (0.7 * res_min)) ** 2) * (loc == pre) * (mito[box] == 0)
      vsub = vesicles[box]
      np.maximum(vsub, ring.astype(np.float32), out=vsub)
    chosen_mid.append(mid)
    points.append(np.stack(ok))
    partners.append((pre, post))
    pair_count[(pre, post)] = pair_count.get((pre, post), 0) + 1
  synapses = np.asarray(points, np.float64).reshape(-1, 2, 3)
  return synapses, np.asarray(partners, np.int64).reshape(-1, 2), mask, vesicles


# --------------------------------------------------------------------------------------------
# image


def _smooth_noise(rng, shape, sigma_nm, res):
  """Gaussian-filtered white noise, float32 (X, Y, Z), scaled to unit standard deviation."""
  n = rng.standard_normal(shape, dtype=np.float32)
  n = ndimage.gaussian_filter(n, sigma=[sigma_nm / r for r in res], mode="wrap")
  return n / max(float(n.std()), 1e-6)


def _rim(labels: np.ndarray, res, outside: bool = False) -> np.ndarray:
  """bool (X, Y, Z): voxels of labels > 0 (outside=True: of labels == 0) with a 6-neighbour of
  another value along one of the finest axes (within 1 finest voxel); the volume border counts
  for nothing."""
  res = np.asarray(res, np.float64)
  out = np.zeros(labels.shape, bool)
  for axis in np.flatnonzero(res <= 1.01 * res.min()):
    a = [slice(None)] * 3
    b = [slice(None)] * 3
    a[axis] = slice(None, -1)
    b[axis] = slice(1, None)
    diff = labels[tuple(a)] != labels[tuple(b)]
    out[tuple(a)] |= diff
    out[tuple(b)] |= diff
  return out & ((labels == 0) if outside else (labels > 0))


def _render(neurons, nuclei, mito, synapse_mask, vesicles, res, u, rng):
  """The EM-like image, uint8 (X, Y, Z): light extracellular space, mid-grey textured cytoplasm,
  dark membranes, nucleus with a dark envelope and chromatin, dark mitochondria with lighter
  cristae, dark PSDs and vesicles; Gaussian PSF, slow drift, shot and read noise."""
  shape = neurons.shape
  res_min = float(res.min())
  fine = _smooth_noise(rng, shape, 0.9 * res_min, res)
  coarse = _smooth_noise(rng, shape, 2.5 * u, res)
  n_ids = int(neurons.max()) + 1
  offset = rng.normal(0, 0.03, n_ids).astype(np.float32)
  offset[0] = 0
  cell = neurons > 0
  img = np.where(cell, np.float32(0.64) + offset[neurons], np.float32(0.71))
  img += np.where(cell, np.float32(0.035), np.float32(0.02)) * fine
  # dark speckles in the cytoplasm (vesicles, microtubules, ER seen end-on)
  img[((coarse * 0.5 + fine) > 2.1) & cell] -= np.float32(0.12)
  # nucleus: chromatin texture, heterochromatin under the envelope, dark double envelope
  nuc = nuclei > 0
  if nuc.any():
    lo = np.maximum(np.argwhere(nuc).min(axis=0) - 2, 0)
    hi = np.argwhere(nuc).max(axis=0) + 3
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub_nuc, sub_cell = nuc[box], cell[box]
    d_in = edt.edt(nuclei[box], anisotropy=tuple(res), black_border=False)
    chrom = (0.56 + 0.06 * coarse[box] + 0.03 * fine[box]
             - np.float32(0.1) * (coarse[box] > 1.2))
    chrom -= 0.10 * np.clip(1.0 - (d_in - 1.5 * res_min) / (2.5 * u), 0, 1).astype(np.float32)
    sub = img[box]
    sub[sub_nuc] = chrom[sub_nuc]
    inner = _rim(nuclei[box], res)
    outer = sub_cell & ~sub_nuc & _rim(sub_nuc.astype(np.uint8), res, outside=True)
    envelope = inner | outer
    sub[envelope] = 0.30 + 0.03 * fine[box][envelope]
  # mitochondria: dark, lighter cristae stripes across the long axis, dark outer membrane
  if mito.any():
    m_ids = int(mito.max()) + 1
    dirs = _unit(rng.normal(size=(m_ids, 3))).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, m_ids).astype(np.float32)
    idx = np.nonzero(mito)
    lab = mito[idx]
    pos = [(idx[i] + 0.5).astype(np.float32) * np.float32(res[i]) for i in range(3)]
    proj = pos[0] * dirs[lab, 0] + pos[1] * dirs[lab, 1] + pos[2] * dirs[lab, 2]
    wavelength = max(3.0 * u, 3.0 * res_min)
    stripe = np.cos(2 * np.pi * proj / wavelength + phase[lab])
    val = 0.33 + 0.11 * (stripe > 0.55) + 0.03 * fine[idx]
    img[idx] = val
    img[_rim(mito, res)] = 0.22
  # membranes: every cell voxel next to another label (both sides between cells)
  d_cell = edt.edt(neurons, anisotropy=tuple(res), black_border=False)
  mem = np.clip((1.5 * res_min - d_cell) / (0.5 * res_min), 0, 1).astype(np.float32)
  mem[~cell] = 0
  img += mem * (np.float32(0.16) - img)
  # synapses: PSD, a slightly darker vesicle cloud, vesicle rings
  psd = synapse_mask == 2
  img[psd] = 0.85 * 0.12 + 0.15 * img[psd]
  img[synapse_mask == 1] -= np.float32(0.04)
  img += np.float32(0.8) * vesicles * (np.float32(0.25) - img)
  # PSF, drift, noise (shot noise as a Gaussian of variance signal / photons)
  img = ndimage.gaussian_filter(img, sigma=[0.6 * res_min / r for r in res])
  X, Y, Z = shape
  x = (np.arange(X, dtype=np.float32) / X)[:, None, None]
  y = (np.arange(Y, dtype=np.float32) / Y)[None, :, None]
  z = (np.arange(Z, dtype=np.float32) / Z)[None, None, :]
  ph = rng.uniform(0, 2 * np.pi, 3)
  drift = (1 + 0.05 * np.sin(2 * np.pi * 0.7 * z + ph[0])
           + 0.04 * np.sin(2 * np.pi * 0.5 * x + ph[1])
           + 0.03 * np.sin(2 * np.pi * 0.6 * y + ph[2])
           + rng.normal(0, 0.01, Z).astype(np.float32)[None, None, :])
  img *= drift.astype(np.float32)
  photons = np.float32(350.0)
  np.maximum(img, 0, out=img)
  sigma = np.sqrt(img / photons + np.float32(0.015 ** 2))
  img += sigma * rng.standard_normal(shape, dtype=np.float32)
  out = np.clip(img * 255.0 * 1.2 - 32.0, 0, 255)
  return np.round(out).astype(np.uint8)
