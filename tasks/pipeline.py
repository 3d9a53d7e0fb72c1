"""The whole pipeline as a sequence of queued stages over precomputed layers.

Each stage creates its tasks (Igneous style: creation apart from execution), puts them on the
queue, and either runs local workers (`parallel` ≥ 1) or waits for external ones
(`iicats execute QUEUE`). A finished stage leaves a record under OUT/pipeline/, so re-running
after an interruption resumes: finished stages and finished tasks are skipped. They are reused
only under the settings that made them (OUT/pipeline/run.json): a run at the same OUT with
other settings stops before writing anything, unless `rerun_from` names the stage to redo.
"""
from __future__ import annotations

from functools import partial

import json
import os
import tempfile
import time

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import Bbox

from iicats_cv.agglomerate import AgglomerationParams
from iicats_cv.errors import IicatsError
from iicats_cv.layers import (IMAGE_DTYPES, box_text, normalize_cloudpath, open_layer, join,
                              layer_exists, local_path, region_bbox, resolve_cloudpath,
                              scale_at_resolution)
from iicats_cv.metrics import boundary_tolerance_steps
from iicats_cv.watershed import SYNAPSE_BOUNDARY
from . import igneous_stages as ig
from .inference import clear_patch_cache, create_inference_tasks, resolve_window
from .runner import gib_text, open_queue, run_tasks
from .sizing import memory_plan
from .segmentation import (EDGE_SCORER_OBJECT, create_watershed_tasks, create_rag_tasks,
                           create_node_table_tasks, create_reduce_tasks, level_prefix,
                           agglomerate_task, create_remap_tasks)
from .common import LAYER_CHUNK_SIZE, check_task_shape, get_json, put_json

LAYERS = ("image", "affinities", "organelles", "supervoxels", "segmentation")
# supervoxels stay at full resolution: they are inspected up close, never zoomed out
PYRAMID_LAYERS = ("image", "affinities", "organelles", "segmentation")


# The run settings (OUT/pipeline/run.json) each step's outputs depend on, in the order the
# steps run; a step's outputs also depend on the settings of every step before it.
# (fill_missing is not one: a task that finished without it read no missing chunk.)
STEPS = (
  ("inference", ("image", "checkpoint", "test_time_augmentation", "image_window")),
  ("watershed", ("task_shape", "synapse_boundary", "organelle_thresholds")),
  ("rag", ("histograms", "edge_scorer")),
  ("agglomerate", ("threshold", "baseline_threshold", "quantile", "constraints",
                   "nucleus_fraction", "min_segment_voxels", "interior_bonus",
                   "track_threshold", "seeds", "sweep", "hierarchy", "levels")),
  ("remap", ()),
  ("mesh", ("sharded",)),
  ("downsample", ()),
)
STEP_NAMES = tuple(name for name, _ in STEPS)
# stage records and done markers by the step whose outputs they depend on: the pyramids of
# the image and of the inference layers need no redoing when a later step changes
_STAGE_STEPS = (("inference", "inference"), ("watershed", "watershed"), ("rag", "rag"),
                ("nodes", "agglomerate"), ("reduce", "agglomerate"),
                ("agglomerate", "agglomerate"), ("track", "agglomerate"), ("remap", "remap"),
                ("mesh", "mesh"), ("skeleton", "mesh"), ("downsample-segmentation", "remap"),
                ("downsample", "inference"))


def _step_of(stage: str) -> int | None:
  return next((STEP_NAMES.index(step) for prefix, step in _STAGE_STEPS
               if stage.startswith(prefix)), None)


def _redone_from(stage: str, first_step: int) -> bool:
  """Whether redoing step first_step and the later ones redoes this stage."""
  step = _step_of(stage)
  return step is not None and (step >= first_step or (
    first_step == STEP_NAMES.index("downsample") and stage.startswith("downsample")))


RUN_LAYERS = ("affinities", "organelles", "supervoxels", "segmentation",
              "segmentation_baseline")  # the layers a run writes under OUT


def refuse_foreign_layers(out: str) -> None:
  """Layers of the names a run writes, in a folder that holds no run record: another tool's
  or a user's data, which the stages would overwrite chunk by chunk. Checked before the run
  writes anything there (its queue included)."""
  if get_json(join(out, "pipeline"), "run.json"):
    return
  found = [name for name in RUN_LAYERS if layer_exists(join(out, name))]
  if found:
    raise IicatsError(f"{out}: holds {', '.join(found)} layer(s) but no run record "
                      "(pipeline/run.json), so not a run of iicats pipeline, whose stages "
                      "would overwrite them; give another --out")


class Pipeline:
  """Runs stages on one queue, recording per-stage timings under OUT/pipeline/."""

  def __init__(self, out: str, queue: str | None, parallel: int | None, lease_sec: int = 600):
    self.out = out
    self.state = join(out, "pipeline")
    if queue is None:
      # the run's own file queue: resumable and inspectable with `iicats queue status`
      base = local_path(out)
      queue = "fq://" + (os.path.join(base, "pipeline", "queue") if base
                         else tempfile.mkdtemp(prefix="iicats-queue-"))
      parallel = parallel or 1
      # an interrupted run's tasks, some leased by workers that are gone: waiting for their
      # leases would stall this run; each stage re-creates what its done-markers lack
      open_queue(queue).purge()
    open_queue(queue)
    self.queue = queue
    self.parallel = parallel
    self.lease_sec = lease_sec
    self.timings = {}
    self.worker_memory = {}  # stage -> the largest peak memory of its worker processes, bytes

  def reconcile(self, settings: dict, rerun_from: str | None, outputs: dict) -> None:
    """Record this run's settings in OUT/pipeline/run.json, after checking them against a
    previous run's there, so that a finished stage is reused only under the settings that made
    it. rerun_from (a STEP_NAMES entry): clear that step's and the later steps' records and
    their task objects (outputs: {step index: [cloudpath prefixes]}), so they run again.
    settings["region"]: [mip, x0, y0, z0, x1, y1, z1] of the run's region, None (or absent)
    for the whole image at mip 0.
    Raises IicatsError, before anything is written, for another image or region, or for
    changed settings of a step that has finished work and is not redone."""
    settings = json.loads(json.dumps({**settings, "out": self.out}))  # tuples become lists
    previous = get_json(self.state, "run.json") or {}

    def image_within_run(run):  # an image inside OUT moves with it
      image, out = run["image"], run.get("out", "")
      return image.replace(out, "OUT", 1) if out and image.startswith(out + "/") else image

    def what(run):
      region = run.get("region")
      return f"image {run['image']}" + (
        f" (mip {region[0]}, voxels {region[1:4]}-{region[4:]})" if region else "")

    if previous and (image_within_run(previous), previous.get("region")) != (
        image_within_run(settings), settings.get("region")):
      raise IicatsError(f"{self.out}: holds a run of {what(previous)}, not of "
                        f"{what(settings)}: give another --out")
    start = STEP_NAMES.index(rerun_from) if rerun_from else len(STEPS)
    for step, (name, keys) in enumerate(STEPS[:start]):
      changed = [key for key in keys if key != "image" and key in previous
                 and previous[key] != settings[key]]
      if changed and self._state_keys(step):
        text = ", ".join(f"{key} {json.dumps(previous[key])} (now {json.dumps(settings[key])})"
                         for key in changed)
        raise IicatsError(f"{self.out}: its {name} stage ran with {text}; reusing it would "
                          f"give the old results. Add --rerun-from {name} to redo it and the "
                          "stages after it (their outputs there are replaced), or give "
                          "another --out")
    if rerun_from:
      stale = self._state_keys(start)
      CloudFiles(resolve_cloudpath(self.state)).delete(stale)
      for prefix in (p for step, prefixes in outputs.items() if step >= start
                     for p in prefixes):
        objects = CloudFiles(resolve_cloudpath(prefix))
        objects.delete(list(objects.list()))
      print(f"[{rerun_from}] re-running it and the stages after it ({len(stale)} records of "
            "the previous run cleared)", flush=True)
    put_json(self.state, "run.json", settings)

  def _state_keys(self, first_step: int) -> list:
    """Stage records and task done-markers of step first_step and later, as state keys."""
    state = CloudFiles(resolve_cloudpath(self.state))
    stages = [(key, key.split("/")[-1].removesuffix(".json"))
              for key in state.list(prefix="stages/")]
    stages += [(key, key.split("/")[1]) for key in state.list(prefix="done/")]
    return [key for key, stage in stages if _redone_from(stage, first_step)]

  def done(self, stage) -> dict | None:
    return get_json(self.state, f"stages/{stage}.json")

  def stage(self, name, make_tasks):
    """Run one stage unless a previous run finished it."""
    record = self.done(name)
    if record is not None:
      self.timings[name] = record["seconds"]
      if record.get("worker_peak_bytes"):
        self.worker_memory[name] = record["worker_peak_bytes"]
      print(f"[{name}] already done in a previous run ({record['seconds']:.1f} s): skipped")
      return
    started = time.time()
    tasks = list(make_tasks())
    peak = run_tasks(tasks, self.queue, self.parallel, desc=name, lease_sec=self.lease_sec,
                     state_prefix=self.state)
    seconds = time.time() - started
    self.timings[name] = round(seconds, 2)
    record = {"seconds": round(seconds, 2), "tasks": len(tasks)}
    if peak:
      self.worker_memory[name] = record["worker_peak_bytes"] = peak
    put_json(self.state, f"stages/{name}.json", record)
    print(f"[{name}] done in {seconds:.1f} s"
          + (f"; worker processes peaked at {gib_text(peak)}" if peak else ""), flush=True)


def validate_inputs(image, gt_labels=None, gt_skeletons=None, seeds=None, nuclei=None,
                    synapses=None, mip=0, bounds=None):
  """Everything the run reads, checked before anything is written -> (image layer at mip,
  the run's region: a Bbox in voxels at that mip, seed points nm or None)."""
  image_cv = open_layer(image, mip=mip, layer_type="image", dtypes=IMAGE_DTYPES, num_channels=1,
                        what="image layer")
  region = region_bbox(bounds, image_cv, f"image layer {image}")
  if gt_labels:
    gt_cv = open_layer(gt_labels, layer_type="segmentation", what="ground-truth layer")
    gt_mip = scale_at_resolution(gt_cv, image_cv.resolution, f"ground-truth layer {gt_labels}",
                                 at="the run's resolution")
    overlap = Bbox.intersection(gt_cv.meta.bounds(gt_mip), region)
    if overlap.subvoxel():
      raise IicatsError(f"ground-truth layer {gt_labels}: its bounds "
                        f"{box_text(gt_cv.meta.bounds(gt_mip))} do not overlap the run's "
                        f"region {box_text(region)} (voxels at mip {mip})")
  if gt_skeletons and "://" not in gt_skeletons and not os.path.isdir(gt_skeletons):
    raise IicatsError(f"--gt-skeletons {gt_skeletons}: not a directory of SWC files")
  if gt_skeletons and "://" not in gt_skeletons:
    from iicats_cv.evaluate import point_voxels
    from iicats_cv.metrics import concatenate_skeletons
    from iicats_cv.skeletons import read_swc_dir
    # malformed files fail now, not after hours of inference; so do skeletons elsewhere
    nodes_nm = concatenate_skeletons(read_swc_dir(gt_skeletons)).vertices_nm
    _, inside = point_voxels(nodes_nm, image_cv.resolution, region.minpt, region.size3())
    if len(nodes_nm) and not inside.any():
      lo, hi = (np.asarray(p, float) * image_cv.resolution for p in (region.minpt,
                                                                     region.maxpt))
      raise IicatsError(f"--gt-skeletons {gt_skeletons}: none of their {len(nodes_nm)} nodes "
                        f"lies in the run's region ({lo.tolist()}-{hi.tolist()} nm); they span "
                        f"{nodes_nm.min(axis=0).tolist()}-{nodes_nm.max(axis=0).tolist()} nm: "
                        "are they in nm, in the image layer's frame?")
  from iicats_cv.skeletons import read_nuclei_csv, read_synapses_csv
  if nuclei:
    read_nuclei_csv(nuclei)
  if synapses:
    read_synapses_csv(synapses)
  seeds_nm = None
  if seeds:
    from iicats_cv.seeds import read_seed_points, seeds_in_volume
    seeds_nm = seeds_in_volume(read_seed_points(seeds), region, image_cv.resolution, seeds)
  return image_cv, region, seeds_nm


def run_pipeline(image: str, out: str, queue: str | None = None, parallel: int | None = None,
                 task_shape=(128, 128, 128), checkpoint: str | None = None,
                 seeds: str | None = None, gt_labels: str | None = None,
                 gt_skeletons: str | None = None, nuclei: str | None = None,
                 synapses: str | None = None, json_path: str | None = None,
                 threshold: float | None = None, baseline_threshold: float | None = None,
                 track_threshold: float | None = None,
                 sweep=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8), meshes: bool = True,
                 report: bool = True, link_prefix: str | None = None, lease_sec: int = 600,
                 num_mips: int = 2, constraints=None,
                 sharded: bool = True, quantile: float | str | None = None,
                 nucleus_fraction: float | None = None, hierarchy: int | None = None,
                 levels: int = 1, augment: bool = False,
                 min_segment_voxels: int | None = None,
                 synapse_boundary: float | None = None, boundary_tolerance_nm: float = 0.0,
                 interior_bonus: float | None = None, rerun_from: str | None = None,
                 mip: int = 0, bounds=None, fill_missing: bool = False,
                 image_window=None):
  """Run every stage from an EM image layer to segmentation, meshes, link and metrics.

  mip: the image's mip to segment (its resolution is every output layer's mip 0); bounds:
  the region, x0,y0,z0,x1,y1,z1 voxels at that mip (text or 6 integers; None: the whole
  image), which becomes the output layers' bounds. Inference reads real image context around
  it. fill_missing: the image's missing chunks are read as black (0) instead of failing.
  image_window: grey values [lo, hi] mapped onto the model's 0..255 (None: an image not of
  uint8 gets its percentiles, inference.resolve_window).

  augment: test-time augmentation in the inference stage (create_inference_tasks).
  threshold, quantile ("mean" or q in (0, 1)), constraints, min_segment_voxels (the dust
  cleanup), interior_bonus (AgglomerationParams): the agglomeration setting; None takes the
  checkpoint's calibrated operating point (calibrate.agglomeration_settings), as do the
  organelle probability cuts of the RAG's evidence.
  baseline_threshold: the unconstrained baseline's threshold, where it is compared at its
  own calibrated threshold (None: threshold). With hierarchy it cannot exceed threshold: the
  parts are merged down to threshold before the global step.
  nucleus_fraction: the share of a fragment that must be nucleus for it to count as nuclear
  (AgglomerationParams.nucleus_fraction when None).
  synapse_boundary: added to the watershed's boundary map where the synapse channel exceeds
  its cut (watershed.fragments); None: watershed.SYNAPSE_BOUNDARY when the constraints use
  synapse evidence, else 0.
  boundary_tolerance_nm: with gt_labels, also score VOI and ARAND without the voxels this
  close to a ground-truth interface (evaluate's *_tolerant metrics; 0: not).

  rerun_from: redo this step (a STEP_NAMES entry) and the later ones, with these settings, in
  an OUT that holds a previous run (Pipeline.reconcile); without it a previous run's finished
  stages are reused, and changed settings for them are refused.

  Returns the summary dict ({"layers", "neuroglancer_url", "metrics", "timings", ...}).
  """
  image = normalize_cloudpath(image)
  out = normalize_cloudpath(out)
  gt_labels = normalize_cloudpath(gt_labels) if gt_labels else None
  task_shape = tuple(int(t) for t in task_shape)
  image_cv, region, seeds_nm = validate_inputs(image, gt_labels, gt_skeletons, seeds, nuclei,
                                               synapses, mip, bounds)
  if boundary_tolerance_nm:
    if not gt_labels:
      raise IicatsError("a boundary tolerance scores dense ground truth: give gt_labels "
                        "(--gt-labels)")
    boundary_tolerance_steps(image_cv.resolution, boundary_tolerance_nm)
  check_task_shape(task_shape, LAYER_CHUNK_SIZE, out)
  image_window = resolve_window(image_cv, region, image, image_window)
  if rerun_from is not None and rerun_from not in STEP_NAMES:
    raise IicatsError(f"--rerun-from {rerun_from}: expected one of {', '.join(STEP_NAMES)}")
  if levels > 1 and not hierarchy:
    raise IicatsError(f"levels={levels} needs hierarchy (--hierarchy N): the parts of each "
                      "level are N×N×N parts of the level below")
  threshold, quantile, constraints, min_segment_voxels, organelle_cuts, scorer, interior_bonus = (
    resolve_operating_point(checkpoint, threshold, quantile, constraints, augment,
                            min_segment_voxels, interior_bonus))
  if baseline_threshold is None:
    baseline_threshold = threshold
  if hierarchy and baseline_threshold > threshold:
    raise IicatsError(f"baseline threshold {baseline_threshold} > threshold {threshold} with "
                      "--hierarchy: the parts are merged down to the threshold before the "
                      "baseline is agglomerated")
  if nucleus_fraction is None:
    nucleus_fraction = AgglomerationParams.nucleus_fraction
  if synapse_boundary is None:
    synapse_boundary = SYNAPSE_BOUNDARY if "synapse" in constraints else 0.0
  layers = {"image": image, **{name: join(out, name) for name in LAYERS[1:]},
            "segmentation_baseline": join(out, "segmentation_baseline")}
  if track_threshold is None:
    track_threshold = threshold
  # the report's curves pass through both operating points
  sweep = sorted({round(float(t), 3) for t in sweep} | {threshold, baseline_threshold})
  if hierarchy:
    # the first level merges down to the threshold, so the sweep can only go lower
    sweep = [t for t in sweep if t <= threshold]
  histograms = quantile is not None or scorer is not None
  refuse_foreign_layers(out)
  run = Pipeline(out, queue, parallel, lease_sec=lease_sec)
  segmentation_info = get_json(layers["segmentation"], "info") or {}
  run.reconcile(
    {"image": image, "region": None if mip == 0 and region == image_cv.bounds
     else [mip] + region.minpt.tolist() + region.maxpt.tolist(),
     "checkpoint": checkpoint or "default", "image_window": image_window,
     "test_time_augmentation": augment, "fill_missing": fill_missing, "task_shape": task_shape,
     "synapse_boundary": synapse_boundary, "organelle_thresholds": organelle_cuts,
     "histograms": histograms, "edge_scorer": scorer is not None, "threshold": threshold,
     "baseline_threshold": baseline_threshold, "quantile": quantile,
     "constraints": list(constraints), "nucleus_fraction": nucleus_fraction,
     "min_segment_voxels": min_segment_voxels, "interior_bonus": interior_bonus,
     "track_threshold": track_threshold, "sweep": sweep,
     "seeds": None if seeds_nm is None else np.round(seeds_nm, 3).tolist(),
     "hierarchy": hierarchy, "levels": levels, "sharded": sharded},
    rerun_from,
    # per-task objects beside the layers, which another task grid would not overwrite
    {STEP_NAMES.index("watershed"): [join(layers["supervoxels"], "faces")],
     STEP_NAMES.index("rag"): [join(out, "rag")],
     STEP_NAMES.index("agglomerate"): [join(out, "hierarchy")],
     STEP_NAMES.index("mesh"): [join(layers["segmentation"], segmentation_info[key])
                                for key in ("mesh", "skeletons") if key in segmentation_info]})
  started = time.time()
  state = run.state
  memory_estimate, lines = memory_plan(task_shape, image_cv.resolution, region.size3(),
                                      parallel)
  print("\n".join(lines), flush=True)

  run.stage("inference", lambda: create_inference_tasks(
    image, layers["affinities"], layers["organelles"], checkpoint, task_shape,
    state_prefix=state, augment=augment, mip=mip, bounds=region, fill_missing=fill_missing,
    window=image_window))
  clear_patch_cache(layers["affinities"])
  run.stage("watershed", lambda: create_watershed_tasks(
    layers["affinities"], layers["supervoxels"], task_shape, state_prefix=state,
    organelles_path=layers["organelles"], synapse_boundary=synapse_boundary,
    synapse_cut=organelle_cuts[2], image_path=image, image_mip=mip,
    fill_missing=fill_missing, image_window=image_window))
  run.stage("rag", lambda: create_rag_tasks(
    layers["supervoxels"], layers["affinities"], layers["organelles"], join(out, "rag"),
    task_shape, state_prefix=state, histogram=histograms,
    organelle_thresholds=organelle_cuts, image_path=image if scorer is not None else "",
    image_mip=mip, fill_missing=fill_missing, image_window=image_window))
  params = {"threshold": threshold, "constraints": list(constraints), "quantile": quantile,
            "baseline_threshold": float(baseline_threshold),
            "track_threshold": track_threshold,
            "nucleus_fraction": nucleus_fraction, "min_segment_voxels": min_segment_voxels,
            "interior_bonus": interior_bonus}
  if scorer is not None:
    # in the bucket beside the RAG: task messages stay small (SQS takes at most 256 KiB)
    put_json(out, EDGE_SCORER_OBJECT, scorer)
    params["edge_scorer"] = EDGE_SCORER_OBJECT
  hierarchy_prefix = join(out, f"hierarchy/{hierarchy}") if hierarchy else ""
  if hierarchy:
    if scorer is not None:
      run.stage("nodes", lambda: create_node_table_tasks(
        join(out, "rag"), hierarchy_prefix, state_prefix=state))
    for level in range(1, levels + 1):
      run.stage("reduce" if level == 1 else f"reduce-{level}",
                lambda level=level: create_reduce_tasks(
                  layers["supervoxels"], join(out, "rag"), hierarchy_prefix, task_shape,
                  hierarchy, threshold, quantile, state_prefix=state, level=level,
                  constraints=constraints, nucleus_fraction=nucleus_fraction,
                  out_prefix=out, edge_scorer=params.get("edge_scorer", ""),
                  interior_bonus=interior_bonus))
    hierarchy_prefix = level_prefix(hierarchy_prefix, levels)
  run.stage("agglomerate", lambda: [partial(agglomerate_task,
    rag_prefix=join(out, "rag"), supervoxels_path=layers["supervoxels"], out_prefix=out,
    params=params, sweep=list(sweep), seeds_nm=None if seeds_nm is None else seeds_nm.tolist(),
    track=True, state_prefix=state, hierarchy_prefix=hierarchy_prefix)])
  baseline_params = {**params, "threshold": baseline_threshold, "constraints": []}
  run.stage("remap", lambda: create_remap_tasks(
    layers["supervoxels"], layers["segmentation"], out, task_shape, state_prefix=state,
    method={"agglomeration": params, "hierarchy": hierarchy, "levels": levels})
    + create_remap_tasks(layers["supervoxels"], layers["segmentation_baseline"], out,
                         task_shape, column="baseline_ids", state_prefix=state,
                         method={"agglomeration": baseline_params}))
  if meshes:
    seg = layers["segmentation"]
    run.stage("mesh", lambda: ig.in_run(ig.mesh_tasks(seg, task_shape, sharded=sharded), state))
    run.stage("mesh-merge", lambda: ig.in_run(ig.mesh_merge_tasks(seg, sharded=sharded), state))
    run.stage("skeleton", lambda: ig.in_run(
      ig.skeleton_tasks(seg, task_shape, sharded=sharded), state))
    run.stage("skeleton-merge", lambda: ig.in_run(
      ig.skeleton_merge_tasks(seg, sharded=sharded), state))
    check = ig.validate_layer(seg)
    if check["problems"]:
      raise IicatsError(f"segmentation {seg}: meshes/skeletons incomplete: "
                        + "; ".join(check["problems"])
                        + " (`--rerun-from mesh` makes them again)")
  for name in PYRAMID_LAYERS:
    if name == "image" and not out_owns(out, image):
      continue  # never write into the user's input layer
    size, resolution = ((image_cv.meta.volume_size(0), image_cv.meta.resolution(0))
                        if name == "image" else (region.size3(), image_cv.resolution))
    depth = ig.pyramid_depth(size, resolution, num_mips)
    if depth < num_mips and name == "segmentation":
      print(f"note: {depth} of the {num_mips} mips of the layers: the next would have fewer "
            f"than 32 voxels on a downsampled axis ({'×'.join(map(str, size))} voxels)",
            flush=True)
    for level in range(depth):
      run.stage(f"downsample-{name}-{level + 1}",
                lambda n=name, m=level: ig.in_run(ig.downsample_tasks(layers[n], m), state))

  tracked = get_json(out, "tracked.json") or []
  summary = {"layers": layers, "tracked": tracked, "queue": run.queue,
             "agglomeration": get_json(out, "agglomeration/summary.json")}
  t0 = time.time()
  # a box of the image is scored on the skeletons' part inside it: their cable beyond the
  # box is no error of this run (the note says how much is left out)
  summary["metrics"] = evaluate_run(out, layers, gt_labels, gt_skeletons, nuclei, synapses,
                                    boundary_tolerance_nm,
                                    crop_skeletons=region != image_cv.bounds)
  run.timings["evaluate"] = round(time.time() - t0, 2)
  summary["neuroglancer_url"], summary["neuroglancer_state"] = make_link(
    out, layers, tracked, link_prefix)
  summary["timings"] = {**run.timings, "total": round(time.time() - started, 2)}
  summary["worker_peak_bytes"] = run.worker_memory
  summary["worker_memory_estimate_bytes"] = memory_estimate
  if report:
    summary["report"] = write_run_report(out, summary)
  put_json(out, "summary.json", summary)
  if json_path:
    with open(json_path, "w") as fh:
      json.dump(summary, fh, indent=1)
  return summary


def resolve_operating_point(checkpoint, threshold, quantile, constraints, augment=False,
                            min_segment_voxels=None, interior_bonus=None):
  """The run's (threshold, quantile or None for the mean, constraints, min_segment_voxels,
  organelle cuts, edge scorer or None, interior_bonus): what the caller gave, the rest from
  the checkpoint's calibrated operating point (with a note when that was calibrated with
  test-time augmentation on and the run has it off, or the other way round).

  quantile "learned" (or None where the checkpoint's operating point is its learned edge
  scorer) uses that scorer, with the scorer's calibrated setting; any other statistic takes
  the unset options from the best affinity statistic's calibrated setting."""
  from iicats_cv.calibrate import agglomeration_settings, organelle_thresholds
  from iicats_cv.model import checkpoint_metadata, trained_outputs
  metadata = checkpoint_metadata(checkpoint)
  taught = trained_outputs(metadata)
  if taught is not None and "affinities" not in taught:
    raise IicatsError(f"checkpoint {checkpoint or 'default'}: its affinity channels were never "
                      f"trained (it learnt {', '.join(sorted(taught)) or 'nothing'}), so it "
                      "cannot segment neurons: segment with a model trained with --labels, and "
                      "take this one's organelles with `iicats infer`")
  point = metadata.get("operating_point") or {}
  if not point.get("agglomeration") and (threshold is None or constraints is None):
    print(f"note: checkpoint {checkpoint or 'default'} has no calibrated operating point, so "
          "the unset agglomeration options take the uncalibrated defaults (mean affinity, "
          "threshold 0.5, every kind of evidence); `iicats calibrate --checkpoint ... --image "
          "... --labels ...` chooses them on your ground truth", flush=True)
  calibration = point.get("calibration")
  if calibration and bool(calibration.get("test_time_augmentation")) != augment:
    print(f"note: checkpoint {checkpoint or 'default'} was calibrated with test-time "
          f"augmentation {'on' if not augment else 'off'}; this run has it "
          f"{'on' if augment else 'off'} (--tta)", flush=True)
  chosen = agglomeration_settings(metadata)
  scorer = point.get("edge_scorer")
  learned = quantile == "learned" or (quantile is None and chosen["learned"])
  if learned and not scorer:
    raise IicatsError(f"checkpoint {checkpoint or 'default'}: has no learned edge scorer "
                      "(`iicats calibrate --labels ...` trains one); use --quantile mean or a "
                      "quantile")
  if learned != chosen["learned"]:
    source = scorer["setting"] if learned else point.get("classic_agglomeration", {})
    chosen = agglomeration_settings({"operating_point": {"agglomeration": source}})
  threshold = chosen["threshold"] if threshold is None else threshold
  quantile = chosen["quantile"] if quantile in (None, "learned") else quantile
  constraints = tuple(chosen["constraints"] if constraints is None else constraints)
  if min_segment_voxels is None:
    min_segment_voxels = chosen["min_segment_voxels"]
  if interior_bonus is None:
    interior_bonus = chosen["interior_bonus"]
  return (float(threshold), None if quantile in (None, "mean") else float(quantile),
          constraints, int(min_segment_voxels), organelle_thresholds(metadata),
          scorer if learned else None, float(interior_bonus))


def out_owns(out: str, path: str) -> bool:
  return path.startswith(out.rstrip("/") + "/")


def evaluate_run(out, layers, gt_labels, gt_skeletons, nuclei, synapses,
                 boundary_tolerance_nm=0.0, crop_skeletons=False) -> dict:
  """Metrics of the constrained segmentation and of the unconstrained baseline, plus
  ERL/bERL/nERL along the agglomeration threshold sweep of each ("sweep", "baseline_sweep");
  crop_skeletons: on the skeletons cropped to the run's layers (evaluate.evaluate)."""
  from iicats_cv.evaluate import evaluate, evaluate_tables
  from .common import get_npz
  if not (gt_labels or gt_skeletons):
    return {}
  metrics = {"boundary_tolerance_nm": boundary_tolerance_nm} if boundary_tolerance_nm else {}
  for key, layer in (("", layers["segmentation"]), ("baseline_", layers["segmentation_baseline"])):
    result = evaluate(layer, skeletons=gt_skeletons, nuclei=nuclei, synapses=synapses,
                      gt_labels=gt_labels, boundary_tolerance_nm=boundary_tolerance_nm,
                      notes=not key,  # the baseline's inputs and extent are the same
                      crop_skeletons=crop_skeletons)
    for name in ("erl", "berl", "nerl", "total_length", "voi_split", "voi_merge", "arand",
                 "voi_split_tolerant", "voi_merge_tolerant", "arand_tolerant",
                 "n_nucleus_violating_segments", "n_merged_synapses"):
      if result.get(name) is not None:
        metrics[key + name] = result[name]
    if not key:
      metrics["details"] = result
  if gt_skeletons:
    tables = get_npz(out, "agglomeration/table.npz")
    for prefix in ("sweep_", "baseline_sweep_"):
      sweep = {float(k[len(prefix):]): (tables["fragment_ids"], tables[k])
               for k in tables if k.startswith(prefix)}
      if sweep:
        metrics[prefix[:-1]] = evaluate_tables(layers["supervoxels"], sweep, gt_skeletons,
                                               nuclei, synapses, crop_skeletons=crop_skeletons)
  return metrics


def make_link(out, layers, tracked, prefix=None, tracked_layers=None):
  """Neuroglancer URL + state; local layers are addressed through `iicats view`'s server.
  tracked_layers: {name: (cloudpath, ids)} as build_state takes them. The image is shown in
  the grey-value window the run mapped (OUT/pipeline/run.json)."""
  from iicats_cv.viewer.link import build_state, state_to_url, state_json, layer_geometry
  from iicats_cv.viewer.server import DEFAULT_PORT, INPUT_IMAGE_MOUNT
  local = local_path(out)

  def served_path(cloudpath):
    """Where `iicats view OUT` serves a local layer: its path relative to OUT, or the input
    image's mount when that lies elsewhere; None for a layer it cannot serve."""
    path = local_path(cloudpath)
    rel = os.path.relpath(path, local) if path is not None and local else None
    if rel is not None and rel.startswith("..") and cloudpath == layers.get("image"):
      return INPUT_IMAGE_MOUNT
    return None if rel is None or rel.startswith("..") else rel

  def source_url(cloudpath):
    return f"precomputed://http://127.0.0.1:{DEFAULT_PORT}/{served_path(cloudpath)}"

  present = {}
  for name, cloudpath in layers.items():
    if name not in LAYERS:
      continue
    if local_path(cloudpath) is not None and served_path(cloudpath) is None:
      print(f"note: {name} {cloudpath} is a local layer outside {out}, which `iicats view` "
            f"cannot serve: it is left out of the link", flush=True)
      continue
    present[name] = cloudpath
  window = (get_json(join(out, "pipeline"), "run.json") or {}).get("image_window")
  state = build_state(**present, segments=[n["id"] for n in tracked], source_url=source_url,
                      **layer_geometry(layers["segmentation"]), tracked_layers=tracked_layers,
                      image_window=window)
  kwargs = {"prefix": prefix} if prefix else {}
  return state_to_url(state, **kwargs), state_json(state)


def write_run_report(out, summary) -> str | None:
  from iicats_cv.evaluate import write_report
  details = summary["metrics"].get("details")
  if details is None or local_path(out) is None:
    return None
  directory = os.path.join(local_path(out), "report")
  write_report(details, directory, neuroglancer_url=summary["neuroglancer_url"],
               sweep=summary["metrics"].get("sweep"),
               baseline_sweep=summary["metrics"].get("baseline_sweep"))
  return os.path.join(directory, "index.html")
