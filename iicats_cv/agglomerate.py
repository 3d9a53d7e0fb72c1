"""Constraint-aware hierarchical agglomeration and seeded neuron tracking over a fragment RAG.

Mean-affinity agglomeration (waterz-like): repeatedly merge the two adjacent regions with the
highest mean affinity over their shared boundary, until it falls below a threshold. The
II-CATS constraints (DESIGN.md):
- one nucleus per neuron: regions holding different nucleus instances never merge;
- synapse partners: fragments on both sides of a detected synapse never end up in one region;
- mitochondria: an edge crossed by a mitochondrion gets a bonus on its merge score (a hint; it
  never overrides a cannot-link).
Tracking continues the agglomeration from seeds: each seeded region grows best edge first down
to a lower threshold, and two seeds never merge.
"""
from __future__ import annotations

import array
import copy
import heapq
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .errors import IicatsError
from .edge_scorer import apply_edge_scorer


# the interior mean affinity the bonus uses, in steps of 1/64: a giant region's level seldom
# moves when it takes one more fragment, so its thousands of boundaries are seldom re-scored
INTERIOR_LEVELS = 64


@dataclass
class Constraints:
  """Organelle evidence, per fragment index (0..F-1) and per edge index.

  nucleus: int64 (F,) nucleus instance of each fragment (0 = none).
  cannot_link: int64 (K, 2) fragment index pairs that must stay apart (synapse partners).
  mito_edge: bool (E,) edges crossed by a mitochondrion (must-link hint).
  """
  nucleus: np.ndarray
  cannot_link: np.ndarray
  mito_edge: np.ndarray


@dataclass
class AgglomerationParams:
  """Defaults were chosen on the synthetic demo volume (seed 0) with the shipped model: weaker
  evidence (fewer voxel pairs, a larger bonus, tracking below `threshold`) lowered ERL there,
  because the model over-predicts synapses and mitochondria. The synapse cannot-link's two
  values came later, from benchmarks/constraints.py (seeds 0-5): with the affinity cut, 20
  pairs no longer lowered the demo's ERL."""
  threshold: float = 0.5
  use_constraints: bool = True
  # which evidence to use: a synapse detector trained only on other data makes cannot-links
  # that cut true neurons, so a run can leave a kind out
  constraints: tuple = ("nucleus", "synapse", "mitochondria")
  mito_bonus: float = 0.05
  # a fragment holds nucleus when this fraction of it is nucleus; nuclear fragments whose
  # boundary the nucleus crosses (nucleus_min_pairs voxel pairs inside it on both sides) form
  # one instance, kept when it has nucleus_min_voxels in all. A lower fraction finds more of
  # the synthetic nuclei (fragments that span nucleus and cytoplasm) but turns the default
  # model's false nucleus blobs on FIB neuropil into instances.
  nucleus_fraction: float = 0.5
  nucleus_min_voxels: int = 50
  nucleus_min_pairs: int = 5
  synapse_min_pairs: int = 20     # boundary voxel pairs with synapse signal for a cannot-link
  synapse_min_fraction: float = 0.0  # ... and at least this fraction of the boundary
  # ... and the mean affinity over those pairs at most this: the signal lies on a membrane (a
  # cleft), not inside one cell (a vesicle cloud split by the watershed). On the constraints
  # benchmark such boundaries inside one neuron had 0.58-0.70 at their 5th percentile, those
  # between two neurons 0.44-0.61 at their 95th; 0.75 let through cannot-links that split
  # neurons (docs/MEASUREMENTS.md, benchmarks/constraints.py)
  synapse_max_affinity: float = 0.6
  mito_min_pairs: int = 40        # boundary voxel pairs inside a mitochondrion for the hint
  track_threshold: float = 0.5
  # None: mean affinity of the shared boundary; q in (0, 1): its q-quantile (waterz-style,
  # from the RAG's affinity histograms; needs a RAG built with histograms)
  quantile: float | None = None
  # after merging down to the threshold, every segment smaller than this (voxels) joins its
  # best-scoring neighbour whatever the score, constraints still honoured: the dust a
  # threshold leaves (0 = off). Sweep tables are taken before this step.
  min_segment_voxels: int = 0
  # a learned edge scorer (edge_scorer.train_edge_scorer): when given, a boundary's score is
  # its mean same-neuron probability instead of its affinity (quantile must be None)
  edge_scorer: dict | None = None
  # a boundary's score gets interior_bonus × (1 − the higher of its two regions' interior
  # mean affinity), so two regions the network is unsure about inside (glia, dark cytoplasm)
  # merge at a weaker boundary, while one beside a clean region hardly gains: a threshold
  # relative to the regions' own noise, as in Felzenszwalb and Huttenlocher's segmentation.
  # Needs a RAG with rag.INTERIOR_FIELDS (0 = off)
  interior_bonus: float = 0.0


def derive_constraints(rag: dict, params: AgglomerationParams) -> tuple[Constraints, np.ndarray]:
  """Nucleus instances, synapse cannot-links and mitochondria hints from a merged RAG.

  Nucleus instances are groups of nuclear fragments joined where the predicted nucleus crosses
  their boundary: the fragment-level connected components of the nucleus mask, so they need no
  stitching across blocks. (A RAG without `nucleus_pairs` joins any two adjacent nuclear
  fragments.) Returns (constraints, nucleus_centroids_vx (N, 3) float, instance order).
  """
  frag = rag["frag_id"]
  n = len(frag)
  u = np.searchsorted(frag, rag["u"])
  v = np.searchsorted(frag, rag["v"])
  nucleus_voxels = rag["frag_nucleus_voxels"]
  nuclear = (nucleus_voxels > 0) & (nucleus_voxels >= params.nucleus_fraction * rag["frag_size"])
  both = nuclear[u] & nuclear[v]
  if "nucleus_pairs" in rag:
    both &= rag["nucleus_pairs"] >= params.nucleus_min_pairs
  graph = coo_matrix((np.ones(both.sum()), (u[both], v[both])), shape=(n, n))
  _, component = connected_components(graph, directed=False)
  nucleus = np.zeros(n, dtype=np.int64)
  centroids = []
  if nuclear.any():
    comps, inverse = np.unique(component[nuclear], return_inverse=True)
    voxels = np.bincount(inverse, weights=rag["frag_nucleus_voxels"][nuclear])
    big = voxels >= params.nucleus_min_voxels
    instance = np.cumsum(big) * big  # 1..N for big components, 0 otherwise
    nucleus[nuclear] = instance[inverse]
    for axis in "xyz":
      sums = np.bincount(inverse, weights=rag[f"frag_nucleus_sum_{axis}"][nuclear])
      centroids.append(sums[big] / voxels[big])
  centroids = np.stack(centroids, axis=1) if centroids else np.zeros((0, 3))
  synapse_affinity = rag.get("synapse_aff_sum", np.zeros(len(u))) / np.maximum(
    rag["synapse_pairs"], 1)
  synapse = ((rag["synapse_pairs"] >= params.synapse_min_pairs)
             & (rag["synapse_pairs"] >= params.synapse_min_fraction * rag["count"])
             & (synapse_affinity <= params.synapse_max_affinity)
             & ("synapse" in params.constraints))
  cannot = np.stack([u[synapse], v[synapse]], axis=1).astype(np.int64)
  mito = (rag["mito_pairs"] >= params.mito_min_pairs) & ("mitochondria" in params.constraints)
  return Constraints(nucleus=nucleus, cannot_link=cannot, mito_edge=mito), centroids


class _Agglomerator:
  """Union of regions with lazily re-scored boundary edges in a max-heap.

  Boundary statistics live in flat arrays indexed by edge number (aff_sum, count: float64;
  mito: bool; histograms: float64 rows), and each region's adjacency maps a neighbour to the
  edge number: about half the memory of a Python object per boundary.
  """

  def __init__(self, n, u, v, aff_sum, count, mito, constraints: Constraints | None,
               mito_bonus, hist=None, quantile=None, sizes=None, interior=None,
               interior_bonus=0.0):
    self.parent = np.arange(n)
    self.interior_bonus = float(interior_bonus)
    if self.interior_bonus:
      # (sum, count) of the affinities inside each region, and its mean on a coarse grid: a
      # region's boundaries are scored again only when the level moves, not at every merge
      self.interior_sum = np.asarray(interior[0], np.float64).copy()
      self.interior_count = np.asarray(interior[1], np.float64).copy()
      self.level = [self._interior_level(a) for a in range(n)]
    self.size = (np.zeros(n, np.int64) if sizes is None
                 else np.asarray(sizes, np.int64).copy())  # voxels per region (at its root)
    self.adj = [dict() for _ in range(n)]
    self.sum = array.array("d", np.asarray(aff_sum, np.float64).tobytes())
    self.count = array.array("d", np.asarray(count, np.float64).tobytes())
    self.mito = bytearray(np.asarray(mito, bool).tobytes())
    self.hist = np.asarray(hist, np.float64) if quantile is not None else None
    self.live = 0               # boundaries between current regions
    regions = list(range(n))  # one int object per region, shared by every reference to it
    step = 1 << 20              # edges converted to Python ints a chunk at a time
    for start in range(0, len(u), step):
      ends = zip(u[start:start + step].tolist(), v[start:start + step].tolist())
      for e, (a, b) in enumerate(ends, start):
        if a == b:
          continue
        a, b = regions[a], regions[b]
        known = self.adj[a].get(b)
        if known is None:
          self.adj[a][b] = self.adj[b][a] = e
          self.live += 1
        else:
          self._accumulate(known, e)
    self.quantile = quantile
    self.mito_bonus = mito_bonus
    self.identity = np.zeros(n, dtype=np.int64)
    self.cannot = {}  # region -> regions it must never merge with (only where there are any)
    if constraints is not None:
      self.identity[:] = constraints.nucleus
      for a, b in constraints.cannot_link.tolist():
        self.cannot.setdefault(a, set()).add(b)
        self.cannot.setdefault(b, set()).add(a)
    self.heap = []
    for a in range(n):
      for b in self.adj[a]:
        if a < b:
          self._push(a, b)

  def _accumulate(self, into, other):
    """Add boundary `other`'s statistics into boundary `into`."""
    self.sum[into] += self.sum[other]
    self.count[into] += self.count[other]
    self.mito[into] |= self.mito[other]
    if self.hist is not None:
      self.hist[into] += self.hist[other]

  def _interior_level(self, a) -> float:
    """Region a's interior mean affinity in steps of 1/INTERIOR_LEVELS (1 with no pairs)."""
    if self.interior_count[a] <= 0:
      return 1.0
    return round(self.interior_sum[a] / self.interior_count[a] * INTERIOR_LEVELS) / INTERIOR_LEVELS

  def score(self, a, b):
    e = self.adj[a][b]
    if self.quantile is None:
      value = self.sum[e] / self.count[e]
    else:
      value = _histogram_quantile(self.hist[e], self.quantile)
    if self.interior_bonus:
      value += self.interior_bonus * (1.0 - max(self.level[a], self.level[b]))
    return value + (self.mito_bonus if self.mito[e] else 0.0)

  def _push(self, a, b):
    heapq.heappush(self.heap, (-self.score(a, b), a, b))
    if len(self.heap) > 2 * self.live + 4096:
      self._rebuild_heap()

  def _rebuild_heap(self):
    """Drop stale entries (of merged-away regions, or older scores of a boundary): the merge
    order is unchanged, as each live boundary's current entry stays."""
    self.heap[:] = [entry for entry in self.heap if self._current(entry)]
    heapq.heapify(self.heap)

  def _current(self, entry) -> bool:
    neg, a, b = entry
    return (self.parent[a] == a and self.parent[b] == b and b in self.adj[a]
            and abs(self.score(a, b) + neg) <= 1e-12)

  def find(self, x):
    root = x
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[x] != root:
      self.parent[x], x = root, self.parent[x]
    return root

  def allowed(self, a, b):
    ia, ib = self.identity[a], self.identity[b]
    if ia and ib and ia != ib:
      return False
    return b not in self.cannot.get(a, ())

  def run(self, threshold, merge_filter=None):
    """Merge best-first while the best live score ≥ threshold. Returns [(score, a, b)]."""
    history = []
    deferred = []
    while self.heap:
      entry = heapq.heappop(self.heap)
      if not self._current(entry):
        continue  # stale: the current score was pushed when it changed
      neg, a, b = entry
      score = -neg
      if score < threshold:
        heapq.heappush(self.heap, (neg, a, b))
        break
      if not self.allowed(a, b):
        continue
      if merge_filter is not None and not merge_filter(a, b):
        deferred.append((neg, a, b))
        continue
      history.append((score, a, b))
      self._merge(a, b)
    for item in deferred:
      heapq.heappush(self.heap, item)
    return history

  def _merge(self, a, b):
    if len(self.adj[a]) < len(self.adj[b]):
      a, b = b, a
    self.parent[b] = a
    self.size[a] += self.size[b]
    if self.identity[b]:
      self.identity[a] = self.identity[b]
    apart = self.cannot.pop(b, set())
    for x in apart:
      self.cannot[x].discard(b)
      self.cannot[x].add(a)
    if apart:
      self.cannot.setdefault(a, set()).update(apart)
      self.cannot[a].discard(a)
    rescore = self._merge_interiors(a, b) if self.interior_bonus else ()
    del self.adj[a][b]
    self.live -= 1
    for x, moved in self.adj[b].items():
      if x == a:
        continue
      del self.adj[x][b]
      kept = self.adj[a].get(x)
      if kept is None:
        self.adj[a][x] = self.adj[x][a] = moved
      else:
        self._accumulate(kept, moved)
        self.live -= 1
      self._push(min(a, x), max(a, x))
    self.adj[b] = {}
    for x in rescore:
      self._push(min(a, x), max(a, x))

  def _merge_interiors(self, a, b) -> list:
    """Region a takes b and the boundary between them into its interior. Returns a's own
    neighbours (not b's, whose boundaries with a are scored again anyway) whose score the
    new interior level changes."""
    e = self.adj[a][b]
    old = self.level[a]
    self.interior_sum[a] += self.interior_sum[b] + self.sum[e]
    self.interior_count[a] += self.interior_count[b] + self.count[e]
    new = self.level[a] = self._interior_level(a)
    if new == old:
      return []
    return [x for x in self.adj[a] if x != b and x not in self.adj[b]
            and max(old, self.level[x]) != max(new, self.level[x])]

  def absorb_small(self, min_voxels):
    """Merge each region smaller than min_voxels into its best-scoring neighbour, best
    boundary first and whatever its score, where the constraints allow."""
    small = lambda a, b: self.size[a] < min_voxels or self.size[b] < min_voxels  # noqa: E731
    return self.run(-np.inf, merge_filter=small)

  def labels(self):
    return np.array([self.find(i) for i in range(len(self.parent))])


def _histogram_quantile(hist, q) -> float:
  """q-quantile of affinities in [0, 1] from bin counts, linear within the bin."""
  cumulative = np.cumsum(hist)
  target = q * cumulative[-1]
  b = int(np.searchsorted(cumulative, target))
  below = cumulative[b - 1] if b else 0.0
  inside = (target - below) / hist[b] if hist[b] else 0.0
  return (b + inside) / len(hist)


def _segment_table(frag_ids, roots):
  """Fragment ids (F,) and root indices (F,) -> segment id per fragment: the smallest fragment
  id of each region (deterministic, independent of merge order)."""
  if not len(frag_ids):  # no tissue at all (an all-black region)
    return np.zeros(0, dtype=np.uint64)
  order = np.argsort(roots, kind="stable")
  sorted_roots = roots[order]
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_roots)) + 1]
  smallest = np.minimum.reduceat(frag_ids[order], starts)
  segment = np.empty(len(frag_ids), dtype=np.uint64)
  segment[order] = np.repeat(smallest, np.diff(np.r_[starts, len(order)]))
  return segment


@dataclass
class AgglomerationResult:
  fragment_ids: np.ndarray           # uint64 (F,)
  segment_ids: np.ndarray            # uint64 (F,) at params.threshold (+ tracking when seeded)
  history: list                      # [(score, fragment index a, fragment index b)]
  sweep: dict = field(default_factory=dict)   # threshold -> segment ids (F,)
  tracked: list = field(default_factory=list)  # [{"id", "seed", "fragments", "voxels"}]
  violations: dict = field(default_factory=dict)


def agglomerate(rag: dict, params: AgglomerationParams, sweep_thresholds=(),
                seeds: dict | None = None,
                constraints: Constraints | None = None) -> AgglomerationResult:
  """Agglomerate a merged RAG (see rag.merge_rags) into segments.

  seeds: optional {seed number (1..K): fragment index}; when given, tracking runs after the
    agglomeration: each seeded region grows down to params.track_threshold, and constraints
    are honoured (when switched on). Seeds never merge with each other, in the agglomeration
    either; seeds on one fragment (or one nucleus instance) share their neuron.
  sweep_thresholds: extra thresholds ≥ the lowest one run; tables come from the same merge
    history (the greedy merge order is the same for every threshold, so each table equals a
    separate run at that threshold).
  constraints: evidence to use instead of what derive_constraints finds in the RAG (indexed
    like rag["frag_id"] and the RAG's edges), e.g. proofread cannot-links, or the ground
    truth's for a bound; needs params.use_constraints. The violations are counted against it.
  """
  given = constraints
  if given is not None and not params.use_constraints:
    raise IicatsError("agglomeration: constraints were given with use_constraints=False")
  if params.edge_scorer is not None:
    if params.quantile is not None:
      raise IicatsError("agglomeration: a learned edge scorer replaces the affinity statistic; "
                        "give it or a quantile, not both")
    rag = apply_edge_scorer(rag, params.edge_scorer)
  frag = rag["frag_id"]
  n = len(frag)
  u = np.searchsorted(frag, rag["u"])
  v = np.searchsorted(frag, rag["v"])
  if constraints is None and params.use_constraints:
    constraints = derive_constraints(rag, params)[0]
    if "nucleus" not in params.constraints:
      constraints.nucleus = np.zeros_like(constraints.nucleus)  # seeds still come from nuclei
  mito = constraints.mito_edge if constraints is not None else np.zeros(len(u), bool)
  if params.quantile is not None and "aff_hist" not in rag:
    raise IicatsError("quantile agglomeration needs affinity histograms in the RAG: run the "
                      "rag stage with histograms (pipeline --quantile)")
  agg = _Agglomerator(n, u, v, rag["aff_sum"], rag["count"].astype(np.float64), mito,
                      constraints, params.mito_bonus if constraints is not None else 0.0,
                      hist=rag.get("aff_hist"), quantile=params.quantile,
                      sizes=rag["frag_size"], interior=_interiors(rag, params.interior_bonus),
                      interior_bonus=params.interior_bonus)
  for number, index in sorted((seeds or {}).items()):
    root = agg.find(index)
    # before any merge, so that two seeds never share a segment: a nucleus instance already
    # identifies its region, other seeds get their own identity
    if not agg.identity[root]:
      agg.identity[root] = -number
  history = agg.run(params.threshold)
  sweep = {}
  if len(sweep_thresholds):
    full = history
    lowest = min(sweep_thresholds)
    if lowest < params.threshold:
      full = history + copy.deepcopy(agg).run(lowest)
    sweep = {float(t): _replay(frag, full, t, n) for t in sweep_thresholds}
  if params.min_segment_voxels > 0:
    history = history + agg.absorb_small(params.min_segment_voxels)
  tracked = []
  if seeds:
    agg.run(params.track_threshold,
            merge_filter=lambda a, b: bool(agg.identity[a]) != bool(agg.identity[b]))
  labels = agg.labels()
  segment = _segment_table(frag, labels)
  for number, index in sorted((seeds or {}).items()):
    members = labels == labels[index]
    tracked.append({"seed": int(number), "id": int(segment[index]),
                    "fragments": int(members.sum()),
                    "voxels": int(rag["frag_size"][members].sum())})
  violations = count_violations(rag, segment, params, given)
  return AgglomerationResult(frag, segment, history, sweep, tracked, violations)


def agglomerate_interior(rag: dict, frozen: np.ndarray, threshold: float,
                         quantile: float | None = None, mito_edge: np.ndarray | None = None,
                         mito_bonus: float = 0.0, interior_bonus: float = 0.0) -> np.ndarray:
  """One level of hierarchical agglomeration, over the fragments (or the regions of the level
  below) of one part of the volume.

  rag: merged RAG of the part (edges with both ends inside it).
  frozen: bool (F,) fragments the global step must see as they are: those with edges leaving
    the part, those holding nucleus evidence and those beside a synapse cannot-link.
  mito_edge: bool (E,) edges crossed by a mitochondrion, which get `mito_bonus` as in the
    global step (without it the two would merge in another order); interior_bonus: as
    AgglomerationParams.interior_bonus, for the same reason.
  The others merge best-first while their boundary's mean (or `quantile`) affinity (plus the
  bonus) is ≥ threshold, and only while neither side's best boundary leads to a frozen
  region (that blocks them in turn, as abiss does): such merges are the ones the global step
  would make first as well.
  Returns uint64 (F,) the region of each fragment (its smallest fragment id).
  """
  frag = rag["frag_id"]
  u = np.searchsorted(frag, rag["u"])
  v = np.searchsorted(frag, rag["v"])
  agg = _Agglomerator(len(frag), u, v, rag["aff_sum"], rag["count"].astype(np.float64),
                      np.zeros(len(u), bool) if mito_edge is None else mito_edge, None,
                      mito_bonus, hist=rag.get("aff_hist"), quantile=quantile,
                      interior=_interiors(rag, interior_bonus), interior_bonus=interior_bonus)
  blocked = np.array(frozen, bool)

  def unblocked(a, b):
    # boundaries pop best first: a region whose best boundary leads to a frozen (or blocked)
    # region may join it in the global step, so it must stay as it is here too
    if blocked[a] or blocked[b]:
      blocked[a] = blocked[b] = True
      return False
    return True

  agg.run(threshold, merge_filter=unblocked)
  return _segment_table(frag, agg.labels())


def _interiors(rag: dict, interior_bonus: float):
  """(sum, count) of each fragment's interior affinities for the interior bonus; None when
  it is off."""
  if not interior_bonus:
    return None
  if "frag_interior_pairs" not in rag:
    raise IicatsError("the interior bonus needs each fragment's interior affinities in the "
                      "RAG (rag.INTERIOR_FIELDS), which RAGs written before them lack: run the "
                      "rag stage again")
  return rag["frag_interior_aff_sum"], rag["frag_interior_pairs"]


def _replay(frag, history, threshold, n):
  """Segment ids after the prefix of `history` whose scores stay ≥ threshold."""
  merges = []
  for score, a, b in history:
    if score < threshold:
      break
    merges.append((a, b))
  if merges:
    m = np.array(merges)
    graph = coo_matrix((np.ones(len(m)), (m[:, 0], m[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
  else:
    comp = np.arange(n)
  return _segment_table(frag, comp)


def count_violations(rag: dict, segment: np.ndarray, params: AgglomerationParams,
                     constraints: Constraints | None = None) -> dict:
  """Constraint violations left in a segmentation table: of `constraints`, or when it is None,
  of all the evidence derive_constraints finds in the RAG (also what a run left unused)."""
  if constraints is None:
    constraints, _ = derive_constraints(rag, params)
  nuc = constraints.nucleus
  has = nuc > 0
  pairs = np.unique(np.stack([segment[has], nuc[has]], axis=1), axis=0)
  _, per_segment = np.unique(pairs[:, 0], return_counts=True) if len(pairs) else (None, [])
  multi_nucleus = int(np.sum(np.asarray(per_segment) > 1))
  cl = constraints.cannot_link
  synapse_merged = int(np.sum(segment[cl[:, 0]] == segment[cl[:, 1]])) if len(cl) else 0
  return {"segments_with_several_nuclei": multi_nucleus,
          "synapse_partners_merged": synapse_merged,
          "nucleus_instances": int(nuc.max()) if len(nuc) else 0,
          "synapse_cannot_links": int(len(cl))}
