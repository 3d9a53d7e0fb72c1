"""Reconstruction metrics: ERL, bERL, nERL on ground-truth skeletons; VOI and adapted Rand
error on dense labels; affinity average precision; organelle instance and voxel scores. Pure
numpy (plus scipy.sparse and fastremap), no I/O.

Definitions (shared/DESIGN.md, "Metrics"):
- every skeleton node carries the predicted segment id at its voxel (0 = background/outside);
- a *merging* segment is a non-zero segment holding nodes of >= 2 skeletons;
- a segment is *violating* (bERL) when it is merging, or holds >= 2 ground-truth nucleus points,
  or holds both the pre- and the post-synaptic point of one ground-truth synapse;
- an edge is *correct* when both ends carry the same non-zero segment that is not merging
  (ERL) / not violating (bERL, nERL);
- runs are connected components of correct edges within a skeleton (default) or, with
  `pooled=True`, all correct edges of one segment within one skeleton (funlib.evaluate);
- ERL = sum_runs l_r^2 / L;  nERL = sum_s L_s r_s / sum_s L_s over skeletons with a nucleus
  node, r_s the length of the (bERL-correct) run holding that node.

All lengths are in nm; positions are (x, y, z) nm; segment ids are uint64.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .errors import IicatsError


# --------------------------------------------------------------------------------------------
# skeleton representation


@dataclass
class Skeleton:
  """One ground-truth skeleton.

  id: skeleton (neuron) id; vertices_nm: float64 (N, 3) node positions, (x, y, z) nm;
  edges: int64 (E, 2) node indices into vertices_nm (undirected); soma: int64 (K,) indices of
  the nucleus/soma nodes (SWC type 1), possibly empty; radii: optional float64 (N,) nm;
  name: free text (e.g. the SWC file name), used in messages.
  """
  id: int
  vertices_nm: np.ndarray
  edges: np.ndarray
  soma: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
  radii: np.ndarray | None = None
  name: str = ""

  def __post_init__(self):
    self.id = int(self.id)
    what = f"skeleton {self.id}" + (f" ({self.name})" if self.name else "")
    self.vertices_nm = np.asarray(self.vertices_nm, dtype=np.float64).reshape(-1, 3)
    self.edges = np.asarray(self.edges, dtype=np.int64).reshape(-1, 2)
    self.soma = np.asarray(self.soma, dtype=np.int64).reshape(-1)
    n = len(self.vertices_nm)
    if not np.all(np.isfinite(self.vertices_nm)):
      raise IicatsError(f"{what}: vertex positions must be finite numbers")
    for name, index in (("edges", self.edges), ("soma", self.soma)):
      if index.size and (index.min() < 0 or index.max() >= n):
        raise IicatsError(f"{what}: {name} refer to nodes outside 0..{n - 1}")
    if self.radii is not None:
      self.radii = np.asarray(self.radii, dtype=np.float64).reshape(-1)
      if len(self.radii) != n:
        raise IicatsError(f"{what}: {len(self.radii)} radii for {n} vertices")


def as_skeleton(obj) -> Skeleton:
  """A Skeleton from a Skeleton, or a dict with keys id, vertices_nm (or vertices), edges and
  optionally soma, radii, name."""
  if isinstance(obj, Skeleton):
    return obj
  if isinstance(obj, dict):
    vertices = obj.get("vertices_nm", obj.get("vertices"))
    return Skeleton(id=obj["id"], vertices_nm=vertices, edges=obj.get("edges", ()),
                    soma=obj.get("soma", ()), radii=obj.get("radii"), name=obj.get("name", ""))
  raise IicatsError(f"expected a Skeleton, got {type(obj).__name__}")


@dataclass
class SkeletonSet:
  """Many skeletons as flat arrays (the vectorised path). S skeletons, N nodes, E edges.

  ids: int64 (S,) skeleton ids; vertices_nm: float64 (N, 3) (x, y, z) nm;
  edges: int64 (E, 2) global node indices; node_skeleton: int64 (N,) skeleton index 0..S-1
  (non-decreasing); node_offsets: int64 (S+1,) first node of each skeleton;
  soma_node: int64 (S,) global index of each skeleton's nucleus node (the first one listed in
  Skeleton.soma), -1 when it has none; is_soma: bool (N,) every node marked as soma.
  """
  ids: np.ndarray
  vertices_nm: np.ndarray
  edges: np.ndarray
  node_skeleton: np.ndarray
  node_offsets: np.ndarray
  soma_node: np.ndarray
  is_soma: np.ndarray

  @property
  def n_skeletons(self) -> int:
    return len(self.ids)

  @property
  def n_nodes(self) -> int:
    return len(self.vertices_nm)


def crop_skeleton(skeleton: Skeleton, keep: np.ndarray) -> Skeleton | None:
  """The skeleton's nodes where keep (bool (N,)) holds, the edges between two of them and the
  soma nodes among them (indices renumbered); None when no node is kept. Ground truth of a
  whole volume cropped to the part a segmentation covers, as funlib.evaluate crops to its
  region of interest: an edge leaving the part is no error of the segmentation."""
  keep = np.asarray(keep, bool).reshape(-1)
  if not keep.any():
    return None
  index = np.full(len(keep), -1, np.int64)
  index[keep] = np.arange(int(keep.sum()))
  edges = skeleton.edges[keep[skeleton.edges].all(axis=1)] if len(skeleton.edges) else \
    skeleton.edges
  return Skeleton(id=skeleton.id, vertices_nm=skeleton.vertices_nm[keep], edges=index[edges],
                  soma=index[skeleton.soma[keep[skeleton.soma]]],
                  radii=None if skeleton.radii is None else skeleton.radii[keep],
                  name=skeleton.name)


def concatenate_skeletons(skeletons: Iterable) -> SkeletonSet:
  """Flatten skeletons (Skeleton or dicts, see as_skeleton) into one SkeletonSet, keeping
  their order; node i of skeleton s becomes global node node_offsets[s] + i.
  Raises IicatsError when two skeletons share an id."""
  if isinstance(skeletons, SkeletonSet):
    return skeletons
  skeletons = [as_skeleton(s) for s in skeletons]
  ids = np.array([s.id for s in skeletons], dtype=np.int64)
  unique, counts = np.unique(ids, return_counts=True)
  if np.any(counts > 1):
    raise IicatsError(f"skeleton id {int(unique[counts > 1][0])} is used by two skeletons")
  sizes = np.array([len(s.vertices_nm) for s in skeletons], dtype=np.int64)
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  n = int(offsets[-1])
  vertices = (np.concatenate([s.vertices_nm for s in skeletons]) if skeletons
              else np.zeros((0, 3)))
  edges = (np.concatenate([s.edges + o for s, o in zip(skeletons, offsets)]) if skeletons
           else np.zeros((0, 2), np.int64))
  node_skeleton = np.repeat(np.arange(len(skeletons), dtype=np.int64), sizes)
  soma_node = np.array([o + s.soma[0] if s.soma.size else -1
                        for s, o in zip(skeletons, offsets)], dtype=np.int64)
  is_soma = np.zeros(n, bool)
  if skeletons:
    is_soma[np.concatenate([s.soma + o for s, o in zip(skeletons, offsets)])] = True
  return SkeletonSet(ids=ids, vertices_nm=vertices.reshape(-1, 3).astype(np.float64),
                     edges=edges.reshape(-1, 2).astype(np.int64), node_skeleton=node_skeleton,
                     node_offsets=offsets, soma_node=soma_node, is_soma=is_soma)


def edge_lengths(vertices_nm: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Euclidean edge lengths: vertices float (N, 3) nm, edges int (E, 2) -> float64 (E,) nm."""
  if len(edges) == 0:
    return np.zeros(0)
  return np.linalg.norm(vertices_nm[edges[:, 0]] - vertices_nm[edges[:, 1]], axis=1)


# --------------------------------------------------------------------------------------------
# segment classification


def _as_segments(values, shape_tail=(), what="segment ids") -> np.ndarray:
  """uint64 array of segment ids with the trailing shape `shape_tail` (e.g. (2,) for
  synapses); None -> empty."""
  if values is None:
    return np.zeros((0,) + shape_tail, np.uint64)
  array = np.asarray(values)
  if array.size and array.dtype.kind == "i" and array.min() < 0:
    raise IicatsError(f"{what}: negative segment ids")
  return array.astype(np.uint64).reshape((-1,) + shape_tail)


def merging_segments(node_segments: np.ndarray, node_skeleton: np.ndarray):
  """Segments holding nodes of >= 2 skeletons.

  node_segments: uint64 (N,); node_skeleton: int (N,) skeleton index per node.
  Returns (ids uint64 (M,) sorted, first_node int64 (M,) a node of the segment on its second
  skeleton (a merge location), skeletons list of M int64 arrays of the skeleton indices).
  Segment 0 never merges."""
  segs = _as_segments(node_segments)
  if segs.size == 0:
    return np.zeros(0, np.uint64), np.zeros(0, np.int64), []
  node_skeleton = np.asarray(node_skeleton, dtype=np.int64)
  if np.all(node_skeleton[1:] >= node_skeleton[:-1]):  # concatenated order: a stable sort will do
    order = np.argsort(segs, kind="stable")
  else:
    order = np.lexsort((np.arange(len(segs)), node_skeleton, segs))
  s_sorted, k_sorted = segs[order], node_skeleton[order]
  new_pair = np.ones(len(order), bool)
  new_pair[1:] = (s_sorted[1:] != s_sorted[:-1]) | (k_sorted[1:] != k_sorted[:-1])
  pair_seg, pair_skel, pair_node = s_sorted[new_pair], k_sorted[new_pair], order[new_pair]
  seg_start = np.ones(len(pair_seg), bool)
  seg_start[1:] = pair_seg[1:] != pair_seg[:-1]
  seg_index = np.cumsum(seg_start) - 1
  n_skel = np.bincount(seg_index)
  merging = (n_skel >= 2) & (pair_seg[seg_start] != 0)
  ids = pair_seg[seg_start][merging]
  starts = np.flatnonzero(seg_start)[merging]
  first_node = pair_node[starts + 1]
  skeletons = [pair_skel[a:a + c] for a, c in zip(starts.tolist(), n_skel[merging].tolist())]
  return ids, first_node.astype(np.int64), skeletons


def nucleus_violations(nucleus_segments):
  """Segments holding >= 2 ground-truth nucleus points (points in segment 0 count for nothing).

  nucleus_segments: uint64 (M,) segment id at each nucleus point.
  Returns (ids uint64 (K,) sorted, first_point int64 (K,) a nucleus point in each,
  counts int64 (K,) number of nucleus points in each)."""
  segs = _as_segments(nucleus_segments, what="nucleus segment ids")
  ids, first, counts = np.unique(segs, return_index=True, return_counts=True)
  keep = (ids != 0) & (counts >= 2)
  return ids[keep], first[keep].astype(np.int64), counts[keep].astype(np.int64)


def synapse_violations(synapse_segments):
  """Segments holding both the pre- and the post-synaptic point of one ground-truth synapse.

  synapse_segments: uint64 (P, 2) segment ids at (pre, post).
  Returns (ids uint64 (K,) sorted, first_synapse int64 (K,), counts int64 (K,) number of such
  synapses per segment)."""
  segs = _as_segments(synapse_segments, (2,), what="synapse segment ids")
  same = np.flatnonzero((segs[:, 0] == segs[:, 1]) & (segs[:, 0] != 0))
  ids, first, counts = np.unique(segs[same, 0], return_index=True, return_counts=True)
  return ids, same[first].astype(np.int64), counts.astype(np.int64)


# --------------------------------------------------------------------------------------------
# runs


def _runs_connected(n_nodes, edges, correct, lengths, node_skeleton):
  """Runs as connected components of correct edges.

  -> (node_run int64 (N,) run of each node, run_length float64 (R,) nm, run_skeleton int64
  (R,), run_has_edge bool (R,): the run holds at least one correct edge; the others are
  single nodes)."""
  a, b = edges[correct, 0], edges[correct, 1]
  graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n_nodes, n_nodes)).tocsr()
  n_runs, node_run = connected_components(graph, directed=False)
  run_length = np.bincount(node_run[a], weights=lengths[correct], minlength=n_runs)
  run_has_edge = np.bincount(node_run[a], minlength=n_runs) > 0
  run_skeleton = np.zeros(n_runs, np.int64)
  run_skeleton[node_run] = node_skeleton
  return node_run.astype(np.int64), run_length, run_skeleton, run_has_edge


def _pool_runs(node_run, run_length, run_skeleton, run_has_edge, seg_index, n_segments):
  """Pool the connected runs of one segment within one skeleton (funlib.evaluate's grouping).

  seg_index: int64 (N,) dense segment index per node. -> (pooled_length float64 (P,),
  pooled_skeleton int64 (P,), run_pool int64 (R,) pooled run of each run, -1 for runs
  without edges)."""
  run_segment = np.zeros(len(run_length), np.int64)
  run_segment[node_run] = seg_index
  runs = np.flatnonzero(run_has_edge)
  keys = run_skeleton[runs] * max(n_segments, 1) + run_segment[runs]
  pool_keys, inverse = np.unique(keys, return_inverse=True)
  pooled = np.bincount(inverse, weights=run_length[runs], minlength=len(pool_keys))
  run_pool = np.full(len(run_length), -1, np.int64)
  run_pool[runs] = inverse
  return pooled, pool_keys // max(n_segments, 1), run_pool


def _runs(flat, seg_index, n_segments, lengths, correct, pooled):
  """Runs under one correctness.

  -> (run_length float64 (R,), run_skeleton int64 (R,), node_run int64 (N,) connected run of
  each node, soma_run float64 (S,) length of the run holding each skeleton's nucleus node,
  0 when it has none or the node has no correct edge)."""
  node_run, run_length, run_skeleton, run_has_edge = _runs_connected(
    flat.n_nodes, flat.edges, correct, lengths, flat.node_skeleton)
  has = flat.soma_node >= 0
  soma_runs = node_run[flat.soma_node[has]]
  soma_len = np.zeros(flat.n_skeletons)
  if pooled:
    run_length, run_skeleton, run_pool = _pool_runs(
      node_run, run_length, run_skeleton, run_has_edge, seg_index, n_segments)
    pools = run_pool[soma_runs]
    soma_len[np.flatnonzero(has)[pools >= 0]] = run_length[pools[pools >= 0]]
  else:
    soma_len[has] = run_length[soma_runs]
  return run_length, run_skeleton, node_run, soma_len


def _split_by(values, groups, n_groups):
  """Lists of values per group: values (R,), groups int (R,) in 0..n_groups-1."""
  order = np.argsort(groups, kind="stable")
  bounds = np.searchsorted(groups[order], np.arange(n_groups + 1))
  values = values[order]
  return [values[bounds[i]:bounds[i + 1]] for i in range(n_groups)]


def _ratio(num, den):
  return float(num / den) if den > 0 else None


def run_length_metrics(skeletons, node_segments, nucleus_segments=None, synapse_segments=None,
                       pooled: bool = False, details: bool = True) -> dict:
  """ERL, bERL and nERL of a segmentation on ground-truth skeletons (DESIGN.md "Metrics").

  skeletons: list of Skeleton (or a SkeletonSet); node_segments: uint64 (N,) the predicted
  segment at each node, in the order of concatenate_skeletons (0 = background or outside);
  nucleus_segments: uint64 (M,) the segment at each ground-truth nucleus point (all cells, not
  only skeletonised ones); synapse_segments: uint64 (P, 2) the segments at (pre, post) of each
  ground-truth synapse; pooled: runs pool every correct edge of a segment within a skeleton
  (funlib.evaluate) instead of connected components.

  Returns a JSON-able dict: erl, berl, nerl (None when undefined: no edge length / no skeleton
  with a nucleus node), total_length L (nm), nerl_length (sum of L_s over skeletons with a
  nucleus node), counts, merging / nucleus_violating / synapse_violating / violating segment
  ids, n_merged_synapses (ground-truth synapses whose two partners lie in one segment), and
  (details=True) `skeletons`: one dict per skeleton (see _skeleton_details) and
  `violations`: dicts {segment, kind ('merge', 'nuclei', 'synapse'), node | nucleus |
  synapse index, ...} for locating the errors.

  Edge cases: a nucleus node whose edges are all incorrect has r_s = 0; with several nucleus
  nodes the first listed counts; leaves are nodes of degree 1 that are not soma nodes, and
  leaf reachability always uses connected bERL-correct edges (also when pooled); a skeleton of
  zero length has erl/nucleus_fraction None. Soma nodes of skeletons are not nucleus
  instances for bERL: pass the nuclei (all of them) as nucleus_segments.
  """
  flat = concatenate_skeletons(skeletons)
  segs = _as_segments(node_segments, what="node segment ids")
  if len(segs) != flat.n_nodes:
    raise IicatsError(f"{len(segs)} node segment ids for {flat.n_nodes} skeleton nodes")
  seg_u, seg_index = np.unique(segs, return_inverse=True)
  seg_index = seg_index.astype(np.int64).reshape(-1)
  # merging: the segment's nodes lie on >= 2 skeletons (min and max skeleton index differ)
  low = np.full(len(seg_u), flat.n_skeletons, np.int64)
  high = np.full(len(seg_u), -1, np.int64)
  np.minimum.at(low, seg_index, flat.node_skeleton)
  np.maximum.at(high, seg_index, flat.node_skeleton)
  merging = (low != high) & (seg_u != 0)
  merge_ids = seg_u[merging]
  nuc_ids, nuc_first, nuc_counts = nucleus_violations(nucleus_segments)
  syn_ids, syn_first, syn_counts = synapse_violations(synapse_segments)
  violating_ids = np.union1d(np.union1d(merge_ids, nuc_ids), syn_ids).astype(np.uint64)
  violating = np.isin(seg_u, violating_ids)

  lengths = edge_lengths(flat.vertices_nm, flat.edges)
  a_index, b_index = seg_index[flat.edges[:, 0]], seg_index[flat.edges[:, 1]]
  same = (a_index == b_index) & (seg_u[a_index] != 0)
  correct_erl = same & ~merging[a_index]
  correct_berl = same & ~violating[a_index]
  edge_skel = flat.node_skeleton[flat.edges[:, 0]]
  skel_length = np.bincount(edge_skel, weights=lengths, minlength=flat.n_skeletons)
  total = float(skel_length.sum())

  erl_runs, erl_run_skel, _, _ = _runs(flat, seg_index, len(seg_u), lengths, correct_erl,
                                       pooled)
  berl_runs, berl_run_skel, berl_node_run, soma_run = _runs(
    flat, seg_index, len(seg_u), lengths, correct_berl, pooled)
  has_soma = flat.soma_node >= 0
  nerl_length = float(skel_length[has_soma].sum())
  result = {
    "erl": _ratio(np.sum(erl_runs ** 2), total),
    "berl": _ratio(np.sum(berl_runs ** 2), total),
    "nerl": _ratio(np.sum(skel_length[has_soma] * soma_run[has_soma]), nerl_length),
    "total_length": total,
    "nerl_length": nerl_length,
    "pooled": bool(pooled),
    "n_skeletons": int(flat.n_skeletons),
    "n_nucleus_skeletons": int(has_soma.sum()),
    "n_nodes": int(flat.n_nodes),
    "n_edges": int(len(flat.edges)),
    "n_background_nodes": int(np.count_nonzero(segs == 0)),
    "merging_segments": merge_ids.tolist(),
    "nucleus_violating_segments": nuc_ids.tolist(),
    "synapse_violating_segments": syn_ids.tolist(),
    "n_merged_synapses": int(syn_counts.sum()),
    "violating_segments": violating_ids.tolist(),
  }
  if not details:
    return result

  # leaf reachability from the nucleus node through connected bERL-correct edges
  degree = np.bincount(flat.edges.ravel(), minlength=flat.n_nodes)
  leaf = (degree == 1) & ~flat.is_soma
  soma_of_node = flat.soma_node[flat.node_skeleton]
  reached = leaf & (soma_of_node >= 0)
  reached[reached] = berl_node_run[reached] == berl_node_run[soma_of_node[reached]]
  n_leaves = np.bincount(flat.node_skeleton[leaf], minlength=flat.n_skeletons)
  n_reached = np.bincount(flat.node_skeleton[reached], minlength=flat.n_skeletons)
  a_seg, b_seg = seg_u[a_index], seg_u[b_index]
  split = (a_seg != b_seg) & (a_seg != 0) & (b_seg != 0)
  n_split = np.bincount(edge_skel[split], minlength=flat.n_skeletons)
  omitted = (a_seg == 0) | (b_seg == 0)
  omitted_length = np.bincount(edge_skel[omitted], weights=lengths[omitted],
                               minlength=flat.n_skeletons)
  per = {
    "length": skel_length, "soma_run": soma_run, "n_leaves": n_leaves, "n_reached": n_reached,
    "n_split": n_split, "omitted_length": omitted_length,
    "runs": _split_by(erl_runs[erl_runs > 0], erl_run_skel[erl_runs > 0], flat.n_skeletons),
    "berl_runs": _split_by(berl_runs[berl_runs > 0], berl_run_skel[berl_runs > 0],
                           flat.n_skeletons),
    "violating": _violating_per_skeleton(seg_u, seg_index, flat.node_skeleton, violating,
                                         flat.n_skeletons),
  }
  # merge locations, from the (few) nodes in merging segments
  in_merge = np.flatnonzero(merging[seg_index])
  merge_ids, merge_node, merge_skels = merging_segments(segs[in_merge],
                                                        flat.node_skeleton[in_merge])
  merge_node = in_merge[merge_node]
  per["merges"] = _segments_per_skeleton(merge_ids, merge_skels, flat.n_skeletons)
  result["skeletons"] = [_skeleton_details(flat, s, per) for s in range(flat.n_skeletons)]
  result["violations"] = _violation_records(
    flat, (merge_ids, merge_node, merge_skels), (nuc_ids, nuc_first, nuc_counts),
    (syn_ids, syn_first, syn_counts))
  return result


def _segments_per_skeleton(seg_ids, skeleton_lists, n_skeletons):
  """For each skeleton index, the sorted list of segments (from seg_ids) that touch it."""
  out = [[] for _ in range(n_skeletons)]
  for seg, skels in zip(seg_ids.tolist(), skeleton_lists):
    for s in skels.tolist():
      out[s].append(seg)
  return out


def _violating_per_skeleton(seg_u, seg_index, node_skeleton, violating, n_skeletons):
  """For each skeleton index, the sorted violating segments its nodes lie in.

  seg_u: uint64 (U,) sorted segment ids; seg_index: int64 (N,) index into seg_u per node;
  violating: bool (U,)."""
  hit = violating[seg_index]
  n_seg = max(len(seg_u), 1)
  keys = np.unique(node_skeleton[hit] * n_seg + seg_index[hit])
  groups = _split_by(seg_u[keys % n_seg], keys // n_seg, n_skeletons)
  return [g.tolist() for g in groups]


def _skeleton_details(flat, s, per) -> dict:
  """Per-skeleton record: id, length L_s (nm), nodes, erl/berl of this skeleton alone
  (sum of its runs^2 / L_s), run lengths (ERL and bERL correctness, longest first, nm),
  nucleus node (index within the skeleton) and r_s, nucleus_fraction r_s / L_s, leaves,
  leaves reached from the nucleus and their fraction, split edges, omitted length (edges with
  an end in segment 0), merging and violating segments touching it."""
  length = float(per["length"][s])
  runs = np.sort(per["runs"][s])[::-1]
  berl_runs = np.sort(per["berl_runs"][s])[::-1]
  soma = int(flat.soma_node[s])
  record = {
    "id": int(flat.ids[s]),
    "length": length,
    "n_nodes": int(flat.node_offsets[s + 1] - flat.node_offsets[s]),
    "erl": _ratio(np.sum(runs ** 2), length),
    "berl": _ratio(np.sum(berl_runs ** 2), length),
    "runs": runs.tolist(),
    "berl_runs": berl_runs.tolist(),
    "n_splits": int(per["n_split"][s]),
    "omitted_length": float(per["omitted_length"][s]),
    "merging_segments": sorted(per["merges"][s]),
    "violating_segments": per["violating"][s],
    "has_nucleus": soma >= 0,
    "nucleus_node": None, "nucleus_run": None, "nucleus_fraction": None,
    "n_leaves": int(per["n_leaves"][s]), "n_leaves_reached": None, "leaf_fraction": None,
  }
  if soma >= 0:
    run = float(per["soma_run"][s])
    leaves = int(per["n_leaves"][s])
    record.update({
      "nucleus_node": soma - int(flat.node_offsets[s]),
      "nucleus_run": run,
      "nucleus_fraction": _ratio(run, length),
      "n_leaves_reached": int(per["n_reached"][s]),
      "leaf_fraction": _ratio(per["n_reached"][s], leaves),
    })
  return record


def _violation_records(flat, merges, nuclei, synapses) -> list[dict]:
  """One dict per (segment, kind): merges name a node and the skeleton ids; nucleus
  violations a nucleus point index and the count; synapse violations a synapse index and
  the count."""
  records = []
  for seg, node, skels in zip(merges[0].tolist(), merges[1].tolist(), merges[2]):
    records.append({"segment": seg, "kind": "merge", "node": node,
                    "skeletons": flat.ids[skels].tolist()})
  for seg, point, count in zip(*(x.tolist() for x in nuclei)):
    records.append({"segment": seg, "kind": "nuclei", "nucleus": point, "count": count})
  for seg, syn, count in zip(*(x.tolist() for x in synapses)):
    records.append({"segment": seg, "kind": "synapse", "synapse": syn, "count": count})
  return records


def erl(skeletons, node_segments, pooled: bool = False) -> float | None:
  """Expected run length (nm); see run_length_metrics."""
  return run_length_metrics(skeletons, node_segments, pooled=pooled, details=False)["erl"]


def berl(skeletons, node_segments, nucleus_segments=None, synapse_segments=None,
         pooled: bool = False) -> float | None:
  """ERL with biological constraints (nm); see run_length_metrics."""
  return run_length_metrics(skeletons, node_segments, nucleus_segments, synapse_segments,
                            pooled=pooled, details=False)["berl"]


def nerl(skeletons, node_segments, nucleus_segments=None, synapse_segments=None,
         pooled: bool = False) -> float | None:
  """Nucleus-to-spines expected run length (nm); see run_length_metrics."""
  return run_length_metrics(skeletons, node_segments, nucleus_segments, synapse_segments,
                            pooled=pooled, details=False)["nerl"]


# --------------------------------------------------------------------------------------------
# dense label metrics


def _check_same_shape(a, b, names):
  if np.shape(a) != np.shape(b):
    raise IicatsError(f"{names[0]} {np.shape(a)} and {names[1]} {np.shape(b)} differ in shape")


def _dense_ids(values: np.ndarray) -> tuple[np.ndarray, int]:
  """Relabel to 0..K-1 (keeping the order of first appearance irrelevant): -> (int64, K)."""
  import fastremap
  values = np.ascontiguousarray(values)
  if values.dtype == bool:
    values = values.view(np.uint8)
  if values.dtype.kind == "i":
    values = values.astype(np.int64)
  relabelled, mapping = fastremap.renumber(values, start=0, preserve_zero=False, in_place=False)
  return relabelled.astype(np.int64), len(mapping)


def contingency(a: np.ndarray, b: np.ndarray):
  """Sparse contingency table of two label arrays of one shape.

  -> (a_ids, b_ids, counts): the original labels of each non-empty (a, b) cell and its voxel
  count, int64 (K,). Labels are compared as given (0 is an ordinary label here)."""
  import fastremap
  a, b = np.ravel(a), np.ravel(b)
  if a.size == 0:
    empty = np.zeros(0, np.int64)
    return a[:0], b[:0], empty
  ra, na = _dense_ids(a)
  rb, nb = _dense_ids(b)
  keys = ra * nb + rb
  if na * nb <= max(4 * a.size, 1 << 20):
    counts = np.bincount(keys, minlength=na * nb)
    cells = np.flatnonzero(counts)
    counts = counts[cells]
  else:
    cells, counts = fastremap.unique(keys, return_counts=True)
  ia, ib = cells // nb, cells % nb
  # map dense ids back to one original voxel label each
  first_a = np.zeros(na, np.int64)
  first_a[ra[::-1]] = np.arange(a.size)[::-1]
  first_b = np.zeros(nb, np.int64)
  first_b[rb[::-1]] = np.arange(b.size)[::-1]
  return a[first_a[ia]], b[first_b[ib]], counts.astype(np.int64)


def _gt_contingency(seg, gt):
  """Contingency of seg x gt over voxels with gt != 0 -> (seg_ids, gt_ids, counts)."""
  _check_same_shape(seg, gt, ("segmentation", "ground truth"))
  seg, gt = np.ravel(seg), np.ravel(gt)
  keep = gt != 0
  return contingency(seg[keep], gt[keep])


def _marginal(ids, counts):
  """Sum of counts per id -> (per-cell marginal float64 (K,))."""
  _, inverse = np.unique(ids, return_inverse=True)
  return np.bincount(inverse, weights=counts)[inverse]


def voi(seg: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
  """Variation of information (bits) -> (voi_split, voi_merge), ignoring voxels with gt == 0.

  seg, gt: integer label arrays of one shape (any axis order). voi_split = H(seg | gt), the
  false splits; voi_merge = H(gt | seg), the false merges (CREMI / funlib.evaluate
  convention). Predicted label 0 is an ordinary segment here. 0 voxels -> (0.0, 0.0)."""
  seg_ids, gt_ids, counts = _gt_contingency(seg, gt)
  n = counts.sum()
  if n == 0:
    return 0.0, 0.0
  p = counts / n
  seg_marginal = _marginal(seg_ids, counts) / n
  gt_marginal = _marginal(gt_ids, counts) / n
  split = float(-np.sum(p * np.log2(p / gt_marginal)))
  merge = float(-np.sum(p * np.log2(p / seg_marginal)))
  return max(0.0, split), max(0.0, merge)  # never -0.0 or a rounding -1e-17


def boundary_tolerance_steps(resolution_nm, tolerance_nm: float) -> list[int]:
  """Voxels per axis (x, y, z) that a boundary tolerance of tolerance_nm reaches:
  floor(tolerance_nm / resolution). IicatsError where it reaches no voxel on any axis."""
  steps = [int(np.floor(tolerance_nm / float(r) + 1e-9)) for r in resolution_nm]
  if tolerance_nm < 0 or not any(steps):
    raise IicatsError(f"boundary tolerance {tolerance_nm} nm: must reach at least one voxel "
                      f"(voxel size {list(resolution_nm)} nm)")
  return steps


def boundary_tolerance_mask(gt: np.ndarray, resolution_nm, tolerance_nm: float) -> np.ndarray:
  """bool (X, Y, Z): the voxels that a boundary tolerance keeps in the dense scores.

  A voxel is left out when a voxel of another ground-truth label lies within tolerance_nm of
  it along x, y or z (floor(tolerance_nm / resolution) voxels per axis, so 10 nm leaves out
  one voxel on each side of every interface at 10 nm and none across 40 nm sections). CREMI
  scores the same way (cremi_python's border mask): ground truth drawn up to the membrane,
  as FlyEM's is, puts each membrane voxel on one side or the other, and which side is not
  what a segmentation is judged on. gt: integer (X, Y, Z); resolution_nm: (x, y, z)."""
  keep = np.ones(gt.shape, dtype=bool)
  for axis, n in enumerate(boundary_tolerance_steps(resolution_nm, tolerance_nm)):
    for step in range(1, min(n, gt.shape[axis] - 1) + 1):
      high = [slice(None)] * 3
      low = [slice(None)] * 3
      high[axis] = slice(step, None)
      low[axis] = slice(None, -step)
      differs = gt[tuple(high)] != gt[tuple(low)]
      keep[tuple(high)] &= ~differs
      keep[tuple(low)] &= ~differs
  return keep


def adapted_rand_error(seg: np.ndarray, gt: np.ndarray, all_stats: bool = False):
  """Adapted Rand error as in CREMI / SNEMI3D: 1 - F-score of Rand precision and recall.

  seg, gt: integer label arrays of one shape. Voxels with gt == 0 are ignored; predicted
  label 0 means "unlabelled" and each such voxel counts as its own singleton segment. Exactly
  the SNEMI3D/CREMI formula, including its normalisation of the singleton term by the total
  voxel count n (gt == 0 voxels included):
    p_ij = |seg i & gt j| (gt j != 0), a_j = sum_i p_ij, b_i = sum_j p_ij (i != 0),
    c = sum_j p_0j;  sumA = sum_j a_j^2;  sumB = sum_{i!=0} b_i^2 + c/n;
    sumAB = sum_{i!=0, j} p_ij^2 + c/n;  precision = sumAB/sumB, recall = sumAB/sumA.
  Returns the error (float in [0, 1]); all_stats=True -> (error, precision, recall).
  No ground-truth voxels -> 0.0 (precision = recall = 1)."""
  seg_ids, gt_ids, counts = _gt_contingency(seg, gt)
  n = float(np.size(gt))
  if counts.sum() == 0:
    return (0.0, 1.0, 1.0) if all_stats else 0.0
  counts = counts.astype(np.float64)
  labelled = seg_ids != 0
  _, gt_inverse = np.unique(gt_ids, return_inverse=True)
  sum_a = np.sum(np.bincount(gt_inverse, weights=counts) ** 2)
  _, seg_inverse = np.unique(seg_ids[labelled], return_inverse=True)
  singles = counts[~labelled].sum() / n
  sum_b = np.sum(np.bincount(seg_inverse, weights=counts[labelled]) ** 2) + singles
  sum_ab = np.sum(counts[labelled] ** 2) + singles
  precision = sum_ab / sum_b
  recall = sum_ab / sum_a
  f_score = 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  error = float(1.0 - f_score)
  return (error, float(precision), float(recall)) if all_stats else error


# --------------------------------------------------------------------------------------------
# organelles


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
  """Voxel Dice of two boolean arrays of one shape (1.0 when both are empty)."""
  denominator = int(np.count_nonzero(prediction)) + int(np.count_nonzero(truth))
  return float(2 * np.count_nonzero(prediction & truth) / denominator) if denominator else 1.0


def organelle_instance_scores(pred_instances: np.ndarray, gt_instances: np.ndarray,
                              iou_threshold: float = 0.5) -> dict:
  """Instance detection scores for organelles (nuclei, mitochondria, synapses).

  pred_instances, gt_instances: integer instance labels of one shape (0 = background).
  A predicted and a ground-truth instance match when their voxel IoU >= iou_threshold;
  matching is one-to-one, greedy by decreasing IoU (ties by smaller ids), which for a
  threshold > 0.5 is the unique matching. Returns a dict: tp, fp, fn, n_pred, n_gt, precision
  (tp / n_pred, 1.0 when nothing is predicted), recall (tp / n_gt, 1.0 when there is no
  ground truth), f1, mean_iou of the matches (None when none)."""
  _check_same_shape(pred_instances, gt_instances, ("predicted instances", "ground truth"))
  pred_ids, gt_ids, inter = contingency(pred_instances, gt_instances)
  pred_u, pred_sizes = np.unique(np.ravel(pred_instances), return_counts=True)
  gt_u, gt_sizes = np.unique(np.ravel(gt_instances), return_counts=True)
  n_pred = int(np.count_nonzero(pred_u))
  n_gt = int(np.count_nonzero(gt_u))
  both = (pred_ids != 0) & (gt_ids != 0)
  pred_ids, gt_ids, inter = pred_ids[both], gt_ids[both], inter[both]
  area_p = pred_sizes[np.searchsorted(pred_u, pred_ids)]
  area_g = gt_sizes[np.searchsorted(gt_u, gt_ids)]
  iou = inter / (area_p + area_g - inter)
  cand = np.flatnonzero(iou >= iou_threshold)
  cand = cand[np.lexsort((gt_ids[cand], pred_ids[cand], -iou[cand]))]
  used_p, used_g, matched = set(), set(), []
  for k in cand.tolist():  # candidates are (nearly) one-to-one already: a short loop
    p, g = int(pred_ids[k]), int(gt_ids[k])
    if p not in used_p and g not in used_g:
      used_p.add(p)
      used_g.add(g)
      matched.append(float(iou[k]))
  tp = len(matched)
  precision = tp / n_pred if n_pred else 1.0
  recall = tp / n_gt if n_gt else 1.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  return {"tp": tp, "fp": n_pred - tp, "fn": n_gt - tp, "n_pred": n_pred, "n_gt": n_gt,
          "precision": precision, "recall": recall, "f1": f1,
          "mean_iou": float(np.mean(matched)) if matched else None,
          "iou_threshold": float(iou_threshold)}


def voxel_scores(pred_mask: np.ndarray, gt_mask: np.ndarray) -> dict:
  """Voxel overlap of two masks (non-zero = foreground), one shape.
  -> dict dice, iou, precision, recall (each 1.0 when both masks are empty)."""
  _check_same_shape(pred_mask, gt_mask, ("predicted mask", "ground-truth mask"))
  p = np.asarray(pred_mask) != 0
  g = np.asarray(gt_mask) != 0
  inter = int(np.count_nonzero(p & g))
  n_p, n_g = int(np.count_nonzero(p)), int(np.count_nonzero(g))
  union = n_p + n_g - inter
  return {"dice": 2 * inter / (n_p + n_g) if n_p + n_g else 1.0,
          "iou": inter / union if union else 1.0,
          "precision": inter / n_p if n_p else 1.0,
          "recall": inter / n_g if n_g else 1.0}


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """Average precision of binary labels ranked by scores (both flat arrays); NaN without
  positives."""
  order = np.argsort(-scores, kind="stable")
  hits = labels[order].astype(bool)
  if hits.sum() == 0:
    return float("nan")
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float((precision * hits).sum() / hits.sum())


def affinity_average_precision(predicted: np.ndarray, target: np.ndarray,
                               mask: np.ndarray) -> dict:
  """Predicted affinities against affinities derived from ground truth, inside the mask.

  predicted, target, mask: float (..., 3, X, Y, Z) alike (target from
  `train.affinities_from_labels`, 1 = same neuron). Returns {"affinity_ap": AP of
  connections ranked by affinity, "boundary_ap": AP of boundaries (target 0) ranked by
  1 - affinity}; the second is the harder, since boundaries are the rare class.
  """
  inside = mask > 0
  scores, truth = predicted[inside], target[inside] > 0.5
  return {"affinity_ap": average_precision(scores, truth),
          "boundary_ap": average_precision(1 - scores, ~truth)}
