"""Time ERL/bERL/nERL (iicats_cv.metrics.run_length_metrics) on 10^6 skeleton nodes.

Random tree skeletons (each node hangs off an earlier node at ~100 nm), a nucleus node per
skeleton, a segmentation that splits each skeleton into pieces and merges a few of them, plus
random ground-truth nuclei and synapses. One core (process pinned to one CPU, BLAS/OpenMP threads 1). The reference is
np.unique(return_inverse=True) on the same number of uint64 elements, timed in the same run:
the ratio says how many such sorts the metrics cost.

  python benchmarks/metrics.py [--nodes 1000000] [--skeletons 1000] [--repeat 3] [--json OUT]
"""
import argparse
import os
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402

from iicats_cv.metrics import Skeleton, concatenate_skeletons, run_length_metrics  # noqa: E402

from bench_report import report

def tree_positions(parent, steps):
  """Node positions of a tree with parent[i] < i for i >= 1 (parent[0] = 0 is the root):
  vertex i = vertex parent[i] + steps[i]. Iterates to a fixed point (depth ~ log n)."""
  pos = steps.copy()
  while True:
    new = steps + pos[parent]
    new[0] = steps[0]
    if np.array_equal(new, pos):
      return pos
    pos = new


def subtree_labels(parent, cut):
  """Label of each node = index of its nearest cut ancestor (itself included); the root is
  always a cut. parent as in tree_positions, cut bool (N,)."""
  own = np.where(cut, np.arange(len(parent)), -1)
  own[0] = 0
  label = own.copy()
  while True:
    new = np.where(own >= 0, own, label[parent])
    if np.array_equal(new, label):
      return label
    label = new


def random_case(n_nodes, n_skeletons, seed=0):
  """Random tree skeletons and a segmentation of them.

  -> (SkeletonSet, node_segments uint64 (N,), nucleus_segments uint64 (M,),
  synapse_segments uint64 (P, 2)). Each skeleton is cut into ~64 subtrees (one segment each), 0.05%
  of nodes get a random other segment (merges), 1% segment 0 (omissions); 5% of the nuclei
  share a segment with another nucleus; synapses join random nodes."""
  rng = np.random.default_rng(seed)
  per = n_nodes // n_skeletons
  skeletons, pieces = [], []
  for s in range(n_skeletons):
    parent = np.concatenate([[0], (rng.random(per - 1) * np.arange(1, per)).astype(np.int64)])
    steps = rng.normal(0, 60, (per, 3))
    steps[0] = rng.uniform(0, 1e6, 3)
    edges = np.stack([np.arange(1, per), parent[1:]], axis=1)
    skeletons.append(Skeleton(s + 1, tree_positions(parent, steps), edges, soma=[0]))
    pieces.append(s * per + subtree_labels(parent, rng.random(per) < 64 / per) + 1)
  flat = concatenate_skeletons(skeletons)
  segs = np.concatenate(pieces).astype(np.uint64)
  merged = rng.random(flat.n_nodes) < 0.0005
  segs[merged] = segs[rng.integers(0, flat.n_nodes, merged.sum())]
  segs[rng.random(flat.n_nodes) < 0.01] = 0
  nuclei = segs[flat.soma_node].copy()
  k = n_skeletons // 20
  nuclei[:k] = nuclei[k:2 * k]
  synapses = segs[rng.integers(0, flat.n_nodes, (n_skeletons * 10, 2))]
  return flat, segs, nuclei, synapses


def split_skeletons(flat):
  """The SkeletonSet back as a list of Skeleton (to time concatenate_skeletons)."""
  out = []
  for s in range(flat.n_skeletons):
    lo, hi = flat.node_offsets[s], flat.node_offsets[s + 1]
    edges = flat.edges[(flat.edges[:, 0] >= lo) & (flat.edges[:, 0] < hi)] - lo
    out.append(Skeleton(int(flat.ids[s]), flat.vertices_nm[lo:hi], edges, soma=[0]))
  return out


def timed(fn, repeat):
  best = np.inf
  for _ in range(repeat):
    started = time.perf_counter()
    value = fn()
    best = min(best, time.perf_counter() - started)
  return best, value


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--nodes", type=int, default=1_000_000)
  parser.add_argument("--skeletons", type=int, default=1000)
  parser.add_argument("--repeat", type=int, default=3)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  if hasattr(os, "sched_setaffinity"):  # one core
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  flat, segs, nuclei, synapses = random_case(args.nodes, args.skeletons)
  skeleton_list = split_skeletons(flat)
  concat_s, _ = timed(lambda: concatenate_skeletons(skeleton_list), args.repeat)
  metrics_s, result = timed(lambda: run_length_metrics(flat, segs, nuclei, synapses), args.repeat)
  summary_s, _ = timed(lambda: run_length_metrics(flat, segs, nuclei, synapses, details=False),
                       args.repeat)
  pooled_s, pooled = timed(lambda: run_length_metrics(flat, segs, nuclei, synapses, pooled=True),
                           args.repeat)
  reference = np.random.default_rng(1).integers(0, 2 ** 40, flat.n_nodes).astype(np.uint64)
  ref_s, _ = timed(lambda: np.unique(reference, return_inverse=True), args.repeat)
  out = {
    "nodes": flat.n_nodes, "edges": int(len(flat.edges)), "skeletons": flat.n_skeletons,
    "seconds": round(metrics_s, 4), "seconds_no_details": round(summary_s, 4),
    "seconds_pooled": round(pooled_s, 4), "seconds_concatenate": round(concat_s, 4),
    "reference_np_unique_seconds": round(ref_s, 4),
    "ratio_to_np_unique": round(metrics_s / ref_s, 2),
    "erl": result["erl"], "berl": result["berl"], "nerl": result["nerl"],
    "erl_pooled": pooled["erl"], "merging_segments": len(result["merging_segments"]),
    "violating_segments": len(result["violating_segments"]),
  }
  report(out, f"ERL/bERL/nERL on {flat.n_nodes} nodes: {metrics_s:.3f} s with per-skeleton details "
              f"({summary_s:.3f} s without; pooled {pooled_s:.3f} s; concatenating {flat.n_skeletons} "
              f"Skeletons {concat_s:.3f} s); np.unique on as many uint64: "
              f"{ref_s:.3f} s; ratio {metrics_s / ref_s:.1f}",
              args.json)


if __name__ == "__main__":
  main()
