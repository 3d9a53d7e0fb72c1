"""How far hierarchical agglomeration takes the global step: its edges and peak memory.

A fragment lattice stands in for a watershed's RAG: B×B×B blocks of F×F×F fragments, each
fragment joined to its 6 face neighbours (an edge across a block face is stored in the upper
block's RAG, as rag_task does). Neurons are Voronoi cells about --neuron fragments across, so
most of them cross block faces; a boundary's mean affinity is drawn around 0.72 inside a
neuron and 0.30 between neurons (sd 0.12), over 20-400 voxel pairs. The block RAGs go to a
local bucket and the project's own tasks run on them: `reduce_task` for every part of every
level (--parallel processes), then the global step (`_stitched_rag` + `agglomerate`, what
`agglomerate_task` runs). Each task runs in a fresh process, whose peak resident memory is
recorded above what the worker held before it (imports done).

The reference, in the same run (unless --no-flat), is the flat global step over the same block
RAGs: ratios are hierarchical / flat for the global step's edges and its peak memory, and
the adapted Rand error between the two segment tables says what the hierarchy changed.

  python benchmarks/hierarchy.py [--blocks 4] [--fragments 24] [--levels 2] [--json OUT]
"""
import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
from scipy.spatial import cKDTree
from tqdm import tqdm

from bench_report import report

TASK = 64  # nominal voxels per block edge: only names the blocks (their voxel origins)


def _memory_kb(field: str) -> int:
  with open("/proc/self/status") as fh:
    return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _peak_mb(fn, *args):
  """Run fn(*args) in this (fresh) worker; return (its result, MB of peak resident memory
  above what the worker held before, its imports done)."""
  import iicats_cv.tasks.segmentation  # noqa: F401  (what every task process imports)
  with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # restart the peak (VmHWM) from the current resident set
  before = _memory_kb("VmRSS")
  result = fn(*args)
  return result, (_memory_kb("VmHWM") - before) / 1024


def _in_fresh_processes(jobs, parallel, desc):
  """[(fn, args)] each in its own spawned process -> [(result, peak MB)] in order."""
  context = get_context("spawn")
  with ProcessPoolExecutor(parallel, mp_context=context, max_tasks_per_child=1) as pool:
    futures = [pool.submit(_peak_mb, fn, *args) for fn, args in jobs]
    return [f.result() for f in tqdm(futures, desc=desc, unit="task")]


def write_block_rags(prefix: str, blocks: int, fragments: int, neuron: float, seed: int):
  """Block RAGs of the lattice under prefix -> (fragment ids (N,) uint64, the neuron of each
  (N,) int64, edges written)."""
  from iicats_cv.rag import FRAGMENT_FIELDS
  from iicats_cv.tasks.common import block_name, put_npz
  side = blocks * fragments
  rng = np.random.default_rng(seed)
  centres = rng.uniform(0, side, (max(int((side / neuron) ** 3), 2), 3))
  tree = cKDTree(centres)
  grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
  neuron_of = np.empty(len(grid), np.int64)
  for start in range(0, len(grid), 1 << 22):
    neuron_of[start:start + (1 << 22)] = tree.query(grid[start:start + (1 << 22)])[1]
  neuron_of = neuron_of.reshape(side, side, side)
  del grid
  ids = np.arange(1, side ** 3 + 1, dtype=np.uint64).reshape(side, side, side, order="F")
  local = np.stack(np.meshgrid(*[np.arange(fragments)] * 3, indexing="ij"), -1).reshape(-1, 3)
  edges = 0
  for index in tqdm(np.ndindex(blocks, blocks, blocks), total=blocks ** 3, desc="block RAGs",
                    unit="block"):
    block_rng = np.random.default_rng([seed, *index])
    cells = local + np.asarray(index) * fragments
    u, v, same = [], [], []
    for axis in range(3):
      upper = cells[cells[:, axis] > 0]          # pairs (cell - e_axis, cell), cell here
      lower = upper.copy()
      lower[:, axis] -= 1
      u.append(ids[tuple(lower.T)])
      v.append(ids[tuple(upper.T)])
      same.append(neuron_of[tuple(lower.T)] == neuron_of[tuple(upper.T)])
    u, v, same = np.concatenate(u), np.concatenate(v), np.concatenate(same)
    mean = np.clip(np.where(same, 0.72, 0.30) + block_rng.normal(0, 0.12, len(u)), 0, 1)
    count = block_rng.integers(20, 400, len(u))
    zeros = np.zeros(len(u), np.int64)
    rag = {"u": np.minimum(u, v), "v": np.maximum(u, v), "count": count,
           "aff_sum": mean * count, "aff_min": np.zeros(len(u)), "mito_pairs": zeros,
           "nucleus_pairs": zeros, "synapse_pairs": zeros, "synapse_aff_sum": zeros * 0.0,
           "stitch": zeros, "frag_id": np.sort(ids[tuple(cells.T)])}
    rag["frag_size"] = np.full(len(cells), 500.0)
    for field in FRAGMENT_FIELDS[2:]:
      rag[f"frag_{field}"] = np.zeros(len(cells))
    put_npz(prefix, block_name(np.asarray(index) * TASK) + ".npz", rag)
    edges += len(u)
  return ids.ravel(order="F"), neuron_of.ravel(order="F"), edges


def global_step(rag_prefix: str, hierarchy_prefix: str, threshold: float):
  """What agglomerate_task holds in memory: the stitched RAG and one agglomeration."""
  from iicats_cv.agglomerate import AgglomerationParams, agglomerate
  from iicats_cv.tasks.segmentation import _stitched_rag
  fragment_ids, node_of, rag, _ = _stitched_rag(rag_prefix, hierarchy_prefix)
  result = agglomerate(rag, AgglomerationParams(threshold=threshold))
  segment = result.segment_ids[np.searchsorted(result.fragment_ids, node_of)]
  return len(rag["u"]), fragment_ids, segment


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--blocks", type=int, default=4, help="blocks along each axis")
  parser.add_argument("--fragments", type=int, default=24, help="fragments per block edge")
  parser.add_argument("--neuron", type=float, default=None,
                      help="neuron diameter in fragments (default: one block)")
  parser.add_argument("--part", type=int, default=2, help="parts of N×N×N (blocks, parts)")
  parser.add_argument("--levels", type=int, default=2)
  parser.add_argument("--threshold", type=float, default=0.5)
  parser.add_argument("--parallel", type=int, default=2)
  parser.add_argument("--no-flat", action="store_true",
                      help="skip the flat reference (for RAGs too big for it)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=None, help="bucket folder (default: a temp dir)")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  from cloudvolume import CloudVolume
  from iicats_cv.metrics import adapted_rand_error
  from iicats_cv.tasks.common import get_npz
  from iicats_cv.tasks.segmentation import create_reduce_tasks, level_prefix

  work = args.workdir or tempfile.mkdtemp(prefix="iicats-hierarchy-")
  bucket = "file://" + os.path.abspath(work)
  started = time.perf_counter()
  ids, neuron_of, edges = write_block_rags(bucket + "/rag", args.blocks, args.fragments,
                                           args.neuron or args.fragments, args.seed)
  generate_s = time.perf_counter() - started
  side = args.blocks * TASK
  info = CloudVolume.create_new_info(1, "segmentation", "uint64", "raw", [1, 1, 1], [0, 0, 0],
                                     [side] * 3, chunk_size=[TASK] * 3)
  CloudVolume(bucket + "/supervoxels", info=info).commit_info()

  hierarchy = bucket + "/hierarchy"
  levels = []
  for level in range(1, args.levels + 1):
    tasks = create_reduce_tasks(bucket + "/supervoxels", bucket + "/rag", hierarchy,
                                [TASK] * 3, args.part, args.threshold, level=level)
    started = time.perf_counter()
    peaks = [mb for _, mb in _in_fresh_processes([(t, ()) for t in tasks], args.parallel,
                                                 f"reduce level {level}")]
    level_edges = sum(len(get_npz(level_prefix(hierarchy, level), f"{t.keywords['name']}.npz")
                          ["u"]) for t in tasks)
    levels.append({"level": level, "parts": len(tasks), "seconds": time.perf_counter() - started,
                   "max_part_peak_mb": max(peaks), "edges_out": level_edges})
  runs = {"hierarchical": (global_step, (bucket + "/rag", level_prefix(hierarchy, args.levels),
                                         args.threshold))}
  if not args.no_flat:
    runs["flat"] = (global_step, (bucket + "/rag", "", args.threshold))
  out = {"edges": edges, "fragments": int(len(ids)), "blocks": args.blocks ** 3,
         "generate_seconds": generate_s, "levels": levels}
  tables = {}
  for name, (fn, fn_args) in runs.items():
    started = time.perf_counter()
    (global_edges, fragment_ids, segment), peak = _in_fresh_processes([(fn, fn_args)], 1,
                                                                      f"{name} global step")[0]
    tables[name] = segment[np.argsort(fragment_ids)]
    out[name] = {"global_edges": global_edges, "seconds": time.perf_counter() - started,
                 "peak_mb": peak,
                 "arand_vs_truth": float(adapted_rand_error(tables[name], neuron_of + 1))}
  hier = out["hierarchical"]
  out["max_task_peak_mb"] = max(hier["peak_mb"], *[lv["max_part_peak_mb"] for lv in levels])
  summary = (f"{edges:.2e} edges in {args.blocks ** 3} blocks, {args.levels} level(s) of "
             f"{args.part}³ parts: global step {hier['global_edges']:.2e} edges, "
             f"{hier['peak_mb']:.0f} MB")
  if "flat" in out:
    flat = out["flat"]
    out["edges_ratio"] = hier["global_edges"] / flat["global_edges"]
    out["memory_ratio"] = hier["peak_mb"] / flat["peak_mb"]
    out["arand_vs_flat"] = float(adapted_rand_error(tables["hierarchical"], tables["flat"]))
    summary += (f" = {out['edges_ratio']:.3f}× the flat step's edges and "
                f"{out['memory_ratio']:.3f}× its memory, ARAND {out['arand_vs_flat']:.4f} "
                "between them")
  summary += f"; largest task of the hierarchy: {out['max_task_peak_mb']:.0f} MB"
  report(out, summary, args.json)
  if not args.workdir:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
