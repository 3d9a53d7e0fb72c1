"""`iicats` command line: Igneous-style verbs over precomputed layers and task queues."""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time

import click

from .errors import FiniteFloatRange, IicatsError, output_file_option
from .layers import parse_triple


def _triple(name, cast=float, positive=True):
  def convert(ctx, param, value):
    if value is None:
      return None
    return parse_triple(value, f"--{param.name.replace('_', '-')}", cast, positive)
  return convert


def _queue_url(ctx, param, value):
  """--queue checked before a command writes anything (Igneous' task creation writes the
  layer's mesh, skeleton or scale info before the tasks reach a queue)."""
  from iicats_cv.tasks.runner import check_queue_url
  return value if value is None else check_queue_url(value)


@click.group()
@click.version_option(package_name="iicats-cv")
def cli():
  """II-CATS connectomics reconstruction over Neuroglancer precomputed layers.

  \b
  Quick start:
    iicats demo                      # embedded FIB-SEM crop, end to end
    iicats pipeline --image gs://bucket/em --out gs://bucket/run -p 4
  """


@cli.command("import")
@click.argument("src")
@click.argument("dest")
@click.option("--type", "layer_type", type=click.Choice(["image", "segmentation"]),
              required=True, help="Layer type.")
@click.option("--resolution", required=True, callback=_triple("resolution"),
              help="Voxel size in nm, X,Y,Z.")
@click.option("--axes", type=click.Choice(["zyx", "xyz"]), default="zyx", show_default=True,
              help="Axis order of the array in SRC.")
@click.option("--key", default=None, help="Array name in .npz / dataset in .h5.")
@click.option("--offset", default="0,0,0", callback=_triple("offset", int, positive=False),
              help="Voxel offset X,Y,Z.")
@click.option("--chunk-size", default="64,64,64", callback=_triple("chunk_size", int),
              help="Chunk size X,Y,Z.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing layer at DEST (its files, meshes and skeletons are "
                   "deleted first).")
def import_command(src, dest, layer_type, resolution, axes, key, offset, chunk_size, overwrite):
  """Write a .npy/.npz/.tif/.h5 volume, or a folder of 2D sections (.tif/.png, one per z in
  name order), as a precomputed layer.

  \b
  Example:
    iicats import stack.tif file://./data/em --type image --resolution 8,8,40
    iicats import sections/ gs://bucket/em --type image --resolution 4,4,40
    iicats import gt.h5 gs://bucket/gt --type segmentation --key labels --resolution 8,8,40
  """
  from .layers import local_path, normalize_cloudpath
  from .volume_io import read_array, to_xyz, import_volume, uint8_window
  folder = local_path(normalize_cloudpath(dest))
  if folder and os.path.commonpath([os.path.abspath(src), os.path.abspath(folder)]) == (
      os.path.abspath(folder)):
    raise IicatsError(f"{src}: lies inside DEST {dest}; write the layer elsewhere")
  array = to_xyz(read_array(src, key), axes, src)
  window, mapped = None, ""
  if layer_type == "image" and array.dtype != "uint8":
    window = uint8_window(array)
    mapped = f"; grey values {window[0]:g}-{window[1]:g} mapped to uint8 0-255"
  path = import_volume(array, dest, layer_type, resolution, offset=offset,
                       chunk_size=chunk_size, overwrite=overwrite, source=os.path.abspath(src),
                       window=window)
  click.echo(f"imported {src} {array.shape} {array.dtype} -> {path} ({layer_type}{mapped})")


def _command_line(ctx, omit=()) -> str:
  """The invocation, rebuilt from the parsed options (recorded in checkpoints); parameters
  named in `omit` are left out."""
  parts = ["iicats"] + ctx.command_path.split()[1:]
  for param in ctx.command.params:
    value = ctx.params.get(param.name)
    if value is None or value is False or value == () or not param.opts or param.name in omit:
      continue
    flag = max(param.opts, key=len)
    for item in (value if isinstance(value, tuple) and param.multiple else (value,)):
      if item is True:
        parts.append(flag)
      else:
        text = ",".join(str(v) for v in item) if isinstance(item, tuple) else str(item)
        parts += [flag, shlex.quote(text)]
  return " ".join(parts)


CONSTRAINTS = ("nucleus", "synapse", "mitochondria")
ARCHITECTURE_OPTIONS = ("patch_size", "anisotropic", "long_range", "widths")  # iicats train


def _constraint_list(ctx, param, value):
  if value is None:
    return None
  if value.strip() == "none":
    return ()
  names = tuple(v.strip() for v in value.split(",") if v.strip())
  if not names:
    raise click.BadParameter(f"'{value}': name the evidence ({', '.join(CONSTRAINTS)}), or "
                             "'none' for an agglomeration without constraints")
  unknown = [n for n in names if n not in CONSTRAINTS]
  if unknown:
    raise click.BadParameter(f"unknown constraint(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(CONSTRAINTS)}")
  return names


def _quantile(ctx, param, value):
  if value in (None, "mean", "learned"):
    return value
  try:
    q = float(value)
    assert 0 < q < 1
  except (ValueError, AssertionError):
    raise click.BadParameter(f"{value}: expected 'mean', 'learned' or a quantile between 0 "
                             "and 1")
  return q


def _pipeline_options(func):
  options = [
    click.option("--queue", default=None, callback=_queue_url,
                 help="Task queue (fq://PATH or sqs://NAME). Without -p, stages wait for "
                      "external workers (`iicats execute QUEUE`)."),
    click.option("-p", "--parallel", type=click.IntRange(min=0), default=None,
                 help="Run N local worker processes (default 1 when no --queue; with "
                      "--queue, none or 0 leaves the tasks to `iicats execute` workers)."),
    click.option("--task-shape", default="128,128,128", callback=_triple("task_shape", int),
                 help="Task (block) shape X,Y,Z in voxels; a multiple of 64."),
    click.option("--checkpoint", default=None,
                 help="Model checkpoint file, or a shipped model: 'default' (10 nm "
                      "isotropic EM), 'vnc' (ssTEM organelles)."),
    click.option("--json", "json_path", default=None, help="Write the run summary here."),
    click.option("--threshold", type=FiniteFloatRange(0, 1), default=None,
                 help="Agglomeration threshold (default: the checkpoint's calibrated one, "
                      "else 0.5)."),
    click.option("--baseline-threshold", type=FiniteFloatRange(0, 1), default=None,
                 help="Threshold of the unconstrained baseline agglomeration, when it should "
                      "be compared at its own calibrated threshold (default: --threshold)."),
    click.option("--link-prefix", default=None,
                 help="Neuroglancer client URL prefix for the printed link."),
    click.option("--constraints", default=None, callback=_constraint_list,
                 help="Organelle evidence used by agglomeration, comma-separated from "
                      "nucleus,synapse,mitochondria, or 'none' (default: the checkpoint's "
                      "calibrated choice, else all)."),
    click.option("--quantile", default=None, callback=_quantile,
                 help="Merge on this quantile of the boundary affinities (e.g. 0.75, as "
                      "waterz does; the RAG then keeps histograms), on their 'mean', or on "
                      "the checkpoint's 'learned' edge scorer (same-neuron probability; "
                      "`iicats calibrate` trains it) (default: the checkpoint's calibrated "
                      "choice, else the mean)."),
    click.option("--nucleus-fraction", type=FiniteFloatRange(0, 1, min_open=True), default=None,
                 help="A fragment counts as nuclear when this share of its voxels is predicted "
                      "nucleus (default 0.5). Lower it (e.g. 0.1) where the watershed does not "
                      "cut at the nuclear envelope, so each nucleus spans fragments that are "
                      "mostly cytoplasm; raise it to keep false nucleus predictions out."),
    click.option("--min-segment-voxels", type=click.IntRange(min=0), default=None,
                 help="After agglomeration, join every segment smaller than this many voxels "
                      "to its best-scoring neighbour, constraints honoured (0: off; default: "
                      "the checkpoint's calibrated choice, else 0)."),
    click.option("--interior-bonus", type=FiniteFloatRange(min=0), default=None,
                 help="Add this × (1 - the higher of the two regions' interior mean affinity) "
                      "to a boundary's merge score, so regions the network is unsure about "
                      "inside (glia) merge at weaker boundaries (0: off; default: the "
                      "checkpoint's calibrated choice, else 0)."),
    click.option("--synapse-boundary", type=FiniteFloatRange(min=0), default=None,
                 help="Added to the watershed's boundary map on predicted synapse voxels, so "
                      "that a cleft the network fades still parts the two partners' "
                      "fragments (0: off; default: 0.2 when the constraints use synapse "
                      "evidence, else 0)."),
    click.option("--hierarchy", type=click.IntRange(min=1), default=None,
                 help="Agglomerate hierarchically: first inside parts of N×N×N tasks (in "
                      "parallel), then globally over their regions; for RAGs too big for one "
                      "machine's memory. The threshold sweep then stops at --threshold."),
    click.option("--levels", type=click.IntRange(min=1), default=1, show_default=True,
                 help="With --hierarchy: levels of parts before the global step (level L "
                      "joins N×N×N parts of level L-1), so the global step holds fewer edges."),
    click.option("--tta", is_flag=True,
                 help="Test-time augmentation in inference: average each patch's prediction "
                      "over its in-plane mirror images (4-8x the inference compute)."),
    click.option("--boundary-tolerance-nm", type=FiniteFloatRange(min=0), default=None,
                 help="With ground-truth labels, also score VOI and ARAND without the voxels "
                      "this close to a ground-truth interface (CREMI's border mask; default 0, "
                      "the demo 10: its ground truth runs up to the membranes)."),
    click.option("--rerun-from", default=None,
                 help="In an --out that holds a previous run, redo this stage (inference, "
                      "watershed, rag, agglomerate, remap, mesh or downsample) and the ones "
                      "after it with this call's settings. Without it finished stages are "
                      "reused, and a call whose settings would change them is refused."),
    click.option("--unsharded", is_flag=True,
                 help="Legacy meshes (per-label manifests) and one skeleton file per label "
                      "instead of multi-resolution Draco shards and sharded skeletons."),
  ]
  for option in reversed(options):
    func = option(func)
  return func


MIP = click.option(
  "--mip", type=click.IntRange(min=0), default=0, show_default=True,
  help="Work on this mip of the image, at its resolution (e.g. 1 for 8×8×40 nm from a 4×4×40 "
       "nm layer; the default model wants about 10 nm); label layers are read at their scale "
       "of that resolution.")


def _region_options(func):
  """--mip and --bounds: which scale and box of the image a command works on."""
  for option in reversed([
      MIP,
      click.option("--bounds", default=None,
                   help="Only this box of the image: x0,y0,z0,x1,y1,z1 in voxels at --mip "
                        "(default: all of it). Written layers cover just the box; "
                        "inference reads image context around it.")]):
    func = option(func)
  return func


def _window(ctx, param, value):
  if value is None:
    return None
  try:
    lo, hi = (float(v) for v in value.split(","))
  except ValueError:
    raise click.BadParameter(f"expected two grey values LO,HI, got '{value}'")
  if not all(abs(v) < float("inf") for v in (lo, hi)):
    raise click.BadParameter(f"expected two finite grey values, got '{value}'")
  if not hi > lo:
    raise click.BadParameter(f"HI must be larger than LO, got '{value}'")
  return [lo, hi]


def _image_read_options(func):
  """--fill-missing and --image-window: how the image layer's voxels are read."""
  for option in reversed([
      click.option("--fill-missing", is_flag=True,
                   help="Read the image's missing chunks (never written, e.g. outside the "
                        "tissue) as black instead of failing; all-black patches are skipped."),
      click.option("--image-window", default=None, callback=_window, metavar="LO,HI",
                   help="Grey values mapped onto the model's 0-255 input (default: none for "
                        "uint8 images; for uint16, int16, uint32 or float32 images their "
                        "0.05-99.95th percentiles in a sample of chunks).")]):
    func = option(func)
  return func


@cli.command("pipeline")
@click.option("--image", required=True,
              help="EM image layer cloudpath (uint8; or uint16, int16, uint32, float32 mapped "
                   "by --image-window).")
@click.option("--out", required=True, help="Output cloudpath prefix for every layer.")
@_region_options
@_image_read_options
@_pipeline_options
@click.option("--seeds", default=None,
              help="Tracking seeds: CSV x,y,z (nm), or a Neuroglancer state (.json) or link "
                   "with point annotations.")
@click.option("--gt-labels", default=None, help="Ground-truth segmentation layer (VOI, ARAND).")
@click.option("--gt-skeletons", default=None,
              help="GT skeletons (ERL, nERL): a directory of SWC files, or a precomputed layer "
                   "with skeletons (sharded or not).")
@click.option("--nuclei", default=None, help="GT nuclei CSV x,y,z nm (bERL).")
@click.option("--synapses", default=None, help="GT synapses CSV pre_x..post_z nm (bERL).")
def pipeline_command(image, out, mip, bounds, fill_missing, image_window, queue, parallel,
                     task_shape, checkpoint,
                     json_path, threshold, baseline_threshold, link_prefix, constraints, quantile,
                     nucleus_fraction, min_segment_voxels, interior_bonus, synapse_boundary,
                     hierarchy, levels, tta, boundary_tolerance_nm, rerun_from, unsharded, seeds,
                     gt_labels, gt_skeletons, nuclei, synapses):
  """Run every stage: inference, watershed, RAG, agglomeration + tracking, remap, meshes,
  skeletons, mips, Neuroglancer link and metrics.

  \b
  Example:
    iicats pipeline --image gs://lab/em --out gs://lab/run1 --queue sqs://iicats -p 0
    iicats pipeline --image gs://lab/em --mip 1 --bounds 4096,4096,200,5120,5120,328 \\
      --out gs://lab/trial -p 8
    iicats pipeline --image file://./em --out ./run --gt-labels file://./gt -p 2 --json s.json
  """
  from iicats_cv.tasks.pipeline import run_pipeline
  summary = run_pipeline(image, out, mip=mip, bounds=bounds, fill_missing=fill_missing,
                         image_window=image_window,
                         queue=queue, parallel=parallel, task_shape=task_shape,
                         checkpoint=checkpoint, seeds=seeds, gt_labels=gt_labels,
                         gt_skeletons=gt_skeletons, nuclei=nuclei, synapses=synapses,
                         json_path=json_path, threshold=threshold,
                         baseline_threshold=baseline_threshold, link_prefix=link_prefix,
                         constraints=constraints, sharded=not unsharded,
                         quantile=quantile, nucleus_fraction=nucleus_fraction,
                         min_segment_voxels=min_segment_voxels, hierarchy=hierarchy,
                         levels=levels, augment=tta, synapse_boundary=synapse_boundary,
                         boundary_tolerance_nm=boundary_tolerance_nm or 0.0,
                         interior_bonus=interior_bonus, rerun_from=rerun_from)
  _print_summary(summary, out)


def _print_summary(summary, out):
  metrics = summary.get("metrics", {})
  click.echo("")
  scored = ("erl", "berl", "nerl", "voi_split", "voi_merge", "arand", "voi_split_tolerant",
            "voi_merge_tolerant", "arand_tolerant")
  if any(name in metrics for name in scored):
    click.echo("metric              constrained     baseline")
  else:
    click.echo("metrics: none (no ground truth given: --gt-labels, --gt-skeletons)")
  for name in scored:
    if name in metrics:
      base = metrics.get(f"baseline_{name}")
      unit = " nm" if "erl" in name else ""
      base_text = f"{base:12.4f}" if base is not None else " " * 12
      label = name.replace("_tolerant", f" ±{metrics.get('boundary_tolerance_nm', 0):g}nm")
      click.echo(f"{label:<16}{metrics[name]:14.4f}{base_text}{unit}")
  for name, label in (("n_nucleus_violating_segments", "GT 2+ nuclei"),
                      ("n_merged_synapses", "GT syn. merged")):
    if name in metrics:  # ground-truth violations: segments, synapses
      base = metrics.get(f"baseline_{name}")
      click.echo(f"{label:<16}{metrics[name]:14d}{'' if base is None else f'{base:12d}'}")
  agg = summary.get("agglomeration") or {}
  if agg:
    from .calibrate import setting_text
    click.echo(f"agglomeration: {setting_text(agg['params'])}")
    click.echo(f"segments {agg['segments']} (baseline {agg['baseline_segments']}), tracked "
               f"neurons {agg['tracked']}, violations of the predicted constraints left "
               f"{agg['violations']}")
  timings = summary["timings"]
  click.echo("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
  memory = summary.get("worker_peak_bytes")
  if memory:
    from iicats_cv.tasks.runner import gib_text
    stage = max(memory, key=memory.get)
    estimate = summary.get("worker_memory_estimate_bytes")
    click.echo(f"worker memory: each worker process peaked at {gib_text(memory[stage])} at "
               f"most ({stage}" + (f"; {gib_text(estimate)} estimated before the run"
                                   if estimate else "")
               + f"; per stage in {out}/pipeline/stages/)")
  if summary.get("report"):
    click.echo(f"report: {summary['report']}")
  click.echo(f"Neuroglancer: {summary['neuroglancer_url']}")
  if out and "://" not in out or out.startswith("file://"):
    click.echo(f"(local layers: run `iicats view {out}` to serve them for this link)")
  click.echo(f"done: {len(summary['layers'])} layers under {out} in {timings['total']:.1f} s")


# The fib demo runs at the checkpoint's operating point (calibrated on FIB data). The
# synthetic volume is another domain, dense with the synapses and nuclei whose constraints it
# demonstrates: there every kind of evidence is used, on the mean affinity. Its nuclei are
# small, so the watershed seldom cuts one out of the surrounding cytoplasm: a fragment counts
# as nuclear from 10% nucleus on (the default 50% keeps false nucleus blobs on FIB out, and
# with the default model finds 2 of the demo's 6 nuclei). The demo compares the constrained
# and the unconstrained agglomeration each at its own threshold, chosen by
# scripts/calibrate_synthetic_demo.py (highest mean bERL) on the volumes of seeds 2-5: never
# on the demo's volume (seed 0) or the training volume (seed 1).
DEMO_AGGLOMERATION = {"fib": {},
                      "synthetic": {"threshold": 0.35, "baseline_threshold": 0.4,
                                    "quantile": "mean",
                                    "constraints": CONSTRAINTS, "min_segment_voxels": 0,
                                    "nucleus_fraction": 0.1}}


# both embedded datasets label every voxel up to the membranes: one voxel each side of an
# interface is the tolerance the demo reports beside the strict scores
DEMO_BOUNDARY_TOLERANCE_NM = 10.0


@cli.command("design")
@click.option("--image", required=True, help="EM image layer cloudpath.")
@_region_options
@click.option("--task-shape", "task_shapes", multiple=True,
              help="Task shape X,Y,Z in voxels (repeatable; default 64³, 128³, 256³, 512³).")
@click.option("-p", "--parallel", type=click.IntRange(min=0), default=None,
              help="Local worker processes, compared with this machine's memory.")
def design_command(image, mip, bounds, task_shapes, parallel):
  """Before a run: the tasks and worker memory each task shape needs, per stage, and the
  global agglomeration step's memory (Igneous' `design`). Reads only the layer's info.

  \b
  Example:
    iicats design --image gs://bucket/em --mip 1 --task-shape 256,256,128
  """
  from iicats_cv.tasks.common import LAYER_CHUNK_SIZE, check_task_shape
  from iicats_cv.tasks.sizing import (GIB, STAGES, agglomeration_memory, design,
                                      machine_memory, memory_plan)
  from .layers import IMAGE_DTYPES, normalize_cloudpath, open_layer, region_bbox
  image = normalize_cloudpath(image)
  cv = open_layer(image, mip=mip, layer_type="image", dtypes=IMAGE_DTYPES, num_channels=1,
                  what="image layer")
  region = region_bbox(bounds, cv, image)
  size, resolution = region.size3(), cv.resolution
  shapes = [parse_triple(t, "--task-shape", int) for t in task_shapes] or [
    (s, s, s) for s in (64, 128, 256, 512)]
  for shape in shapes:
    check_task_shape(shape, LAYER_CHUNK_SIZE, image)
  click.echo(f"{image}: {'×'.join(map(str, size))} voxels of "
             f"{'×'.join(f'{r:g}' for r in resolution)} nm (mip {mip})")
  click.echo(f"{'task shape':15s}{'tasks':>8s}{'ws reads':>10s}"
             + "".join(f"{s:>11s}" for s in STAGES) + "   give each worker (GiB)")
  for row in design(shapes, resolution, size):
    click.echo(f"{'×'.join(map(str, row['task_shape'])):15s}{row['tasks']:8d}"
               f"{row['watershed_reads']:9.1f}×"
               + "".join(f"{row['stages'][s] / GIB:11.2f}" for s in STAGES)
               + f"   {row['worker'] / GIB:.2f} ({row['largest']})")
  click.echo("(ws reads: the voxels the watershed tasks read with their context, which their "
             "compute grows with, ÷ the region's; memory per stage in GiB)")
  edges, held = agglomeration_memory(resolution, size)
  total = machine_memory()
  click.echo(f"agglomerate: ~{edges:,} RAG edges at the FIB volume's density, "
             f"{held / GIB:.2f} GiB in the flat global step"
             + (f", more than this machine's {total / GIB:.1f} GiB: add --hierarchy 2 and "
                "enough --levels (block interiors merge first, in parallel tasks; two levels "
                "left 13% of a 10⁸-edge lattice's edges to the global step)"
                if total and held > total else ""))
  if parallel:
    for shape in shapes:
      for line in memory_plan(shape, resolution, size, parallel)[1][1:]:
        click.echo(line)
  click.echo(f"done: {len(shapes)} task shape(s) for {region.volume():.3g} voxels")


@cli.command("demo")
@click.option("--dataset", type=click.Choice(["fib", "synthetic"]), default="fib",
              show_default=True, help="Embedded FIB-SEM crop, or a synthetic volume with nuclei "
                                      "and synapses.")
@click.option("--out", default=None,
              help="Output prefix (default ./iicats-demo, or ./iicats-demo-synthetic).")
@_pipeline_options
def demo_command(dataset, out, queue, parallel, task_shape, checkpoint, json_path, threshold,
                 baseline_threshold, link_prefix, constraints, quantile, nucleus_fraction,
                 min_segment_voxels, interior_bonus, synapse_boundary, hierarchy, levels, tta,
                 boundary_tolerance_nm, rerun_from, unsharded):
  """Import an embedded dataset with its ground truth and run the pipeline on it.

  \b
  Example:
    iicats demo                              # FIB-SEM crop, 1 local worker
    iicats demo --dataset synthetic -p 2 --json summary.json
  """
  from iicats_cv.datasets import prepare_demo
  from iicats_cv.tasks.pipeline import run_pipeline
  from iicats_cv.layers import normalize_cloudpath
  out = normalize_cloudpath(out or ("./iicats-demo" if dataset == "fib"
                                    else f"./iicats-demo-{dataset}"))
  inputs = prepare_demo(dataset, out)
  if threshold is not None and baseline_threshold is None:
    baseline_threshold = threshold  # a threshold given is the baseline's too, as in `pipeline`
  given = {"threshold": threshold, "baseline_threshold": baseline_threshold,
           "quantile": quantile, "constraints": constraints,
           "min_segment_voxels": min_segment_voxels, "nucleus_fraction": nucleus_fraction,
           "synapse_boundary": synapse_boundary, "interior_bonus": interior_bonus}
  setting = {**DEMO_AGGLOMERATION[dataset],
             **{key: value for key, value in given.items() if value is not None}}
  if hierarchy and baseline_threshold is None:
    # the parts are merged down to --threshold before the global step sees them
    setting.pop("baseline_threshold", None)
  summary = run_pipeline(inputs["image"], out, queue=queue, parallel=parallel,
                         task_shape=task_shape, checkpoint=checkpoint,
                         gt_labels=inputs["gt_labels"], gt_skeletons=inputs["gt_skeletons"],
                         nuclei=inputs["nuclei"], synapses=inputs["synapses"],
                         json_path=json_path, link_prefix=link_prefix,
                         sharded=not unsharded, hierarchy=hierarchy, levels=levels,
                         augment=tta, boundary_tolerance_nm=(
                           DEMO_BOUNDARY_TOLERANCE_NM if boundary_tolerance_nm is None
                           else boundary_tolerance_nm), rerun_from=rerun_from, **setting)
  _print_summary(summary, out)


@cli.command("execute")
@click.argument("queue")
@click.option("--lease-sec", type=click.IntRange(min=1), default=600, show_default=True,
              help="Seconds a task stays leased before another worker may take it.")
@click.option("-x", "--exit-on-empty", is_flag=True, help="Exit when the queue is empty.")
@click.option("-p", "--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True,
              help="Attempts before a task moves to the dead-letter folder.")
def execute_command(queue, lease_sec, exit_on_empty, parallel, max_attempts):
  """Run tasks from a queue (a worker).

  \b
  Example:
    iicats execute fq:///shared/queue -x -p 4
    iicats execute sqs://iicats-tasks --lease-sec 1200
  """
  from iicats_cv.tasks.runner import (ended_workers_text, execute, gib_text, largest_peak,
                                      peak_memory_bytes, start_workers,
                                      workers_stopped_on_exit)
  started = time.time()
  if queue.startswith("fq://") and not os.path.isdir(os.path.expanduser(queue[len("fq://"):])):
    # python-task-queue creates a missing file queue: a mistyped path would wait silently
    click.echo(f"note: queue {queue} does not exist yet: it is created empty and the worker "
               + ("exits at once" if exit_on_empty else "waits for tasks")
               + " (is it the path the driver queues to?)")
  if parallel > 1:
    procs, report = start_workers(parallel, queue, lease_sec, max_attempts,
                                  exit_on_empty=exit_on_empty, standalone=True)
    with workers_stopped_on_exit(procs):
      for proc in procs:
        proc.join()
    failed = [proc for proc in procs if proc.exitcode != 0]
    if failed:
      raise IicatsError(f"{len(failed)} of the {parallel} workers on {queue} ended after "
                        f"{time.time() - started:.1f} s: {ended_workers_text(failed)}")
    peak = largest_peak(report)
    click.echo(f"done: {parallel} workers exited after {time.time() - started:.1f} s"
               + (f"; each peaked at {gib_text(peak)} at most" if peak else ""))
    return
  stats = execute(queue, lease_sec=lease_sec, exit_on_empty=exit_on_empty,
                  max_attempts=max_attempts, log_tasks=True)
  peak = peak_memory_bytes()
  click.echo(f"done: {stats['executed']} task(s) executed, {stats['failed']} failed attempt(s), "
             f"{stats['dead']} dead-lettered in {time.time() - started:.1f} s"
             + (f"; peak memory {gib_text(peak)}" if peak else ""))


@cli.group("queue")
def queue_group():
  """Inspect and manage task queues."""


def _existing_queue(queue: str) -> str:
  """queue, checked: an fq:// folder must be there and not be a layer (python-task-queue
  would create its queue folders in a mistyped path, or inside a precomputed layer)."""
  from iicats_cv.tasks.runner import check_queue_url
  check_queue_url(queue)
  if queue.startswith("fq://"):
    folder = os.path.expanduser(queue[len("fq://"):])
    if not os.path.isdir(folder):
      raise IicatsError(f"queue {queue}: no such folder")
    if os.path.exists(os.path.join(folder, "info")):
      raise IicatsError(f"queue {queue}: this folder is a precomputed layer (it has an info "
                        "file), not a queue")
  return queue


@queue_group.command("status")
@click.argument("queue")
def queue_status(queue):
  """Enqueued / leased / completed counts.

  \b
  Example:
    iicats queue status fq://./iicats-demo/queue
  """
  from iicats_cv.tasks.runner import open_queue, dead_letters
  tq = open_queue(_existing_queue(queue))
  click.echo(f"enqueued:  {tq.enqueued}")
  try:
    click.echo(f"leased:    {tq.leased}")
    click.echo(f"completed: {tq.completed}")
  except Exception:
    pass  # sqs reports no lease/completion counts
  click.echo(f"dead:      {len(dead_letters(queue))}")


@queue_group.command("release")
@click.argument("queue")
def queue_release(queue):
  """Put every leased task back on the queue now (fq:// only), as Igneous' `queue release`
  does: the tasks of workers that died are otherwise held until their leases expire.
  Only for queues no live worker is leasing from: a running task would be handed out twice.

  \b
  Example:
    iicats queue release fq:///shared/queue
  """
  from iicats_cv.tasks.runner import open_queue
  if not queue.startswith("fq://"):
    raise IicatsError(f"queue {queue}: only fq:// queues can release their leases; an SQS "
                      "task comes back by itself when its lease (--lease-sec) expires")
  tq = open_queue(_existing_queue(queue))
  leased = tq.leased
  tq.release_all()
  click.echo(f"released {leased} leased task(s) of {queue}; {tq.enqueued} task(s) enqueued")


@queue_group.command("purge")
@click.argument("queue")
def queue_purge(queue):
  """Delete every task in the queue.

  \b
  Example:
    iicats queue purge fq://./queue
  """
  from iicats_cv.tasks.runner import open_queue
  open_queue(_existing_queue(queue)).purge()
  click.echo(f"purged {queue}")


@cli.command("synthetic")
@click.argument("out")
@click.option("--shape", default="160,160,96", callback=_triple("shape", int),
              help="Volume shape X,Y,Z in voxels.")
@click.option("--resolution", default="10,10,10", callback=_triple("resolution"),
              help="Voxel size X,Y,Z in nm.")
@click.option("--seed", type=int, default=0, show_default=True)
def synthetic_command(out, shape, resolution, seed):
  """Write a synthetic EM volume with neurons, nuclei, mitochondria, synapses and GT
  skeletons as precomputed layers (OUT/image, OUT/neurons, …) plus SWC/CSV ground truth.

  \b
  Example:
    iicats synthetic ./synthetic --shape 128,128,64 --seed 3
  """
  from .datasets import write_synthetic
  started = time.time()
  paths = write_synthetic(out, shape=shape, resolution=resolution, seed=seed)
  for name, path in paths.items():
    click.echo(f"{name:<14}{path}")
  click.echo(f"done: synthetic volume {shape} in {time.time() - started:.1f} s")


@cli.command("train")
@click.option("--image", multiple=True, required=True,
              help="Image layer (repeat for several datasets).")
@click.option("--labels", multiple=True, help="Neuron labels layer per --image ('none' = absent).")
@click.option("--nuclei", multiple=True, help="Nucleus mask/labels layer per --image or 'none'.")
@click.option("--mitochondria", multiple=True, help="Mitochondria layer per --image or 'none'.")
@click.option("--synapses", multiple=True, help="Synapse layer per --image or 'none'.")
@click.option("--bounds", multiple=True,
              help="Region per --image as x0,y0,z0,x1,y1,z1 voxels (at --mip), or 'all'.")
@MIP
@click.option("--out", required=True, callback=lambda ctx, param, value: _checkpoint_out(value),
              help="Checkpoint path (.safetensors).")
@click.option("--iterations", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--lr", type=FiniteFloatRange(min=0, max=1e3), default=2e-3,
              show_default=True)
@click.option("--patch-size", default="48,48,48", callback=_triple("patch_size", int))
@click.option("--anisotropic", is_flag=True, help="Pool only in x,y (ssEM, ~4x4x40 nm).")
@click.option("--widths", default="12,24,48", show_default=True,
              help="Feature channels per U-Net level, comma-separated; each level after the "
                   "first pools by 2 (in x,y only with --anisotropic).")
@click.option("--long-range", type=int, multiple=True,
              help="Also predict x, y, z affinities to the neighbour this many voxels away "
                   "(repeat for several distances); written after the short-range ones.")
@click.option("--seed", type=int, default=0)
@click.option("--dice-weight", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
              help="Add this times a soft Dice loss on the organelle channels to the "
                   "class-balanced BCE (which over-predicts rare organelles at p > 0.5).")
@click.option("--val-fraction", type=FiniteFloatRange(0, 0.5), default=0.2, show_default=True,
              help="Hold out the top fraction of each volume's z range (at least one patch "
                   "deep) for validation; 0 trains on all of it and skips validation.")
@click.option("--hard-examples", "hard_fraction", type=FiniteFloatRange(0, 1), default=0.0,
              show_default=True,
              help="Hard-example mining (for fine-tuning with --init): draw this fraction of "
                   "the patches where the starting model's affinities are most wrong.")
@click.option("--focus-labels", default=None,
              help="Comma-separated ground-truth neuron ids of a rare cell type the model gets "
                   "wrong (e.g. glia): --focus-fraction of the patches are drawn where they lie.")
@click.option("--focus-fraction", type=FiniteFloatRange(0, 1), default=0.4, show_default=True,
              help="Fraction of the patches drawn where --focus-labels lie.")
@click.option("--lsd-sigma", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
              help="Also learn the neurons' local shape descriptors at this Gaussian scale "
                   "in nm (e.g. 80): an auxiliary target that shapes the features the "
                   "affinities use; the checkpoint keeps only the usual channels.")
@click.option("--lsd-weight", type=FiniteFloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the shape-descriptor loss against the affinity loss.")
@click.option("--resume", is_flag=True, help="Continue from OUT.state if present.")
@click.option("--init", default=None,
              help="Fine-tune: start from this checkpoint (a file, or a shipped model: "
                   "'default', 'vnc') and keep its architecture (--patch-size, "
                   "--anisotropic, --widths and --long-range then come from it).")
def train_command(image, labels, nuclei, mitochondria, synapses, bounds, mip, out, iterations,
                  batch_size, lr, patch_size, anisotropic, widths, long_range, seed,
                  dice_weight, val_fraction, hard_fraction, focus_labels, focus_fraction,
                  lsd_sigma, lsd_weight, resume, init):
  """Train the affinity + organelle network on precomputed layers.

  Options repeat per dataset: the i-th --labels/--nuclei/... belong to the i-th --image.

  \b
  Example:
    iicats train --image file://fib/image --labels file://fib/neurons --out model.safetensors
    iicats train --init default --image gs://lab/em --labels gs://lab/gt --out tuned.safetensors
  """
  from .training_data import load_training_volumes
  from dataclasses import replace
  from .model import (AFFINITY_CHANNELS, ORGANELLE_CHANNELS, ModelConfig, load_checkpoint,
                      long_range_channels)
  from .train import train
  try:
    width = tuple(int(w) for w in widths.split(","))
    assert len(width) >= 2 and min(width) > 0
  except (ValueError, AssertionError):
    raise click.BadParameter(f"{widths}: expected two or more positive integers",
                             param_hint="--widths")
  try:
    focus = tuple(int(x) for x in (focus_labels or "").split(",") if x.strip())
    assert min(focus, default=1) > 0
  except (ValueError, AssertionError):
    raise click.BadParameter(f"{focus_labels}: expected positive integer neuron ids",
                             param_hint="--focus-labels")
  if any(d < 2 or d >= min(patch_size) for d in long_range):
    raise click.BadParameter(f"distances {long_range}: each must be 2 or more and below the "
                             f"patch size {patch_size}", param_hint="--long-range")
  ctx = click.get_current_context()
  if init:
    given = [f"--{name.replace('_', '-')}" for name in ARCHITECTURE_OPTIONS
             if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
    if given:
      raise click.UsageError(f"--init {init} keeps that checkpoint's architecture: leave out "
                             f"{', '.join(given)}")
  volumes, resolution = load_training_volumes(image, labels, nuclei, mitochondria, synapses,
                                              bounds, mip)
  if init:
    config = replace(load_checkpoint(init)[0].config, resolution=resolution)
  else:
    down = ((2, 2, 1) if anisotropic else (2, 2, 2),) * (len(width) - 1)
    config = ModelConfig(patch_size=patch_size, resolution=resolution, downsample=down,
                         width=width,
                         out_channels=AFFINITY_CHANNELS + ORGANELLE_CHANNELS
                         + long_range_channels(sorted(set(long_range))))
  meta = train(volumes, out, config=config, iterations=iterations, batch_size=batch_size,
               lr=lr, seed=seed, resume=resume, init=init, dice_weight=dice_weight,
               val_fraction=val_fraction, hard_fraction=hard_fraction,
               focus_labels=focus, focus_fraction=focus_fraction,
               lsd_sigma_nm=lsd_sigma, lsd_weight=lsd_weight,
               # with --init the architecture options are refused, so the record leaves them out
               command=_command_line(ctx, omit=ARCHITECTURE_OPTIONS if init else ()))
  for volume, scores in meta["validation"].items():
    click.echo(f"validation on {volume}: " + ", ".join(
      f"{name} {float(value):.4f}" for name, value in scores.items()))
  click.echo(f"done: {out} after {iterations} iterations in {meta['wall_time_s']:.0f} s")


def _checkpoint_out(path: str) -> str:
  """--out of train and calibrate, checked before the work: a shipped model's name would
  write a file that --checkpoint never reads (it means the shipped model)."""
  from .errors import check_output_path
  from .model import SHIPPED_MODELS
  if path in SHIPPED_MODELS:
    raise IicatsError(f"--out {path}: that name means the shipped model to --checkpoint; "
                      f"give a file path such as {path}-tuned.safetensors")
  return check_output_path(path, "--out")


# calibrate held 1.4 GB at its peak for 250×250×150 voxels (110 bytes each beyond the ~0.4 GB
# of libraries): this bound keeps it near 17 GB
CALIBRATION_MAX_VOXELS = 150_000_000


@cli.command("calibrate")
@click.option("--checkpoint", default="default", show_default=True,
              help="Checkpoint to calibrate: a file, or a shipped model ('default', 'vnc').")
@click.option("--image", required=True, help="Image layer of labelled data the model trained "
                                             "on (never the data you evaluate on).")
@click.option("--labels", default=None, help="Neuron labels layer: chooses the agglomeration.")
@click.option("--nuclei", default=None, help="Nucleus mask/labels layer: its probability cut.")
@click.option("--mitochondria", default=None, help="Mitochondria layer: its probability cut.")
@click.option("--synapses", default=None, help="Synapse layer: its probability cut.")
@_region_options
@click.option("--tta", is_flag=True, help="Calibrate the test-time-augmented prediction.")
@click.option("--out", required=True, callback=lambda ctx, param, value: _checkpoint_out(value),
              help="Calibrated checkpoint (.safetensors; may be the --checkpoint file itself).")
@click.option("--edge-scorer/--no-edge-scorer", default=True, show_default=True,
              help="With --labels, also train a learned edge scorer and use it where it beats "
                   "the best affinity statistic on held-out halves of the region.")
@click.option("--json", "json_path", default=None, callback=output_file_option,
              help="Write every scored setting here.")
def calibrate_command(checkpoint, image, labels, nuclei, mitochondria, synapses, mip, bounds,
                      tta, edge_scorer, out, json_path):
  """Choose a model's operating point on labelled data and record it in the checkpoint.

  With --labels: the agglomeration statistic (mean, 50th or 75th percentile affinity), the
  organelle evidence and the threshold with the lowest ARAND (then VOI) of the pipeline's own
  watershed, RAG and agglomeration. Then a learned edge scorer (fragment pairs' same-neuron
  probability from their boundary and appearance): its threshold is chosen with each half of
  the region (cut along z) agglomerated by a scorer trained on the other, and it becomes the
  operating point where it scores better there than the best statistic does on the same
  halves. With organelle layers: each organelle's probability cut with the best voxel Dice.
  What a run does not choose stays as the checkpoint's earlier calibration chose it, so the
  organelle cuts can come from one labelled volume and the agglomeration from another; the
  agglomeration's organelle evidence uses the cuts recorded by then.
  `iicats pipeline` uses these wherever its options are not given.
  Reads the whole region into memory: give a cutout of a few hundred voxels a side.

  \b
  Example:
    iicats calibrate --checkpoint mine.safetensors --image file://train/em \\
      --labels file://train/neurons --mitochondria file://train/mito --out mine.safetensors
  """
  import numpy as np
  import torch
  from .calibrate import (calibrate_edge_scorer, choose_organelle_thresholds,
                          score_agglomeration, setting_text)
  from .inference import predict_volume
  from .model import ORGANELLE_CHANNELS, load_checkpoint, update_checkpoint_metadata
  from .layers import IMAGE_DTYPES, open_layer, region_bbox
  from .training_data import load_training_volumes
  if not (labels or nuclei or mitochondria or synapses):
    raise click.UsageError("give --labels and/or an organelle layer (--nuclei, "
                           "--mitochondria, --synapses) to calibrate against")
  image_cv = open_layer(image, mip=mip, layer_type="image", dtypes=IMAGE_DTYPES, num_channels=1,
                        what="calibration image")
  voxels = int(np.prod(region_bbox(bounds, image_cv, image).size3()))
  if voxels > CALIBRATION_MAX_VOXELS:
    raise IicatsError(f"calibration image {image}: {voxels:.2e} voxels would be held in "
                      f"memory at once (about 110 bytes each); choose a cutout of at most "
                      f"{CALIBRATION_MAX_VOXELS:.1e} voxels with --bounds")
  started = time.time()
  one = lambda value: (value,) if value else ("none",)  # noqa: E731
  volumes, resolution = load_training_volumes(
    (image,), one(labels), one(nuclei), one(mitochondria), one(synapses),
    (bounds,) if bounds else (), mip)
  volume = volumes[0]
  model, metadata = load_checkpoint(checkpoint)
  patch = tuple(model.config.patch_size)
  if any(n < p for n, p in zip(volume.image.shape, patch)):
    raise IicatsError(f"calibration image {image}: its region {volume.image.shape} is smaller "
                      f"than the model's patch {patch} on an axis; choose a larger --bounds")
  device = "cuda" if torch.cuda.is_available() else "cpu"
  click.echo(f"predicting {volume.image.shape} voxels of {image} on {device}")
  probabilities = predict_volume(model, volume.image, device=device, augment=tta,
                                 progress=True)
  affinities, organelles = probabilities[:3], probabilities[3:6]
  masks = {name: getattr(volume, name) > 0 for name in ORGANELLE_CHANNELS
           if getattr(volume, name) is not None}
  # what this run does not choose stays as an earlier calibration chose it: the default
  # model's organelle cuts come from synthetic masks, its agglomeration from FIB neurons
  point, lines = dict(metadata.get("operating_point") or {}), []
  record = {"command": _command_line(click.get_current_context()), "image": image,
            "voxels": voxels, "test_time_augmentation": tta}
  if masks:
    cuts = choose_organelle_thresholds(organelles, masks)
    point["organelle_thresholds"] = {**point.get("organelle_thresholds", {}),
                                     **{name: c["threshold"] for name, c in cuts.items()}}
    point["organelle_dice"] = {
      **point.get("organelle_dice", {}),
      **{name: {"at_threshold": c["dice"], "at_0.5": c["dice_at_0.5"]}
         for name, c in cuts.items()}}
    lines += [f"{name} p > {c['threshold']:.2f} (Dice {c['dice']:.3f}; "
              f"{c['dice_at_0.5']:.3f} at p > 0.5)" for name, c in cuts.items()]
  rows = []
  if labels:
    organelle_cuts = [point.get("organelle_thresholds", {}).get(name, 0.5)
                      for name in ORGANELLE_CHANNELS]
    record["organelle_cuts"] = dict(zip(ORGANELLE_CHANNELS, organelle_cuts))
    rows = score_agglomeration(affinities, organelles, volume.labels, resolution,
                               organelle_cuts=organelle_cuts, progress=True)
    for row in rows[:8]:
      click.echo(f"  {setting_text(row):<58} ARAND {row['arand']:.4f}  "
                 f"VOI {row['voi_split']:.3f} / {row['voi_merge']:.3f}")
    point["agglomeration"] = point["classic_agglomeration"] = rows[0]
    if edge_scorer:
      learned = calibrate_edge_scorer(volume.image, affinities, organelles, volume.labels,
                                      resolution, rows[0], organelle_cuts=organelle_cuts,
                                      progress=True)
      on_halves = learned["classic_on_halves"]
      click.echo(f"  on the two halves: {setting_text(learned['setting']):<46} ARAND "
                 f"{learned['setting']['arand']:.4f}  VOI {learned['setting']['voi_split']:.3f}"
                 f" / {learned['setting']['voi_merge']:.3f}; {setting_text(rows[0])} ARAND "
                 f"{on_halves['arand']:.4f}  VOI {on_halves['voi_split']:.3f} / "
                 f"{on_halves['voi_merge']:.3f}")
      point["edge_scorer"] = {**learned["scorer"], "setting": learned["setting"],
                              "classic_on_halves": on_halves, "used": learned["used"]}
      if learned["used"]:
        point["agglomeration"] = learned["setting"]
    else:
      point.pop("edge_scorer", None)  # it belonged to the agglomeration replaced here
    chosen = point["agglomeration"]
    lines.append(f"agglomeration {setting_text(chosen)} (ARAND {chosen['arand']:.4f}"
                 + (" on held-out halves)" if chosen.get("learned") else ")"))
  record["wall_time_s"] = round(time.time() - started, 1)
  point["calibration"] = record  # the latest run; each part also keeps the run that chose it
  if masks:
    point["organelle_calibration"] = record
  if labels:
    point["agglomeration_calibration"] = record
  update_checkpoint_metadata(checkpoint, out, {"operating_point": point})
  if json_path:
    with open(json_path, "w") as fh:
      json.dump({"operating_point": point, "agglomeration_rows": rows}, fh, indent=1)
  click.echo(f"done: {out} calibrated in {time.time() - started:.0f} s: " + "; ".join(lines))


@cli.command("infer")
@click.argument("image")
@click.option("--affinities", required=True, help="Output affinities layer.")
@click.option("--organelles", required=True, help="Output organelles layer.")
@click.option("--checkpoint", default=None,
              help="Model checkpoint file, or a shipped model: 'default' (10 nm isotropic EM), "
                   "'vnc' (ssTEM organelles).")
@click.option("--task-shape", default="128,128,128", callback=_triple("task_shape", int))
@click.option("--float32", "as_float", is_flag=True, help="float32 output instead of uint8.")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation: average each patch's prediction over its in-plane "
                   "mirror images (8 where x and y match, else 4; 4-8x the compute).")
@_region_options
@_image_read_options
@click.option("--queue", default=None, callback=_queue_url)
@click.option("-p", "--parallel", type=click.IntRange(min=0), default=None)
def infer_command(image, affinities, organelles, checkpoint, task_shape, as_float, tta, mip,
                  bounds, fill_missing, image_window, queue, parallel):
  """Predict affinity and organelle layers from an EM image layer.

  \b
  Example:
    iicats infer file://./em --affinities file://./run/aff --organelles file://./run/org -p 2
  """
  from iicats_cv.tasks.inference import clear_patch_cache, create_inference_tasks
  from iicats_cv.tasks.runner import run_tasks
  from .layers import normalize_cloudpath
  from .model import ORGANELLE_CHANNELS, checkpoint_metadata, trained_outputs
  started = time.time()
  affinities = normalize_cloudpath(affinities)
  taught = trained_outputs(checkpoint_metadata(checkpoint))
  if taught is not None and {"affinities", *ORGANELLE_CHANNELS} - taught:
    click.echo(f"note: checkpoint {checkpoint or 'default'} learnt only "
               f"{', '.join(sorted(taught))}; its other channels were never trained")
  tasks = create_inference_tasks(normalize_cloudpath(image), affinities,
                                 normalize_cloudpath(organelles), checkpoint, task_shape,
                                 dtype="float32" if as_float else "uint8", augment=tta,
                                 mip=mip, bounds=bounds, fill_missing=fill_missing,
                                 window=image_window)
  run_tasks(tasks, queue, parallel, desc="inference")
  clear_patch_cache(affinities)
  click.echo(f"done: {len(tasks)} inference task(s) in {time.time() - started:.1f} s")


def _queue_options(func):
  for option in reversed([
      click.option("--queue", default=None, callback=_queue_url,
                   help="Task queue; without -p, wait for workers."),
      click.option("-p", "--parallel", type=click.IntRange(min=0), default=None,
                   help="Local worker processes."),
      click.option("--task-shape", default="128,128,128", callback=_triple("task_shape", int),
                   help="Task shape X,Y,Z in voxels.")]):
    func = option(func)
  return func


@cli.command("mesh")
@click.argument("cloudpath")
@_queue_options
@click.option("--sharded/--unsharded", default=True, show_default=True,
              help="Multi-resolution Draco shards, or legacy per-label manifests.")
@click.option("--dust", type=int, default=100, show_default=True, help="Skip smaller objects.")
def mesh_command(cloudpath, queue, parallel, task_shape, sharded, dust):
  """Mesh a segmentation layer with Igneous (zmesh) on a queue, then validate.

  \b
  Example:
    iicats mesh file://./iicats-demo/segmentation -p 2
    iicats mesh gs://lab/seg --queue sqs://meshing --unsharded
  """
  from iicats_cv.tasks import igneous_stages as ig
  from iicats_cv.tasks.runner import run_tasks
  from .layers import normalize_cloudpath
  path = normalize_cloudpath(cloudpath)
  started = time.time()
  run_tasks(ig.mesh_tasks(path, task_shape, dust, sharded=sharded), queue, parallel,
            desc="mesh")
  run_tasks(ig.mesh_merge_tasks(path, sharded=sharded), queue, parallel, desc="mesh-merge")
  ig.record(path, "mesh", {"sharded": sharded, "dust": dust, "task_shape": list(task_shape)})
  _report_validation(path, skeletons=False)
  click.echo(f"done: meshes of {path} in {time.time() - started:.1f} s")


@cli.command("skeleton")
@click.argument("cloudpath")
@_queue_options
@click.option("--sharded/--unsharded", default=True, show_default=True,
              help="Sharded skeletons, or one file per label.")
@click.option("--dust", type=int, default=100, show_default=True,
              help="Skip objects smaller than this (voxels per task).")
def skeleton_command(cloudpath, queue, parallel, task_shape, sharded, dust):
  """Skeletonize a segmentation layer with Igneous (kimimaro) on a queue, then validate.

  \b
  Example:
    iicats skeleton file://./iicats-demo/segmentation -p 2
  """
  from iicats_cv.tasks import igneous_stages as ig
  from iicats_cv.tasks.runner import run_tasks
  from .layers import normalize_cloudpath
  path = normalize_cloudpath(cloudpath)
  started = time.time()
  run_tasks(ig.skeleton_tasks(path, task_shape, dust, sharded=sharded), queue, parallel,
            desc="skeleton")
  run_tasks(ig.skeleton_merge_tasks(path, sharded=sharded), queue, parallel,
            desc="skeleton-merge")
  ig.record(path, "skeleton", {"sharded": sharded, "dust": dust,
                               "task_shape": list(task_shape)})
  _report_validation(path, meshes=False)
  click.echo(f"done: skeletons of {path} in {time.time() - started:.1f} s")


@cli.command("downsample")
@click.argument("cloudpath")
@click.option("--queue", default=None, callback=_queue_url)
@click.option("-p", "--parallel", type=click.IntRange(min=0), default=None)
@click.option("--num-mips", type=click.IntRange(min=1), default=2, show_default=True,
              help="Mips to add; fewer where a mip would have fewer than 32 voxels on an axis.")
def downsample_command(cloudpath, queue, parallel, num_mips):
  """Add a mip pyramid (Igneous/tinybrain: averaging for images, mode for labels).

  \b
  Example:
    iicats downsample file://./iicats-demo/affinities --num-mips 2 -p 2
  """
  from iicats_cv.tasks import igneous_stages as ig
  from iicats_cv.tasks.runner import run_tasks
  from .layers import normalize_cloudpath, open_layer
  path = normalize_cloudpath(cloudpath)
  cv = open_layer(path)
  started = time.time()
  depth = ig.pyramid_depth(cv.bounds.size3(), cv.resolution, num_mips)
  if depth < num_mips:
    size = "×".join(map(str, cv.bounds.size3()))
    click.echo(f"note: {depth} of the {num_mips} mips: the next would have fewer than 32 "
               f"voxels on a downsampled axis ({path} is {size} voxels, "
               f"downsampled by {'×'.join(map(str, ig.downsample_factor(cv.resolution)))} "
               "per mip)")
  for mip in range(depth):
    run_tasks(ig.downsample_tasks(path, mip), queue, parallel, desc=f"mip {mip + 1}")
  # Igneous makes no mip of a volume it finds too small, without an error
  written = min(depth, len(open_layer(path).info["scales"]) - 1)
  click.echo(f"done: {written} mip(s) written to {path} in {time.time() - started:.1f} s"
             + (" (Igneous found the volume too small for more)" if written < depth else ""))


# what `iicats pipeline` writes under OUT besides the layers `iicats view` serves
RUN_FOLDERS = ("segmentation_baseline", "rag", "hierarchy", "agglomeration", "pipeline",
               "report", "summary", "annotations", "_image")
LISTED = 20  # the neurons and shared seeds `iicats track` prints one line each for


@cli.command("track")
@click.argument("out_prefix")
@click.option("--seeds", default=None,
              help="Cells to track: CSV x,y,z (nm), or a Neuroglancer state (.json) or link "
                   "(as is, or in a file) with point annotations (default: every detected "
                   "nucleus).")
@click.option("--name", default="tracked", show_default=True,
              help="Writes layer OUT_PREFIX/NAME and the neuron list OUT_PREFIX/NAME.json.")
@click.option("--threshold", type=FiniteFloatRange(0, 1), default=None,
              help="Agglomeration threshold (default: the run's).")
@click.option("--track-threshold", type=FiniteFloatRange(0, 1), default=None,
              help="Seeds grow down to this mean affinity (default: the threshold).")
@click.option("--constraints", default=None, callback=_constraint_list,
              help="Evidence honoured while growing (default: the run's).")
@_queue_options
@click.option("--no-meshes", is_flag=True, help="Skip the tracked layer's meshes and skeletons.")
@click.option("--unsharded", is_flag=True,
              help="Legacy meshes and one skeleton file per label instead of shards.")
@click.option("--link-prefix", default=None, help="Neuroglancer client URL the link opens.")
def track_command(out_prefix, seeds, name, threshold, track_threshold, constraints, queue,
                  parallel, task_shape, no_meshes, unsharded, link_prefix):
  """Track identified neurons of a finished run from their nuclei or from seed points.

  Each seed grows best edge first through the run's RAG, honouring the nucleus, synapse and
  mitochondria constraints; two seeds never claim one segment. Writes a segmentation layer
  holding only the tracked neurons (with meshes and skeletons), a JSON list with each
  neuron's id, seed and size, and prints a Neuroglancer link with the neurons selected.

  \b
  Example:
    iicats track ./iicats-demo                             # from detected nuclei
    iicats track gs://lab/run1 --seeds stained.csv --name stained -p 4
  """
  from functools import partial
  from iicats_cv.layers import join, normalize_cloudpath, open_layer
  from iicats_cv.seeds import read_seed_points, seeds_in_volume
  from iicats_cv.tasks import igneous_stages as ig
  from iicats_cv.tasks.common import LAYER_CHUNK_SIZE, check_task_shape, get_json
  from iicats_cv.tasks.pipeline import make_link
  from iicats_cv.tasks.runner import run_tasks
  from iicats_cv.tasks.segmentation import create_remap_tasks, track_task
  from iicats_cv.viewer.server import LAYER_NAMES, run_layers
  out = normalize_cloudpath(out_prefix)
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
    raise IicatsError(f"--name '{name}': expected a plain name (letters, digits, '_', '-', "
                      "'.'): it becomes a folder beside the run's layers")
  if name in LAYER_NAMES + RUN_FOLDERS or name.endswith(".json"):
    raise IicatsError(f"--name {name}: that is one of the run's own folders; choose another")
  check_task_shape(task_shape, LAYER_CHUNK_SIZE, join(out, name))
  supervoxels = join(out, "supervoxels")
  layer = open_layer(supervoxels, layer_type="segmentation", what="supervoxels layer of the run")
  seeds_nm = (seeds_in_volume(read_seed_points(seeds), layer.bounds, layer.resolution,
                              seeds).tolist() if seeds else None)
  summary = get_json(out, "agglomeration/summary.json") or {}
  ran = summary.get("params", {})
  threshold = ran.get("threshold", 0.5) if threshold is None else threshold
  params = {"threshold": threshold,
            "constraints": list(ran.get("constraints", CONSTRAINTS) if constraints is None
                                else constraints),
            "track_threshold": threshold if track_threshold is None else track_threshold,
            "quantile": ran.get("quantile")}
  # the run's nuclei and segments, so that its seeds and constraints hold
  for same in ("nucleus_fraction", "min_segment_voxels", "edge_scorer", "interior_bonus"):
    if same in ran:
      params[same] = ran[same]
  started = time.time()
  run_tasks([partial(track_task, rag_prefix=join(out, "rag"),
                     supervoxels_path=supervoxels, out_prefix=out, params=params,
                     name=name, seeds_nm=seeds_nm,
                     hierarchy_prefix=summary.get("hierarchy_prefix", ""))],
            queue, parallel, desc="track")
  run_tasks(create_remap_tasks(supervoxels, join(out, name), out, task_shape,
                               column="tracked_ids", table_key=f"{name}/table.npz"),
            queue, parallel, desc="remap")
  tracked_path = join(out, name)
  neurons = get_json(out, f"{name}.json")
  ig.record(tracked_path, "track", {
    "run": out, "seeds": seeds if seeds and not seeds.startswith("http") else
    ("a Neuroglancer link" if seeds else "the run's detected nuclei"),
    "seed_points_nm": seeds_nm, "params": params,
    "neurons": [{k: n[k] for k in ("id", "seed", "voxels")} for n in neurons]})
  if not no_meshes:
    sharded = not unsharded
    run_tasks(ig.mesh_tasks(tracked_path, task_shape, sharded=sharded), queue, parallel,
              desc="mesh")
    run_tasks(ig.mesh_merge_tasks(tracked_path, sharded=sharded), queue, parallel,
              desc="mesh-merge")
    run_tasks(ig.skeleton_tasks(tracked_path, task_shape, sharded=sharded), queue, parallel,
              desc="skeleton")
    run_tasks(ig.skeleton_merge_tasks(tracked_path, sharded=sharded), queue, parallel,
              desc="skeleton-merge")
    _report_validation(tracked_path)
  seeds_of = {}
  for neuron in neurons[:LISTED]:
    seed = neuron.get("seed_nm")
    where = ", ".join(f"{v:.0f}" for v in seed) if seed else "?"
    click.echo(f"neuron {neuron['id']}: seed {neuron['seed']} at ({where}) nm, "
               f"{neuron['voxels']} voxels in {neuron['fragments']} fragment(s)")
  if len(neurons) > LISTED:
    click.echo(f"… and {len(neurons) - LISTED} more seeds in {join(out, name)}.json")
  for neuron in neurons:
    seeds_of.setdefault(neuron["id"], []).append(str(neuron["seed"]))
  shared = [(neuron, numbers) for neuron, numbers in seeds_of.items() if len(numbers) > 1]
  for neuron, numbers in shared[:LISTED]:
    click.echo(f"seeds {', '.join(numbers)} lie on one fragment or one nucleus instance of "
               f"the run, which nothing here can part: they share neuron {neuron}")
  if len(shared) > LISTED:
    click.echo(f"… and {len(shared) - LISTED} more neurons shared by several seeds")
  layers = run_layers(out)
  if "segmentation" in layers:
    url, _ = make_link(out, layers, [], link_prefix, tracked_layers={
      name: (tracked_path, [n["id"] for n in neurons])})
    click.echo(f"Neuroglancer: {url}")
    if out.startswith("file://"):
      click.echo(f"(local layers: run `iicats view {out}` to serve them for this link)")
  from_seeds = f" from {len(neurons)} seeds" if len(seeds_of) < len(neurons) else ""
  click.echo(f"done: {len(seeds_of)} neuron(s){from_seeds} tracked into {join(out, name)} "
             f"({join(out, name)}.json) in {time.time() - started:.1f} s")


def _report_validation(path, min_voxels=8000, meshes=True, skeletons=True):
  from iicats_cv.tasks.igneous_stages import validate_layer
  check = validate_layer(path, min_voxels, meshes=meshes, skeletons=skeletons)
  for problem in check["problems"]:
    click.echo(f"problem: {problem}")
  if check["problems"]:
    raise IicatsError(f"{path}: validation failed ({len(check['problems'])} problem(s))")
  click.echo(f"validated: {check['labels_checked']} label(s) ≥ {min_voxels} voxels have "
             f"{' and '.join(k for k, on in (('meshes', meshes), ('skeletons', skeletons)) if on)}")


@cli.command("validate")
@click.argument("cloudpath")
@click.option("--min-voxels", type=int, default=8000, show_default=True,
              help="Labels at least this big must have a mesh and a skeleton.")
@click.option("--no-meshes", is_flag=True)
@click.option("--no-skeletons", is_flag=True)
def validate_command(cloudpath, min_voxels, no_meshes, no_skeletons):
  """Check a segmentation layer: info, and a mesh + skeleton for every big label.

  \b
  Example:
    iicats validate file://./iicats-demo/segmentation --min-voxels 1000
  """
  from .layers import normalize_cloudpath
  path = normalize_cloudpath(cloudpath)
  _report_validation(path, min_voxels, meshes=not no_meshes, skeletons=not no_skeletons)
  click.echo(f"done: {path} is valid")


def _register_subcommands():
  from .evaluate import evaluate_command
  from .viewer.link import link_command
  from .viewer.server import view_command
  for command in (evaluate_command, link_command, view_command):
    cli.add_command(command)


_register_subcommands()


def main():
  try:
    cli(prog_name="iicats")
  except OSError as err:
    # a path the user gave that cannot be written or read (a missing folder, a file where a
    # folder belongs, no permission): one line naming it
    if not err.filename:
      raise
    click.echo(f"Error: {err.filename}: {err.strerror or err}", err=True)
    sys.exit(1)


if __name__ == "__main__":
  main()
