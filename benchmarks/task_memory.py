"""Worker memory per task: the estimate printed before a run (tasks/sizing.py) against the peak
resident memory (VmHWM) of a fresh worker process that runs one task, per stage and shape.

From a finished run (--run OUT: its image, affinities, organelles and agglomeration table),
scratch layers of (task shape + 128) voxels a side are made by mirroring the run's layers,
and the tasks of the block at the origin (whose watershed context and inference patches lie
inside the volume on its high faces) run stage by stage, each in a new spawned process as a
worker runs it (torch on one thread; inference shares patches as the pipeline's does).
ratio = estimate / measured peak.

  python benchmarks/task_memory.py --run file:///tmp/fib-run [--shapes 64,128,256] [--json OUT]
"""
import argparse
import multiprocessing
import shutil
import tempfile

import numpy as np

from iicats_cv.layers import create_layer, join, open_layer
from iicats_cv.tasks import inference as inference_tasks
from iicats_cv.tasks import segmentation as seg
from iicats_cv.tasks.common import get_npz, put_npz
from iicats_cv.tasks.runner import gib_text, peak_memory_bytes
from iicats_cv.tasks.sizing import STAGES, task_memory

from bench_report import report


def mirrored(volume: np.ndarray, size) -> np.ndarray:
  """(X, Y, Z, ...) volume tiled to size (x, y, z) by reflection."""
  pad = [(0, max(0, s - n)) for s, n in zip(size, volume.shape[:3])] + [(0, 0)] * (
    volume.ndim - 3)
  while any(p for _, p in pad[:3]):
    step = [(0, min(p, n)) for (_, p), n in zip(pad[:3], volume.shape[:3])] + pad[3:]
    volume = np.pad(volume, step, mode="symmetric")
    pad = [(0, max(0, s - n)) for s, n in zip(size, volume.shape[:3])] + pad[3:]
  return volume[:size[0], :size[1], :size[2]]


def scratch_copy(run: str, root: str, size) -> dict:
  """The run's input and inference layers mirrored to size -> {name: cloudpath}."""
  paths = {}
  for name, source in (("image", None), ("affinities", "affinities"),
                       ("organelles", "organelles")):
    cv = open_layer(join(run, source) if source else _image_of(run))
    data = mirrored(np.asarray(cv[cv.bounds]), size)
    path = paths[name] = f"file://{root}/{name}"
    create_layer(path, layer_type="image", dtype=str(cv.dtype), resolution=cv.resolution,
                 voxel_offset=(0, 0, 0), volume_size=size, chunk_size=cv.chunk_size,
                 num_channels=data.shape[3], step="benchmark", params={"mirrored": run})
    open_layer(path)[:, :, :] = data
  return paths


def _image_of(run):
  from iicats_cv.tasks.common import get_json
  return get_json(join(run, "pipeline"), "run.json")["image"]


def _peak_of_task(task, result):
  inference_tasks.TORCH_THREADS = 1  # as runner._worker: torch on one thread, when imported
  task()
  result.put(peak_memory_bytes())


def measure(task) -> int:
  """Peak resident bytes of a new spawned process that runs task (picklable)."""
  ctx = multiprocessing.get_context("spawn")
  result = ctx.SimpleQueue()
  proc = ctx.Process(target=_peak_of_task, args=(task, result))
  proc.start()
  proc.join()
  if proc.exitcode:
    raise SystemExit(f"task {task} failed (exit {proc.exitcode})")
  return result.get()


def origin_tasks(run, root, paths, shape):
  """(stage, task of the block at the origin) in stage order, each stage's inputs written."""
  out = f"file://{root}/out"
  supervoxels, segmentation = f"file://{root}/supervoxels", f"file://{root}/segmentation"
  yield "inference", inference_tasks.create_inference_tasks(
    paths["image"], f"file://{root}/affinities_out", f"file://{root}/organelles_out",
    task_shape=shape)[0]
  yield "watershed", seg.create_watershed_tasks(paths["affinities"], supervoxels, shape)[0]
  yield "rag", seg.create_rag_tasks(supervoxels, paths["affinities"], paths["organelles"],
                                    f"file://{root}/rag", shape)[0]
  table = get_npz(run, "agglomeration/table.npz")
  put_npz(out, "agglomeration/table.npz", {k: table[k] for k in ("fragment_ids",
                                                                  "segment_ids")})
  yield "remap", seg.create_remap_tasks(supervoxels, segmentation, out, shape)[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--run", required=True, help="a finished `iicats pipeline` OUT")
  parser.add_argument("--shapes", default="64,128,256", help="cubic task sides")
  parser.add_argument("--stages", default=",".join(STAGES), help="the stages to measure")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  measured = args.stages.split(",")
  rows = []
  for side in (int(s) for s in args.shapes.split(",")):
    shape = (side, side, side)
    root = tempfile.mkdtemp(prefix="iicats-memory-bench-")
    size = (side + 128,) * 3
    paths = scratch_copy(args.run, root, size)
    resolution = open_layer(paths["image"]).resolution
    for stage, task in origin_tasks(args.run, root, paths, shape):
      if stage not in measured:
        if stage == "watershed":  # the later stages read its supervoxels
          task()
        continue
      peak = measure(task)
      estimate = task_memory(shape, resolution, volume_size=size, at_origin=True)[stage]
      rows.append({"task_shape": side, "stage": stage, "measured_bytes": peak,
                   "estimate_bytes": estimate, "ratio": estimate / peak})
      print(f"{side}³ {stage:10s} measured {gib_text(peak)}  estimate {gib_text(estimate)}  "
            f"ratio {estimate / peak:.2f}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
  ratios = [row["ratio"] for row in rows]
  out = {"rows": rows, "ratio": min(ratios), "ratio_max": max(ratios), "stages": measured}
  report(out, f"task memory estimate / measured worker peak: {min(ratios):.2f}-"
              f"{max(ratios):.2f} over {len(rows)} tasks", args.json)


if __name__ == "__main__":
  main()
