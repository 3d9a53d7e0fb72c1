"""Meshing + skeletonising through our queue vs Igneous' own LocalTaskQueue, same layer, one run.

Both sides run the same Igneous tasks (zmesh meshes merged into multi-resolution Draco shards,
kimimaro skeletons merged into shards: the pipeline defaults) on
a copy of one segmentation: the FIB crop's dense ground truth shipped in the package
(200×200×100, 142 bodies). ours = `iicats_cv.tasks.runner.run_tasks` on an fq:// queue with
one in-process worker (attempt counting, leases, dead letters); reference = Igneous' usual
`LocalTaskQueue(parallel=1).insert_all(tasks)`. ratio = ours seconds / reference seconds.

  python benchmarks/meshing.py [--task-shape 128,128,128] [--json OUT]
"""
import argparse
import shutil
import tempfile
import time

from taskqueue import LocalTaskQueue

from iicats_cv.datasets import load_fib_crop
from iicats_cv.tasks import igneous_stages as ig
from iicats_cv.tasks.runner import run_tasks
from iicats_cv.volume_io import import_volume

from bench_report import report

def stages(path, task_shape):
  return [lambda: ig.mesh_tasks(path, task_shape), lambda: ig.mesh_merge_tasks(path),
          lambda: ig.skeleton_tasks(path, task_shape), lambda: ig.skeleton_merge_tasks(path)]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--task-shape", default="128,128,128")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  task_shape = tuple(int(v) for v in args.task_shape.split(","))
  _, labels, resolution = load_fib_crop()
  root = tempfile.mkdtemp(prefix="iicats-mesh-bench-")
  paths = {}
  for side in ("ours", "igneous"):
    paths[side] = import_volume(labels, f"file://{root}/{side}", "segmentation", resolution)
  seconds = {}
  for side in ("igneous", "ours"):
    started = time.perf_counter()
    for make in stages(paths[side], task_shape):
      tasks = list(make())
      if side == "ours":
        run_tasks(tasks, None, 1, desc="bench")
      else:
        LocalTaskQueue(parallel=1, progress=False).insert_all(tasks)
    seconds[side] = time.perf_counter() - started
  checks = {side: ig.validate_layer(path) for side, path in paths.items()}
  if any(check["problems"] for check in checks.values()):
    raise SystemExit(f"incomplete output: {checks}")
  shutil.rmtree(root, ignore_errors=True)
  out = {"task_shape": list(task_shape), "ours_seconds": round(seconds["ours"], 2),
         "igneous_seconds": round(seconds["igneous"], 2),
         "ratio": seconds["ours"] / seconds["igneous"],
         "labels_validated": {s: c["labels_checked"] for s, c in checks.items()}}
  report(out, f"meshes + skeletons: ours {seconds['ours']:.1f} s vs Igneous LocalTaskQueue "
              f"{seconds['igneous']:.1f} s: ratio {out['ratio']:.2f}",
              args.json)


if __name__ == "__main__":
  main()
