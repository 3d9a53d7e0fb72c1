"""Region adjacency graph (RAG) of fragments with affinity statistics and organelle evidence.

Each block contributes the voxel pairs (v - e_axis, v) whose second voxel v lies in the block, so
every pair of the dataset is counted by exactly one block and the per-block tables just add up.
Arrays are (x, y, z) / (c, x, y, z); fragment ids are uint64.
"""
from __future__ import annotations

import fastremap
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

EDGE_FIELDS = ("u", "v", "count", "aff_sum", "aff_min", "aff_hist", "mito_pairs",
               "nucleus_pairs", "synapse_pairs", "synapse_aff_sum", "stitch")
# edge fields that add up when boundaries join (the rest: aff_min takes the minimum, aff_hist
# adds per bin)
SUMMED_EDGE_FIELDS = ("count", "aff_sum", "mito_pairs", "nucleus_pairs", "synapse_pairs",
                      "synapse_aff_sum", "stitch")
# affinity histogram per edge (uint32 counts over [0, 1]): quantiles of merged regions are read
# from summed histograms, as waterz does
HIST_BINS = 32
FRAGMENT_FIELDS = ("id", "size", "nucleus_voxels", "nucleus_sum_x", "nucleus_sum_y",
                   "nucleus_sum_z")
# what each fragment looks like, for a learned edge scorer (edge_scorer.edge_features): sums
# over its voxels of the image (uint8 values), their squares, the nucleus, mitochondria and
# synapse probabilities and 1 - the lowest of the voxel's three affinities; present when
# block_rag was given the image
APPEARANCE_FIELDS = ("intensity_sum", "intensity_sq_sum", "nucleus_prob_sum", "mito_prob_sum",
                     "synapse_prob_sum", "boundary_sum")
# how sure the network is inside each fragment: the sum and count of the affinities between
# its own voxels (agglomerate.AgglomerationParams.interior_bonus); when fragments join (stitch,
# relabel), the boundary between them adds to the interior. Absent in RAGs written before them
INTERIOR_FIELDS = ("interior_aff_sum", "interior_pairs")


# float32 value of each uint8 probability: value / 255, as a float32 layer would hold it
_UINT8_PROBABILITY = np.arange(256, dtype=np.float32) / 255.0


def _probabilities(values: np.ndarray) -> np.ndarray:
  """float32 probabilities of uint8 values (value / 255) or of float32 ones (as they are)."""
  return _UINT8_PROBABILITY[values] if values.dtype == np.uint8 else values


def _above(values: np.ndarray, cut) -> np.ndarray:
  """bool: probability > cut, for uint8 (value / 255) or float32 values; uint8 through a
  256-entry table, so no float32 copy of a whole block is made."""
  if values.dtype == np.uint8:
    return (_UINT8_PROBABILITY > cut)[values]
  return values > cut


def block_rag(supervoxels: np.ndarray, affinities: np.ndarray, organelles: np.ndarray | None,
              context, block_origin=(0, 0, 0), organelle_threshold=0.5,
              face_agreement: dict | None = None, histogram: bool = False,
              image: np.ndarray | None = None) -> dict:
  """Edges and fragment statistics of one block.

  supervoxels: uint64 (X+cx, Y+cy, Z+cz) — the block plus `context` = (cx, cy, cz) voxels
    (0 or 1 each) before it on each axis, where a neighbouring block exists.
  affinities: float32 in [0,1] (3, X, Y, Z) for the block only, or uint8 standing for
    value / 255 (a uint8 layer as read: a quarter of the memory, the same result).
  organelles: float32 in [0,1] or uint8 (3, X+cx, Y+cy, Z+cz) nucleus, mitochondria, synapse,
    or None.
  block_origin: global voxel coordinate (x, y, z) of the block's first voxel.
  face_agreement: {axis (0, 1, 2): bool array over the block's low face on that axis} — True
    where the watersheds of both blocks beside the face put the two straddling voxels into one
    fragment (see watershed.face_agreement). An edge across that face gets `stitch` = 1 when
    its two fragments are each other's partner with the most agreeing pairs.
  organelle_threshold: probability above which a voxel counts as organelle: one value, or
    (nucleus, mitochondria, synapse) cuts (a checkpoint's calibrated operating point).
  histogram: also store `aff_hist`, uint32 (E, HIST_BINS) affinity counts per edge (for
    quantile agglomeration; HIST_BINS × 4 bytes more per edge).
  image: uint8 (X, Y, Z) EM of the block only, or None; given (with organelles), each
    fragment also gets APPEARANCE_FIELDS (48 bytes more per fragment).
  Returns a dict of flat arrays: edge fields EDGE_FIELDS (u < v) and fragment fields
  prefixed 'frag_' (FRAGMENT_FIELDS, INTERIOR_FIELDS); fragment stats cover the block's own
  voxels only.
  """
  context = tuple(int(c) for c in context)
  cuts = np.broadcast_to(np.asarray(organelle_threshold, np.float32), (3,))
  inner = tuple(slice(c, None) for c in context)
  compact, mapping = fastremap.renumber(supervoxels, preserve_zero=True)
  compact = compact.astype(np.int64, copy=False)
  ids = np.zeros(max(mapping.values()) + 1, dtype=np.uint64)
  for orig, new in mapping.items():
    ids[new] = orig
  n = len(ids)
  us, vs, affs, mitos, nucs, syns = [], [], [], [], [], []
  interior_sum = np.zeros(n)
  interior_pairs = np.zeros(n)
  for axis in range(3):
    here = list(inner)
    there = list(inner)
    aff_sl = [slice(None)] * 3
    if context[axis]:
      there[axis] = slice(0, -1)
    else:
      here[axis] = slice(1, None)
      there[axis] = slice(0, -1)
      aff_sl[axis] = slice(1, None)
    a = compact[tuple(here)]
    b = compact[tuple(there)]
    sel = (a != b) & (a != 0) & (b != 0)
    us.append(a[sel])
    vs.append(b[sel])
    axis_affs = affinities[axis][tuple(aff_sl)]
    affs.append(_probabilities(axis_affs[sel]))
    same = (a == b) & (a != 0)
    inside_fragment = a[same]
    interior_sum += np.bincount(inside_fragment, weights=_probabilities(axis_affs[same]),
                                minlength=n)
    interior_pairs += np.bincount(inside_fragment, minlength=n)
    del same, inside_fragment
    if organelles is not None:
      inside = [_above(organelles[c][tuple(here)][sel], cuts[c]) for c in range(3)]
      beside = [_above(organelles[c][tuple(there)][sel], cuts[c]) for c in range(3)]
      nucs.append(inside[0] & beside[0])
      mitos.append(inside[1] & beside[1])
      syns.append(inside[2] | beside[2])
  # one entry per voxel pair across a fragment boundary, several per boundary voxel: these
  # arrays, not the block, set the task's peak, so each goes as soon as it is used
  u, v = np.concatenate(us), np.concatenate(vs)
  del us, vs
  key = np.minimum(u, v) * n + np.maximum(u, v)
  del u, v
  keys, inverse, count = np.unique(key, return_inverse=True, return_counts=True)
  del key
  aff = np.concatenate(affs).astype(np.float64)
  del affs
  first, second = ids[keys // n], ids[keys % n]
  out = {
    "u": np.minimum(first, second), "v": np.maximum(first, second),
    "count": count.astype(np.int64),
    "aff_sum": np.bincount(inverse, weights=aff, minlength=len(keys)),
    "aff_min": np.full(len(keys), np.inf),
  }
  np.minimum.at(out["aff_min"], inverse, aff)
  if histogram:
    bins = np.minimum((aff * HIST_BINS).astype(np.int64), HIST_BINS - 1)
    out["aff_hist"] = np.bincount(inverse * HIST_BINS + bins, minlength=len(keys) * HIST_BINS
                                  ).reshape(len(keys), HIST_BINS).astype(np.uint32)
  stitched = _stitched_keys(compact, context, face_agreement or {}, n)
  out["stitch"] = np.isin(keys, stitched).astype(np.int64)
  if organelles is not None:
    synapse = np.concatenate(syns)
    for name, pairs in (("nucleus_pairs", np.concatenate(nucs)),
                        ("mito_pairs", np.concatenate(mitos)), ("synapse_pairs", synapse)):
      out[name] = np.bincount(inverse, weights=pairs, minlength=len(keys)).astype(np.int64)
    out["synapse_aff_sum"] = np.bincount(inverse, weights=aff * synapse, minlength=len(keys))
  else:
    for name in ("nucleus_pairs", "mito_pairs", "synapse_pairs"):
      out[name] = np.zeros(len(keys), dtype=np.int64)
    out["synapse_aff_sum"] = np.zeros(len(keys))

  own = compact[inner].ravel()
  size = np.bincount(own, minlength=n)
  out["frag_id"] = ids[size > 0]
  out["frag_size"] = size[size > 0].astype(np.int64)
  if organelles is not None:
    # the nuclear voxels' coordinates only: every voxel's (24 bytes each) set the rag task's
    # peak memory
    nuclear = np.flatnonzero(_above(organelles[0][inner], cuts[0]).ravel())
    coords = np.unravel_index(nuclear, compact[inner].shape)
    owner = own[nuclear]
    out["frag_nucleus_voxels"] = np.bincount(owner, minlength=n).astype(np.float64)[size > 0]
    for axis, name in enumerate("xyz"):
      sums = np.bincount(owner, weights=coords[axis] + block_origin[axis] + 0.5, minlength=n)
      out[f"frag_nucleus_sum_{name}"] = sums[size > 0]
  else:
    for field in FRAGMENT_FIELDS[2:]:
      out[f"frag_{field}"] = np.zeros(len(out["frag_id"]))
  if image is not None:
    if organelles is None:
      raise ValueError("block_rag: appearance statistics need the organelles too")
    grey = image.astype(np.float64).ravel()
    per_voxel = {"intensity_sum": grey, "intensity_sq_sum": grey * grey,
                 # a voxel's own affinities (to its -1 neighbours): within the block, so the
                 # sums of blocks add up to the whole volume's
                 "boundary_sum": (1.0 - _probabilities(affinities.min(axis=0))).ravel()}
    for channel, name in enumerate(("nucleus", "mito", "synapse")):
      per_voxel[f"{name}_prob_sum"] = _probabilities(organelles[channel][inner]).ravel()
    for field in APPEARANCE_FIELDS:
      out[f"frag_{field}"] = np.bincount(own, weights=per_voxel[field], minlength=n)[size > 0]
  out["frag_interior_aff_sum"] = interior_sum[size > 0]
  out["frag_interior_pairs"] = interior_pairs[size > 0]
  keep = out["frag_id"] != 0
  for field in (FRAGMENT_FIELDS + INTERIOR_FIELDS
                + (APPEARANCE_FIELDS if image is not None else ())):
    out[f"frag_{field}"] = out[f"frag_{field}"][keep]
  return out


def _stitched_keys(compact, context, face_agreement, n) -> np.ndarray:
  """Keys (min * n + max, compact ids) of fragment pairs to stitch across the low faces."""
  keys = []
  for axis, agree in face_agreement.items():
    if not context[axis]:
      continue
    below = [slice(c, None) for c in context]
    above = list(below)
    below[axis], above[axis] = 0, 1
    a, b = compact[tuple(below)].ravel(), compact[tuple(above)].ravel()
    agree = np.asarray(agree, bool).ravel() & (a != b) & (a != 0) & (b != 0)
    pair = a * n + b
    pairs, inverse = np.unique(pair, return_inverse=True)
    agreeing = np.bincount(inverse, weights=agree)
    first, second = pairs // n, pairs % n
    # each fragment's best partner on this face (most agreeing pairs); stitch mutual bests
    best_of_first = np.zeros(n)
    np.maximum.at(best_of_first, first, agreeing)
    best_of_second = np.zeros(n)
    np.maximum.at(best_of_second, second, agreeing)
    mutual = ((agreeing > 0) & (agreeing == best_of_first[first])
              & (agreeing == best_of_second[second]))
    first, second = first[mutual], second[mutual]
    keys.append(np.minimum(first, second) * n + np.maximum(first, second))
  return np.concatenate(keys) if keys else np.zeros(0, np.int64)


def contract_stitched(rag: dict) -> tuple[dict, np.ndarray]:
  """Join fragments linked by `stitch` edges into one node each, as if one watershed had made
  them: fragment statistics add up, parallel edges add up, edges inside a node vanish.

  Returns (the node RAG, uint64 (F,) node id of each rag["frag_id"]); a node's id is its
  smallest fragment id.
  """
  frag = rag["frag_id"]
  n = len(frag)
  if n == 0:
    return rag, frag
  u = np.searchsorted(frag, rag["u"])
  v = np.searchsorted(frag, rag["v"])
  stitch = rag.get("stitch", np.zeros(len(u))) > 0
  graph = coo_matrix((np.ones(stitch.sum()), (u[stitch], v[stitch])), shape=(n, n))
  _, component = connected_components(graph, directed=False)
  first = np.full(component.max() + 1, n, dtype=np.int64)
  np.minimum.at(first, component, np.arange(n))  # frag is sorted: first member = smallest id
  node = frag[first[component]]
  return relabel(rag, frag, node), node


def stitched_node_table(rag: dict) -> dict:
  """Each fragment's stitched node (contract_stitched) and that node's totals: what
  edge_scorer.score_edge_pieces needs to score a part of the volume on its own.

  rag: a merged RAG holding every fragment and at least every stitch edge.
  Returns {"fragments": rag["frag_id"], "nodes": uint64 (F,), "frag_<field>": float64 (F,)
  the node's total of each fragment statistic}.
  """
  nodes, node_of = contract_stitched(rag)
  row = np.searchsorted(nodes["frag_id"], node_of)
  return {"fragments": rag["frag_id"], "nodes": node_of,
          **{key: value[row] for key, value in nodes.items()
             if key.startswith("frag_") and key != "frag_id"}}


def relabel(rag: dict, old_ids: np.ndarray, new_ids: np.ndarray) -> dict:
  """The RAG with fragments old_ids (sorted uint64) renamed new_ids (uint64, same length):
  statistics of fragments and of edges that come to share ids add up, edges inside one id
  vanish, edge ends outside old_ids keep their ids."""
  def rename(ids):
    if not len(old_ids):
      return ids
    at = np.minimum(np.searchsorted(old_ids, ids), len(old_ids) - 1)
    return np.where(old_ids[at] == ids, new_ids[at], ids).astype(np.uint64)

  nu, nv = rename(rag["u"]), rename(rag["v"])
  keep = nu != nv
  part = {"u": np.minimum(nu, nv)[keep], "v": np.maximum(nu, nv)[keep],
          "frag_id": rename(rag["frag_id"])}
  for field in EDGE_FIELDS[2:]:
    if field in rag:
      part[field] = rag[field][keep]
  for field in FRAGMENT_FIELDS[1:] + APPEARANCE_FIELDS + INTERIOR_FIELDS:
    if f"frag_{field}" in rag:
      part[f"frag_{field}"] = rag[f"frag_{field}"]
  if "frag_interior_pairs" in rag and not keep.all():
    # the boundaries that vanish lie inside the joined fragments now: rows of those ids that
    # add only to their interior
    inside = ~keep
    extra = {"frag_id": nu[inside], "frag_interior_aff_sum": rag["aff_sum"][inside],
             "frag_interior_pairs": rag["count"][inside].astype(np.float64)}
    for key in part:
      if key.startswith("frag_"):
        part[key] = np.concatenate([part[key], extra.get(key, np.zeros(inside.sum()))])
  return merge_rags([part])


def unique_pairs(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Distinct (u, v) pairs, sorted by u then v, and the index of each input pair among them:
  what np.unique(np.stack([u, v], 1), axis=0, return_inverse=True) returns, about 8× faster
  on millions of pairs (a lexsort instead of sorting rows as opaque bytes).
  u, v: integer arrays (E,). Returns (first (P,), second (P,), inverse int64 (E,))."""
  order = np.lexsort((v, u))
  su, sv = u[order], v[order]
  new = np.ones(len(u), dtype=bool)
  new[1:] = (su[1:] != su[:-1]) | (sv[1:] != sv[:-1])
  inverse = np.empty(len(u), dtype=np.int64)
  inverse[order] = np.cumsum(new) - 1
  return su[new], sv[new], inverse


def merge_rags(parts) -> dict:
  """Sum per-block RAG dicts into one global RAG (edges keyed by (u, v), fragments by id)."""
  parts = list(parts)
  u = np.concatenate([p["u"] for p in parts]).astype(np.uint64)
  v = np.concatenate([p["v"] for p in parts]).astype(np.uint64)
  first, second, inverse = unique_pairs(u, v)
  out = {"u": first, "v": second}
  for field in SUMMED_EDGE_FIELDS:
    if not any(field in p for p in parts):
      continue  # RAGs written before the field existed stay recognisable
    values = np.concatenate([p.get(field, np.zeros(len(p["u"]))) for p in parts]
                            ).astype(np.float64)
    out[field] = np.bincount(inverse, weights=values, minlength=len(first))
  out["count"] = out["count"].astype(np.int64)
  if all("aff_hist" in p for p in parts):
    hist = np.concatenate([p["aff_hist"] for p in parts]).astype(np.float64)
    out["aff_hist"] = np.stack([np.bincount(inverse, weights=hist[:, b], minlength=len(first))
                                for b in range(HIST_BINS)], axis=1).astype(np.uint32)
  aff_min = np.full(len(first), np.inf)
  np.minimum.at(aff_min, inverse, np.concatenate([p["aff_min"] for p in parts]))
  out["aff_min"] = aff_min
  frag = np.concatenate([p["frag_id"] for p in parts]).astype(np.uint64)
  frag_ids, finv = np.unique(frag, return_inverse=True)
  out["frag_id"] = frag_ids
  optional = [f for f in APPEARANCE_FIELDS + INTERIOR_FIELDS
              if all(f"frag_{f}" in p for p in parts)]
  for field in FRAGMENT_FIELDS[1:] + tuple(optional):
    values = np.concatenate([p[f"frag_{field}"] for p in parts]).astype(np.float64)
    out[f"frag_{field}"] = np.bincount(finv.ravel(), weights=values, minlength=len(frag_ids))
  return out
