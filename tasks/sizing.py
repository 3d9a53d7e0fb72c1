"""Worker memory per task, estimated before a run from the task shape (Igneous users ask for
it up front: a fleet is sized before the first task fails for memory)."""
from __future__ import annotations

import os

import numpy as np

from .segmentation import context_voxels

STAGES = ("inference", "watershed", "rag", "remap")
GIB = 2 ** 30
# Peak resident memory of a fresh worker process running one task = FIXED + PER_VOXEL × the
# voxels the stage holds: the block with the patches that cross its faces for inference (the
# default model's patch, 48 voxels, on each side), with its context for the watershed, the
# block alone for rag and remap. Least-squares fits to the blocks at the origin of 64³-256³
# tasks, `python benchmarks/task_memory.py --run OUT --shapes 64,128,192,256,320` on the FIB
# volume (10 nm, one torch thread, the process's own VmHWM; 2026-12-06); the 320³ tasks, left
# out of the fit, came out at 0.99-1.02 of their estimates (watershed and rag refitted the
# same way after their copies were cut: 74.0 -> 51.5 and 76.6 -> 50.3 bytes per voxel).
# FIXED holds the ~0.33 GiB of libraries a worker imported. Since 2026-12-07 only inference
# imports PyTorch: the other stages' workers peaked 0.15-0.2 GiB lower on a small run (0.18-0.22
# against 0.36-0.39 GiB), so their estimates are that much on the safe side (not refitted).
# Local `-p N` workers are forked from a fork server since then too (runner._worker_context)
# and peak lower still (0.12-0.16 GiB on that run): library pages they never touch are not
# in their resident set.
FIXED = {"inference": 0.560 * GIB, "watershed": 0.331 * GIB, "rag": 0.325 * GIB,
         "remap": 0.329 * GIB}
PER_VOXEL = {"inference": 28.6, "watershed": 51.5, "rag": 50.3, "remap": 24.1}
PATCH_MARGIN = 48
# The global agglomeration step holds every RAG edge: about 550 bytes each (553 merging block
# RAGs in benchmarks/hierarchy.py). The FIB volume (10 nm, 250³, one task) had 36872 edges: 2360
# per µm³, a density that depends on the tissue and the fragments, so only a guide.
BYTES_PER_EDGE = 550
EDGES_PER_CUBIC_UM = 2360
# A long-lived worker that has run many tasks peaked up to 10% above a fresh process running
# one (inference of 128³ tasks: 0.77 vs 0.70 GiB), and inference's peak varied by 5-10%
# between two benchmark runs, so the per-worker figure adds a quarter.
WORKER_MARGIN = 1.25


def _extents(size: int, side: int, margin: int) -> list[int]:
  """Along one axis of `size` voxels cut into blocks of `side`: each block's extent with
  `margin` on both sides, clipped to the volume."""
  return [min(size, start + side + margin) - max(0, start - margin)
          for start in range(0, size, side)]


def _largest_read(size: int, side: int, margin: int, first_only: bool) -> int:
  extents = _extents(size, side, margin)
  return extents[0] if first_only else max(extents)


def task_memory(task_shape, resolution, volume_size=None, at_origin: bool = False) -> dict:
  """Estimated peak resident bytes of a worker running the largest task of each stage.

  task_shape, volume_size: (x, y, z) voxels (volume_size None: a volume much larger than a
  task); resolution: (x, y, z) nm, which sets the watershed's context
  (segmentation.context_voxels). at_origin: the block at the volume's origin only, whose
  context and patch margin lie on its high faces. Returns {stage: bytes} for STAGES."""
  shape = np.asarray(task_shape, dtype=np.int64)
  if volume_size is None:
    volume_size = shape * 4
  margins = {"inference": np.full(3, PATCH_MARGIN), "watershed": context_voxels(None, resolution),
             "rag": np.zeros(3, int), "remap": np.zeros(3, int)}
  return {stage: int(FIXED[stage] + PER_VOXEL[stage] * np.prod(
    [_largest_read(int(n), int(t), int(m), at_origin)
     for n, t, m in zip(volume_size, shape, margins[stage])], dtype=np.float64))
    for stage in STAGES}


def worker_memory(task_shape, resolution, volume_size=None, estimates=None) -> tuple[int, str]:
  """(bytes to give each worker, the stage that needs them): the largest stage's estimate
  (task_memory's, or the `estimates` given), with WORKER_MARGIN."""
  if estimates is None:
    estimates = task_memory(task_shape, resolution, volume_size)
  stage = max(estimates, key=estimates.get)
  return int(estimates[stage] * WORKER_MARGIN), stage


# cgroup v2, then v1: a container's (Kubernetes pod's, SLURM job's) limit, which the physical
# memory the OS reports does not show
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory() -> int | None:
  """The memory this process may use, in bytes: the machine's physical memory, or its
  container's limit where that is lower (None where neither is known)."""
  try:
    sizes = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
  except (ValueError, OSError, AttributeError):
    sizes = []
  for path in CGROUP_LIMITS:
    try:
      with open(path) as fh:
        text = fh.read().strip()
    except OSError:
      continue
    if text.isdigit():  # "max": no limit
      sizes.append(int(text))
  return min(sizes) if sizes else None


def memory_plan(task_shape, resolution, volume_size, parallel: int | None
                ) -> tuple[int, list[str]]:
  """(bytes to give each worker, the lines printed before a run's first stage): the estimate,
  and a warning where `parallel` local workers would need more than this machine has."""
  per_worker, stage = worker_memory(task_shape, resolution, volume_size)
  shape = "×".join(str(int(s)) for s in task_shape)
  line = (f"memory: give each worker about {per_worker / GIB:.2f} GiB for {shape} tasks "
          f"(largest: {stage}); the agglomerate step holds ~{BYTES_PER_EDGE} bytes per RAG edge")
  total, workers = machine_memory(), parallel or 1
  if workers < 2 or not total:
    return per_worker, [line]
  line += (f"; {workers} local workers: {workers * per_worker / GIB:.1f} of this machine's "
           f"{total / GIB:.1f} GiB")
  if workers * per_worker <= total:
    return per_worker, [line]
  return per_worker, [line, f"warning: {workers} local workers of {shape} tasks may need more "
                            "memory than this machine has: lower -p or --task-shape"]


def design(task_shapes, resolution, volume_size) -> list[dict]:
  """Per task shape: {"task_shape", "tasks", "stages": {stage: bytes}, "worker": bytes,
  "largest": stage, "watershed_reads": the voxels all watershed tasks read with their
  context ÷ the region's, which their compute grows with} for a region of volume_size
  (x, y, z) voxels at resolution (x, y, z) nm."""
  context = context_voxels(None, resolution)
  rows = []
  for shape in task_shapes:
    stages = task_memory(shape, resolution, volume_size)
    worker, largest = worker_memory(shape, resolution, estimates=stages)
    tasks = int(np.prod([-(-int(n) // int(t)) for n, t in zip(volume_size, shape)]))
    reads = np.prod([sum(_extents(int(n), int(t), int(c))) / int(n)
                     for n, t, c in zip(volume_size, shape, context)])
    rows.append({"task_shape": tuple(int(t) for t in shape), "tasks": tasks,
                 "stages": stages, "worker": worker, "largest": largest,
                 "watershed_reads": float(reads)})
  return rows


def agglomeration_memory(resolution, volume_size) -> tuple[int, int]:
  """(RAG edges, bytes of the flat global step) expected for the region, at the FIB volume's
  edge density (EDGES_PER_CUBIC_UM)."""
  cubic_um = float(np.prod(np.asarray(volume_size, float) * np.asarray(resolution, float))) / 1e9
  edges = int(EDGES_PER_CUBIC_UM * cubic_um)
  return edges, edges * BYTES_PER_EDGE
