"""ERL / bERL / nERL, VOI, adapted Rand error and organelle scores on hand-worked cases, plus
slow reference implementations on random cases."""

import numpy as np
import pytest

from iicats_cv.errors import IicatsError
from iicats_cv.metrics import (Skeleton, adapted_rand_error, affinity_average_precision,
                               average_precision, berl, boundary_tolerance_mask,
                               concatenate_skeletons, contingency, erl, merging_segments, nerl,
                               organelle_instance_scores, run_length_metrics, voi, voxel_scores)


def chain(skeleton_id, n, step=10.0, soma=()):
  """n nodes on the x axis, `step` nm apart: n - 1 edges, L = (n - 1) * step."""
  vertices = np.zeros((n, 3))
  vertices[:, 0] = np.arange(n) * step
  edges = np.stack([np.arange(n - 1), np.arange(1, n)], axis=1)
  return Skeleton(skeleton_id, vertices, edges, soma=list(soma))


def segs(*values):
  return np.array(values, np.uint64)


# --------------------------------------------------------------------------------------------
# ERL


def test_pure_split():
  # chain 0-10-20-30-40 nm, segments 1 1 1 | 2 2: runs 20 and 10 nm, L = 40
  # ERL = (20^2 + 10^2) / 40 = 12.5; no merge, no constraint: bERL = ERL
  r = run_length_metrics([chain(1, 5)], segs(1, 1, 1, 2, 2))
  assert r["erl"] == pytest.approx(12.5)
  assert r["berl"] == pytest.approx(12.5)
  assert r["total_length"] == pytest.approx(40)
  assert r["skeletons"][0]["runs"] == [20.0, 10.0]
  assert r["skeletons"][0]["n_splits"] == 1
  assert r["merging_segments"] == []
  assert r["nerl"] is None  # no nucleus node anywhere


def test_perfect_segmentation_is_total_length():
  # one segment per skeleton: ERL = (20^2 + 30^2) / 50 = 26
  r = run_length_metrics([chain(1, 3), chain(2, 4)], segs(1, 1, 1, 2, 2, 2, 2))
  assert r["erl"] == pytest.approx(26.0)


def test_merge_between_two_skeletons():
  # skeleton 1: 0-10-20 nm all in segment 1; skeleton 2: 0-10-20 nm in 2, 2, 1.
  # Segment 1 holds nodes of both skeletons -> merging: every edge in it is wrong.
  # The only correct edge: skeleton 2's (2, 2), 10 nm. ERL = 10^2 / 40 = 2.5
  r = run_length_metrics([chain(1, 3), chain(2, 3)], segs(1, 1, 1, 2, 2, 1))
  assert r["merging_segments"] == [1]
  assert r["erl"] == pytest.approx(2.5)
  assert r["skeletons"][0]["merging_segments"] == [1]
  merge = [v for v in r["violations"] if v["kind"] == "merge"]
  assert merge == [{"segment": 1, "kind": "merge", "node": 5, "skeletons": [1, 2]}]


def test_one_skeleton_in_one_segment_twice_is_not_a_merge():
  # segment 1 at both ends of a chain of one skeleton: a split, not a merge.
  # runs 10 (1,1) and 10 (1,1); segment 2 in between. ERL = 200 / 40 = 5
  r = run_length_metrics([chain(1, 5)], segs(1, 1, 2, 1, 1))
  assert r["merging_segments"] == []
  assert r["erl"] == pytest.approx(5.0)


def test_omission_segment_zero():
  # chain 0-10-20-30 nm (L = 30): segments 1 0 0 1 -> no correct edge, ERL = 0
  assert erl([chain(1, 4)], segs(1, 0, 0, 1)) == 0.0
  # 1 1 0 1 -> one run of 10 nm: ERL = 100 / 30
  r = run_length_metrics([chain(1, 4)], segs(1, 1, 0, 1))
  assert r["erl"] == pytest.approx(100 / 30)
  assert r["skeletons"][0]["omitted_length"] == pytest.approx(20)
  assert r["n_background_nodes"] == 1


def test_zero_is_never_merging():
  # two skeletons both partly in background: segment 0 does not merge them
  r = run_length_metrics([chain(1, 3), chain(2, 3)], segs(0, 1, 1, 0, 2, 2))
  assert r["merging_segments"] == []
  assert r["erl"] == pytest.approx((100 + 100) / 40)


def test_merge_with_unskeletonised_cell_seen_through_two_nuclei():
  # skeleton 1: 0-10-20 nm in segment 5, nucleus node 0. Ground-truth nuclei: its own (in 5)
  # and one of a cell without a skeleton, also found in segment 5.
  # ERL sees no merge: 20^2 / 20 = 20. bERL: segment 5 holds 2 nuclei -> violating -> 0.
  # nERL: the nucleus node's edges are all incorrect -> r_s = 0 -> 0.
  sk = [chain(1, 3, soma=[0])]
  r = run_length_metrics(sk, segs(5, 5, 5), nucleus_segments=segs(5, 5))
  assert r["erl"] == pytest.approx(20)
  assert r["berl"] == 0.0
  assert r["nerl"] == 0.0
  assert r["nucleus_violating_segments"] == [5]
  assert r["skeletons"][0]["violating_segments"] == [5]
  assert r["skeletons"][0]["nucleus_fraction"] == 0.0
  # the other nucleus in its own segment 7 (or in background 0): no violation, bERL = ERL
  assert berl(sk, segs(5, 5, 5), nucleus_segments=segs(5, 7)) == pytest.approx(20)
  assert berl(sk, segs(5, 5, 5), nucleus_segments=segs(5, 0, 0)) == pytest.approx(20)
  assert nerl(sk, segs(5, 5, 5), nucleus_segments=segs(5, 7)) == pytest.approx(20)


def test_synapse_pre_and_post_in_one_segment():
  # chain 0-10-20-30 nm, segments 3 3 4 4: runs 10 (seg 3) and 10 (seg 4): ERL = 200 / 30.
  # A synapse with pre and post both in segment 3 makes it violating: bERL = 100 / 30.
  sk = [chain(1, 4)]
  r = run_length_metrics(sk, segs(3, 3, 4, 4), synapse_segments=np.array([[3, 3]], np.uint64))
  assert r["erl"] == pytest.approx(200 / 30)
  assert r["berl"] == pytest.approx(100 / 30)
  assert r["synapse_violating_segments"] == [3]
  assert r["n_merged_synapses"] == 1
  assert r["violations"] == [{"segment": 3, "kind": "synapse", "synapse": 0, "count": 1}]
  # two synapses merged in segment 3 and one in 4: two violating segments, three synapses
  merged = np.array([[3, 3], [3, 3], [4, 4], [3, 4]], np.uint64)
  r = run_length_metrics(sk, segs(3, 3, 4, 4), synapse_segments=merged, details=False)
  assert r["synapse_violating_segments"] == [3, 4]
  assert r["n_merged_synapses"] == 3
  # pre in 3, post in 4 is how it should be; a synapse on background is no violation
  ok = np.array([[3, 4], [0, 0]], np.uint64)
  assert berl(sk, segs(3, 3, 4, 4), synapse_segments=ok) == pytest.approx(200 / 30)


def soma_tree():
  """Nucleus node 0 at the origin; branch A 0-1-2-3 along x, branch B 0-4-5 along y, 10 nm
  edges: L = 50; leaves 3 and 5."""
  vertices = np.array([[0, 0, 0], [10, 0, 0], [20, 0, 0], [30, 0, 0], [0, 10, 0], [0, 20, 0]],
                      float)
  edges = np.array([[0, 1], [1, 2], [2, 3], [0, 4], [4, 5]])
  return Skeleton(1, vertices, edges, soma=[0])


def test_soma_run_cut_by_split_near_nucleus():
  # segments: node 0: 1, branch A (1, 2, 3): 2, branch B (4, 5): 1. The split sits on the
  # first edge of branch A. Runs: A 20 nm (seg 2), B + nucleus 20 nm (seg 1).
  # ERL = (400 + 400) / 50 = 16; r_s = 20; nERL = 50 * 20 / 50 = 20; r_s / L_s = 0.4;
  # leaves 3 (cut off) and 5 (reached): leaf fraction 0.5
  r = run_length_metrics([soma_tree()], segs(1, 2, 2, 2, 1, 1))
  assert r["erl"] == pytest.approx(16)
  assert r["nerl"] == pytest.approx(20)
  s = r["skeletons"][0]
  assert s["nucleus_run"] == pytest.approx(20)
  assert s["nucleus_fraction"] == pytest.approx(0.4)
  assert (s["n_leaves"], s["n_leaves_reached"], s["leaf_fraction"]) == (2, 1, 0.5)
  assert s["nucleus_node"] == 0


def test_nerl_weights_by_skeleton_length():
  # skeleton 1 = soma_tree (L 50, r 20); skeleton 2: chain 0-10 (L 10) whole, soma at node 1
  # (r 10); skeleton 3 has no nucleus and does not count.
  # nERL = (50 * 20 + 10 * 10) / (50 + 10) = 1100 / 60
  sks = [soma_tree(), chain(2, 2, soma=[1]), chain(3, 3)]
  r = run_length_metrics(sks, segs(1, 2, 2, 2, 1, 1, 7, 7, 8, 8, 8))
  assert r["nerl"] == pytest.approx(1100 / 60)
  assert r["nerl_length"] == pytest.approx(60)
  assert r["n_nucleus_skeletons"] == 2
  assert r["skeletons"][2]["nucleus_fraction"] is None


def test_nerl_first_soma_node_counts_and_merge_cuts_run():
  # two soma nodes listed (4, 0): the first listed (4) counts. Segments: node 0: 1,
  # nodes 1-3: 2, nodes 4-5: 3 -> node 4's run is the edge 4-5, 10 nm; nERL = 50 * 10 / 50
  sk = soma_tree()
  sk.soma = np.array([4, 0])
  r = run_length_metrics([sk], segs(1, 2, 2, 2, 3, 3))
  assert r["skeletons"][0]["nucleus_node"] == 4
  assert r["nerl"] == pytest.approx(10)
  # leaves: nodes 3 and 5 (soma nodes would not count)
  assert r["skeletons"][0]["n_leaves"] == 2
  # a merge of segment 2 with another skeleton cuts nothing of the nucleus run, but a merge
  # of segment 3 does: r_s = 0
  other = chain(9, 2)
  r = run_length_metrics([sk, other], segs(1, 2, 2, 2, 3, 3, 3, 3))
  assert r["merging_segments"] == [3]
  assert r["nerl"] == 0.0


def test_pooled_versus_connected_runs():
  # chain 0..40 nm, segments 1 1 2 1 1: connected runs 10 and 10 -> ERL = 200 / 40 = 5;
  # pooled (funlib): segment 1 pools 20 nm -> ERL = 400 / 40 = 10
  sk = [chain(1, 5, soma=[0])]
  s = segs(1, 1, 2, 1, 1)
  cc = run_length_metrics(sk, s)
  pooled = run_length_metrics(sk, s, pooled=True)
  assert cc["erl"] == pytest.approx(5)
  assert pooled["erl"] == pytest.approx(10)
  assert pooled["skeletons"][0]["runs"] == [20.0]
  # nERL: the nucleus run is 10 (connected) or the pooled 20 nm
  assert cc["nerl"] == pytest.approx(10)
  assert pooled["nerl"] == pytest.approx(20)
  # leaf reachability stays connected: leaf 4 is not reachable from node 0 either way
  assert pooled["skeletons"][0]["leaf_fraction"] == 0.0


def test_pooled_soma_without_correct_edge_is_zero():
  # nucleus node 0 in segment 1 alone (edge 0-1 splits); segment 1 again at 3-4
  r = run_length_metrics([chain(1, 5, soma=[0])], segs(1, 2, 2, 1, 1), pooled=True)
  assert r["nerl"] == 0.0


def test_empty_and_degenerate_inputs():
  r = run_length_metrics([], segs())
  assert (r["erl"], r["berl"], r["nerl"], r["total_length"]) == (None, None, None, 0.0)
  single = Skeleton(1, [[0, 0, 0]], np.zeros((0, 2)), soma=[0])
  r = run_length_metrics([single], segs(4))
  assert r["erl"] is None and r["nerl"] is None
  assert r["skeletons"][0]["leaf_fraction"] is None


def test_bad_inputs_raise():
  with pytest.raises(IicatsError, match="2 node segment ids for 3"):
    run_length_metrics([chain(1, 3)], segs(1, 1))
  with pytest.raises(IicatsError, match="used by two skeletons"):
    concatenate_skeletons([chain(1, 2), chain(1, 2)])
  with pytest.raises(IicatsError, match="outside"):
    Skeleton(1, [[0, 0, 0]], [[0, 1]])
  with pytest.raises(IicatsError, match="finite"):
    Skeleton(1, [[0, np.nan, 0]], np.zeros((0, 2)))


def test_merging_segments_unsorted_skeleton_order():
  ids, node, skels = merging_segments(segs(3, 4, 3, 0, 0), np.array([2, 0, 1, 0, 1]))
  assert ids.tolist() == [3]
  assert node.tolist() == [0]  # segment 3 on its second skeleton (2): node 0
  assert skels[0].tolist() == [1, 2]


# --------------------------------------------------------------------------------------------
# slow references and properties


def reference_runs(skeletons, node_segments, bad, pooled):
  """Run lengths per skeleton with Python loops: union-find over correct edges."""
  out, offset = [], 0
  for sk in skeletons:
    s = [int(v) for v in node_segments[offset:offset + len(sk.vertices_nm)]]
    offset += len(sk.vertices_nm)
    parent = list(range(len(s)))

    def find(i):
      while parent[i] != i:
        i = parent[i]
      return i
    runs = {}
    for a, b in sk.edges.tolist():
      if s[a] == s[b] and s[a] != 0 and s[a] not in bad:
        parent[find(a)] = find(b)
    for a, b in sk.edges.tolist():
      if s[a] == s[b] and s[a] != 0 and s[a] not in bad:
        key = s[a] if pooled else find(a)
        runs[key] = runs.get(key, 0.0) + float(np.linalg.norm(sk.vertices_nm[a] -
                                                               sk.vertices_nm[b]))
    out.append(sorted(runs.values(), reverse=True))
  return out


def reference_erl(skeletons, node_segments, nuclei, synapses, pooled):
  owners = {}
  offset = 0
  for k, sk in enumerate(skeletons):
    for v in node_segments[offset:offset + len(sk.vertices_nm)].tolist():
      owners.setdefault(v, set()).add(k)
    offset += len(sk.vertices_nm)
  merging = {v for v, o in owners.items() if v != 0 and len(o) > 1}
  counts = {}
  for v in nuclei.tolist():
    counts[v] = counts.get(v, 0) + 1
  violating = merging | {v for v, c in counts.items() if v != 0 and c > 1} | {
    a for a, b in synapses.tolist() if a == b and a != 0}
  total = sum(float(np.linalg.norm(sk.vertices_nm[a] - sk.vertices_nm[b]))
              for sk in skeletons for a, b in sk.edges.tolist())
  values = []
  for bad in (merging, violating):
    runs = reference_runs(skeletons, node_segments, bad, pooled)
    values.append(sum(r * r for rs in runs for r in rs) / total)
  return values


def random_tree(rng, skeleton_id, n):
  parent = (rng.random(n - 1) * np.arange(1, n)).astype(int)
  edges = np.stack([np.arange(1, n), parent], axis=1)
  vertices = rng.uniform(0, 100, (n, 3))
  return Skeleton(skeleton_id, vertices, edges, soma=[int(rng.integers(n))])


@pytest.mark.parametrize("seed", range(25))
def test_random_cases_against_reference_and_berl_le_erl(seed):
  rng = np.random.default_rng(seed)
  skeletons = [random_tree(rng, k + 1, int(rng.integers(2, 30))) for k in range(4)]
  n = sum(len(s.vertices_nm) for s in skeletons)
  node_segments = rng.integers(0, 8, n).astype(np.uint64)
  nuclei = rng.integers(0, 12, 5).astype(np.uint64)
  synapses = rng.integers(0, 10, (4, 2)).astype(np.uint64)
  for pooled in (False, True):
    r = run_length_metrics(skeletons, node_segments, nuclei, synapses, pooled=pooled)
    ref_erl, ref_berl = reference_erl(skeletons, node_segments, nuclei, synapses, pooled)
    assert r["erl"] == pytest.approx(ref_erl)
    assert r["berl"] == pytest.approx(ref_berl)
    assert r["berl"] <= r["erl"] + 1e-9
    assert r["nerl"] is None or r["nerl"] <= r["total_length"] + 1e-9
  cc = run_length_metrics(skeletons, node_segments, nuclei, synapses)
  pooled = run_length_metrics(skeletons, node_segments, nuclei, synapses, pooled=True)
  assert cc["erl"] <= pooled["erl"] + 1e-9  # pooling only joins runs


# --------------------------------------------------------------------------------------------
# VOI and adapted Rand error


def test_voi_and_arand_hand_case():
  # gt == 0 voxels (the last two) are ignored. Left: seg 5 5 7 0, gt 1 2 2 2 (n = 4).
  # H(seg|gt): gt 1 -> {5}: 0; gt 2 -> {5, 7, 0} uniformly: log2 3, weight 3/4 -> 1.18872
  # H(gt|seg): seg 5 -> {1, 2}: 1 bit, weight 2/4 -> 0.5; seg 7, seg 0: pure
  seg = np.array([5, 5, 7, 0, 9, 9])
  gt = np.array([1, 2, 2, 2, 0, 0])
  split, merge = voi(seg, gt)
  assert split == pytest.approx(0.75 * np.log2(3))
  assert merge == pytest.approx(0.5)
  # adapted Rand (CREMI): n = 6 voxels; sumA = 1^2 + 3^2 = 10; seg 0 voxel counts as a
  # singleton, c / n = 1 / 6; sumB = 2^2 + 1^2 + 1/6; sumAB = 1 + 1 + 1 + 1/6
  # precision = (19/6) / (31/6) = 19/31, recall = (19/6) / 10 = 19/60
  error, precision, recall = adapted_rand_error(seg, gt, all_stats=True)
  assert precision == pytest.approx(19 / 31)
  assert recall == pytest.approx(19 / 60)
  f = 2 * precision * recall / (precision + recall)
  assert error == pytest.approx(1 - f)
  assert adapted_rand_error(seg, gt) == pytest.approx(error)


def test_perfect_labels_score_zero():
  gt = np.repeat(np.arange(1, 5), 10).reshape(4, 10)
  relabelled = gt * 1000 + 3
  assert voi(relabelled, gt) == (0.0, 0.0)
  assert adapted_rand_error(relabelled, gt) == pytest.approx(0.0)
  assert voi(gt, np.zeros_like(gt)) == (0.0, 0.0)
  assert adapted_rand_error(gt, np.zeros_like(gt)) == 0.0


def slow_scores(seg, gt):
  """VOI and adapted Rand error with dict counting over voxels (reference)."""
  seg, gt = seg.ravel().tolist(), gt.ravel().tolist()
  n_total = len(seg)
  pairs, a, b = {}, {}, {}
  for s, g in zip(seg, gt):
    if g == 0:
      continue
    pairs[(s, g)] = pairs.get((s, g), 0) + 1
    a[s] = a.get(s, 0) + 1
    b[g] = b.get(g, 0) + 1
  n = sum(pairs.values())
  split = -sum(c / n * np.log2(c / b[g]) for (s, g), c in pairs.items())
  merge = -sum(c / n * np.log2(c / a[s]) for (s, g), c in pairs.items())
  singles = sum(c for (s, g), c in pairs.items() if s == 0) / n_total
  sum_a = sum(v * v for v in b.values())
  sum_b = sum(v * v for s, v in a.items() if s != 0) + singles
  sum_ab = sum(c * c for (s, g), c in pairs.items() if s != 0) + singles
  p, r = sum_ab / sum_b, sum_ab / sum_a
  return split, merge, 1 - 2 * p * r / (p + r)


def test_boundary_tolerance_leaves_out_voxels_next_to_gt_interfaces():
  gt = np.ones((8, 3, 8), np.uint32)
  gt[4:] = 2                                   # an interface between x = 3 and x = 4
  gt[:, :, 4:] += 10                           # and one between z = 3 and z = 4
  keep = boundary_tolerance_mask(gt, (10, 10, 10), 10)
  assert np.array_equal(np.flatnonzero(keep[:, 0, 0]), [0, 1, 2, 5, 6, 7])
  assert np.array_equal(np.flatnonzero(keep[0, 0]), [0, 1, 2, 5, 6, 7])
  keep = boundary_tolerance_mask(gt, (10, 10, 10), 25)   # two voxels per side
  assert np.array_equal(np.flatnonzero(keep[:, 0, 0]), [0, 1, 6, 7])
  # 10 nm reaches two 4-nm voxels along x and no 40-nm section along z
  keep = boundary_tolerance_mask(gt, (4, 4, 40), 10)
  assert np.array_equal(np.flatnonzero(keep[:, 0, 3]), [0, 1, 6, 7])
  assert keep[0, 0].all()
  with pytest.raises(IicatsError, match="at least one voxel"):
    boundary_tolerance_mask(gt, (10, 10, 10), 5)
  # a segmentation whose interface sits one voxel off the ground truth's: strict VOI sees it,
  # the tolerant one does not
  seg = gt.copy()
  seg[4] = seg[3]
  split, merge = voi(seg, gt)
  assert split > 0 and merge > 0
  keep = boundary_tolerance_mask(gt, (10, 10, 10), 10)
  assert voi(seg[keep], gt[keep]) == (0.0, 0.0)
  assert adapted_rand_error(seg[keep], gt[keep]) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_voi_arand_against_slow_reference(seed):
  rng = np.random.default_rng(seed)
  gt = rng.integers(0, 6, (12, 10, 5))
  seg = np.where(rng.random(gt.shape) < 0.7, gt * 7 + 2, rng.integers(0, 4, gt.shape))
  split, merge = voi(seg.astype(np.uint64), gt.astype(np.uint32))
  ref_split, ref_merge, ref_arand = slow_scores(seg, gt)
  assert split == pytest.approx(ref_split)
  assert merge == pytest.approx(ref_merge)
  assert adapted_rand_error(seg, gt) == pytest.approx(ref_arand)


def test_contingency_large_ids_and_shape_mismatch():
  a = np.array([2 ** 63 + 5, 2 ** 63 + 5, 1], np.uint64)
  b = np.array([1, 1, 1], np.uint64)
  ia, ib, counts = contingency(a, b)
  assert sorted(zip(ia.tolist(), ib.tolist(), counts.tolist())) == [(1, 1, 1),
                                                                     (2 ** 63 + 5, 1, 2)]
  with pytest.raises(IicatsError, match="differ in shape"):
    voi(np.zeros(3), np.zeros(4))


def test_dense_metrics_many_voxels_fast():
  import time
  rng = np.random.default_rng(0)
  gt = rng.integers(1, 3000, 10 ** 7).astype(np.uint64)
  seg = gt * 3 + (rng.random(gt.size) < 0.1)
  started = time.perf_counter()
  voi(seg, gt)
  adapted_rand_error(seg, gt)
  assert time.perf_counter() - started < 10


# --------------------------------------------------------------------------------------------
# organelles


def test_organelle_instance_scores():
  # gt objects 1 (4 voxels), 2 (4), 3 (4); predictions: 1 covers 3 of gt 1 (IoU 3/4),
  # 2 covers gt 2 plus 1 voxel (IoU 4/5), 3 touches gt 3 in 1 voxel (IoU 1/4, no match),
  # 4 lies in background. tp 2, fp 2, fn 1: precision 1/2, recall 2/3, F1 4/7
  gt = np.array([1, 1, 1, 1, 0, 2, 2, 2, 2, 0, 3, 3, 3, 3, 0, 0, 0])
  pred = np.array([1, 1, 1, 0, 0, 2, 2, 2, 2, 2, 0, 0, 0, 3, 0, 4, 4])
  s = organelle_instance_scores(pred, gt)
  assert (s["tp"], s["fp"], s["fn"]) == (2, 2, 1)
  assert s["precision"] == pytest.approx(0.5)
  assert s["recall"] == pytest.approx(2 / 3)
  assert s["f1"] == pytest.approx(4 / 7)
  assert s["mean_iou"] == pytest.approx((0.75 + 0.8) / 2)


def test_organelle_matching_is_one_to_one_at_ties():
  # one prediction over two half-size gt objects: IoU 0.5 with each, one match only
  s = organelle_instance_scores(np.array([1, 1, 1, 1]), np.array([1, 1, 2, 2]))
  assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 1)
  empty = organelle_instance_scores(np.zeros(5, int), np.zeros(5, int))
  assert (empty["precision"], empty["recall"], empty["f1"]) == (1.0, 1.0, 1.0)


def test_voxel_scores():
  # inter 1, |p| 2, |g| 2: dice 2/4, IoU 1/3
  s = voxel_scores(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
  assert s["dice"] == pytest.approx(0.5)
  assert s["iou"] == pytest.approx(1 / 3)
  assert voxel_scores(np.zeros(3), np.zeros(3))["iou"] == 1.0


def test_average_precision_by_hand():
  # ranked hits 1, 0, 1, 0: precision 1/1 at the first hit, 2/3 at the second
  assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == \
      pytest.approx((1 + 2 / 3) / 2)
  assert np.isnan(average_precision(np.array([0.5]), np.array([0])))


def test_affinity_average_precision_ignores_masked_voxels():
  target = np.array([1, 0, 1, 0], dtype=np.float32).reshape(1, 4, 1, 1)
  predicted = np.array([0.9, 0.95, 0.7, 0.2], dtype=np.float32).reshape(1, 4, 1, 1)
  mask = np.ones_like(target)
  # the boundary scored 0.95 ranks first: connections at ranks 2, 3 of 4
  assert affinity_average_precision(predicted, target, mask) == pytest.approx(
    {"affinity_ap": (1 / 2 + 2 / 3) / 2, "boundary_ap": (1 + 2 / 4) / 2})
  mask[0, 1] = 0
  assert affinity_average_precision(predicted, target, mask) == pytest.approx(
    {"affinity_ap": 1.0, "boundary_ap": 1.0})
