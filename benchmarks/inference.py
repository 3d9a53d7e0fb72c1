"""Inference pipeline throughput vs the raw model forward pass, measured in one run.

pipeline: `iicats infer`'s tasks (read through CloudVolume, patch grid, batched forward,
bump blending, quantisation, chunk-aligned writes) over a volume of several tasks.
raw forward: the same model on the same number of patches, already in memory, same batch size.
ratio = pipeline voxels/s ÷ raw forward voxels/s, both counted as output voxels of the volume,
each the best of --repeats interleaved runs.

  python benchmarks/inference.py [--checkpoint CKPT] [--shape 192,192,96] [--repeats 3] [--json OUT]
"""
import argparse
import tempfile
import time

import numpy as np
import torch

from iicats_cv.inference import default_overlap, patches_for_block
from iicats_cv.model import load_checkpoint, normalize_image, reuse_freed_memory
from iicats_cv.synthetic import make_synthetic_volume
from iicats_cv.tasks.inference import create_inference_tasks
from iicats_cv.tasks.runner import run_tasks
from iicats_cv.volume_io import import_volume

from bench_report import report

def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoint", default=None)
  parser.add_argument("--shape", default="192,192,96")
  parser.add_argument("--task-shape", default="128,128,64")
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3,
                      help="interleaved runs of each; the best of each is compared")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  shape = tuple(int(v) for v in args.shape.split(","))
  task_shape = tuple(int(v) for v in args.task_shape.split(","))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    reuse_freed_memory()  # as the tasks do: both sides run with the same allocator settings
  model, _ = load_checkpoint(args.checkpoint, device=device)
  image = make_synthetic_volume(shape=shape, seed=5).image
  root = tempfile.mkdtemp(prefix="iicats-bench-")
  image_path = import_volume(image, f"file://{root}/image", "image", (10, 10, 10))

  patch = np.array(model.config.patch_size)
  start, stop = np.zeros(3, int), np.array(shape)
  starts = patches_for_block(start, stop, start, stop, patch, patch - default_overlap(patch))
  tiles = np.stack([normalize_image(image[tuple(slice(s, s + p) for s, p in zip(st, patch))],
                                    model.config) for st in starts])[:, None]
  use_amp = device == "cuda"

  def raw_forward() -> float:
    if device == "cuda":
      torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(0, len(tiles), args.batch_size):
      x = torch.from_numpy(tiles[i:i + args.batch_size]).to(device)
      with torch.autocast(device_type="cuda", enabled=use_amp):
        torch.sigmoid(model(x).float()).cpu()
    if device == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - started

  def pipeline(run: int) -> float:
    tasks = create_inference_tasks(image_path, f"file://{root}/aff{run}",
                                   f"file://{root}/org{run}", args.checkpoint, task_shape,
                                   batch_size=args.batch_size)
    started = time.perf_counter()
    run_tasks(tasks, None, 1, desc="inference")
    return time.perf_counter() - started

  with torch.no_grad():
    with torch.autocast(device_type="cuda", enabled=use_amp):
      model(torch.from_numpy(tiles[:args.batch_size]).to(device))  # warm-up
    # interleaved, best of each: a shared machine's slow spells hit both sides alike
    raw_times, pipeline_times = [], []
    for run in range(args.repeats):
      raw_times.append(raw_forward())
      pipeline_times.append(pipeline(run))
  raw_s, pipeline_s = min(raw_times), min(pipeline_times)
  voxels = int(np.prod(shape))
  out = {"device": device if device == "cpu" else torch.cuda.get_device_name(),
         "voxels": voxels, "patches": int(len(starts)),
         "raw_forward_s": raw_times, "pipeline_s": pipeline_times,
         "pipeline_vx_per_s": voxels / pipeline_s, "raw_forward_vx_per_s": voxels / raw_s,
         "ratio": raw_s / pipeline_s}
  report(out, f"pipeline {out['pipeline_vx_per_s'] / 1e6:.2f} Mvx/s, raw forward "
              f"{out['raw_forward_vx_per_s'] / 1e6:.2f} Mvx/s, ratio {out['ratio']:.2f} on {out['device']}",
              args.json)


if __name__ == "__main__":
  main()
