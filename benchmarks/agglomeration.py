"""How far the global agglomeration step scales: peak memory per RAG edge and edges/s.

A random RAG (each fragment joined to nearby ids, counts 1-200, mean affinities uniform) is
agglomerated with and without constraints at threshold 0.5. The reference is `merge_rags` on
the same edges, timed in the same run (the numpy pass that every global step starts with):
ratio = agglomeration seconds / merge_rags seconds. Peak memory is the growth of this
process' maximum resident set during the agglomeration, per edge.

  python benchmarks/agglomeration.py [--edges 2000000] [--json OUT]
"""
import argparse
import resource
import time

import numpy as np

from iicats_cv.agglomerate import AgglomerationParams, agglomerate
from iicats_cv.rag import FRAGMENT_FIELDS, merge_rags
from bench_report import report


def random_rag(edges: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  fragments = edges // 4
  u = rng.integers(0, fragments, edges)
  v = (u + rng.integers(1, 50, edges)) % fragments
  pairs = np.unique(np.stack([np.minimum(u, v), np.maximum(u, v)], 1), axis=0) + 1
  count = rng.integers(1, 200, len(pairs))
  rag = {"u": pairs[:, 0].astype(np.uint64), "v": pairs[:, 1].astype(np.uint64),
         "count": count, "aff_sum": count * rng.uniform(0, 1, len(pairs)),
         "aff_min": np.zeros(len(pairs)), "mito_pairs": np.zeros(len(pairs), np.int64),
         "synapse_pairs": np.zeros(len(pairs), np.int64),
         "frag_id": np.arange(1, fragments + 1, dtype=np.uint64)}
  for field in FRAGMENT_FIELDS[1:]:
    rag[f"frag_{field}"] = np.full(fragments, 100.0 if field == "size" else 0.0)
  return rag


def peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--edges", type=int, default=2_000_000)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  rag = random_rag(args.edges)
  edges = len(rag["u"])
  before = peak_mb()
  started = time.perf_counter()
  agglomerate(rag, AgglomerationParams(threshold=0.5, use_constraints=False))
  seconds = time.perf_counter() - started
  bytes_per_edge = (peak_mb() - before) * 2 ** 20 / edges
  started = time.perf_counter()
  agglomerate(rag, AgglomerationParams(threshold=0.5))
  constrained_s = time.perf_counter() - started
  started = time.perf_counter()  # after the memory measurement: its temporaries would hide it
  merge_rags([rag])
  reference_s = time.perf_counter() - started
  out = {"edges": edges, "fragments": int(len(rag["frag_id"])), "seconds": seconds,
         "constrained_seconds": constrained_s, "edges_per_s": edges / seconds,
         "peak_bytes_per_edge": bytes_per_edge, "merge_rags_seconds": reference_s,
         "ratio": seconds / reference_s,
         "edges_in_24_gib": int(24 * 2 ** 30 / bytes_per_edge)}
  report(out, f"{edges} edges: {edges / seconds:.0f} edges/s ({out['ratio']:.0f}× merge_rags), "
              f"peak {bytes_per_edge:.0f} B/edge: about {out['edges_in_24_gib']:.1e} edges "
              f"in 24 GiB for the global step", args.json)


if __name__ == "__main__":
  main()
