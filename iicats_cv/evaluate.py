"""Evaluate a segmentation layer: ERL / bERL / nERL on ground-truth skeletons (with nuclei and
synapses as biological constraints), VOI and adapted Rand error on dense ground truth; JSON
results, an HTML report, and the `iicats evaluate` command.

Segment lookup follows DESIGN.md: a point at p nm lies in voxel floor(p / resolution) of the
layer's frame (voxel_offset honoured); points outside the layer get segment 0.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import click
import numpy as np

from .errors import FiniteFloatRange, IicatsError, check_output_path
from .layers import resolution_text
from .metrics import (adapted_rand_error, boundary_tolerance_mask, boundary_tolerance_steps,
                      concatenate_skeletons, crop_skeleton, run_length_metrics, voi)

# floor(p / r + FLOOR_EPS): positions computed as voxel * resolution in floating point (e.g.
# 3 * 4.6 nm) land a hair below the voxel corner; 1e-6 voxel is far below any real precision.
FLOOR_EPS = 1e-6
MAX_LOCATIONS = 1000  # error locations listed in the result (the counts are complete)
REMOTE_THREADS = 8


# --------------------------------------------------------------------------------------------
# segment lookup


def _open_segmentation(cloudpath_or_cv, mip: int, what: str = "segmentation"):
  """(cloudpath, CloudVolume) of a segmentation layer, checked."""
  from .layers import open_layer
  if hasattr(cloudpath_or_cv, "download") and hasattr(cloudpath_or_cv, "meta"):  # a CloudVolume
    cv = cloudpath_or_cv
    if mip < 0 or mip >= len(cv.info["scales"]):
      raise IicatsError(f"{what} {cv.cloudpath}: has no mip {mip}")
    return cv.cloudpath, cv
  cv = open_layer(str(cloudpath_or_cv), layer_type="segmentation", what=what)
  if mip < 0 or mip >= len(cv.info["scales"]):
    raise IicatsError(f"{what} {cloudpath_or_cv}: has no mip {mip} "
                      f"(it has {len(cv.info['scales'])})")
  cv.mip = mip
  if cv.dtype.kind not in "ui" or cv.num_channels != 1:
    raise IicatsError(f"{what} {cloudpath_or_cv}: expected one channel of integer labels, "
                      f"got {cv.num_channels} x {cv.dtype.name}")
  return str(cloudpath_or_cv), cv


def layer_geometry(cv, mip: int) -> dict:
  """Resolution (nm), voxel offset, size and chunk size (x, y, z) of a layer at mip."""
  return {"resolution": np.asarray(cv.meta.resolution(mip), np.float64),
          "offset": np.asarray(cv.meta.voxel_offset(mip), np.int64),
          "size": np.asarray(cv.meta.volume_size(mip), np.int64),
          "chunk": np.asarray(cv.meta.chunk_size(mip), np.int64)}


def point_voxels(points_nm: np.ndarray, resolution_nm, offset_vx, size_vx):
  """Voxels of points and whether they lie in the layer.

  points_nm: float (N, 3) (x, y, z) nm -> (voxels int64 (N, 3) = floor(p / resolution) in the
  layer frame, inside bool (N,) offset <= voxel < offset + size; non-finite points are
  outside)."""
  points = np.asarray(points_nm, np.float64).reshape(-1, 3)
  finite = np.all(np.isfinite(points), axis=1)
  voxels = np.zeros(points.shape, np.int64)
  scaled = np.floor(points[finite] / np.asarray(resolution_nm, np.float64) + FLOOR_EPS)
  scaled = np.clip(scaled, -2.0 ** 62, 2.0 ** 62)
  voxels[finite] = scaled.astype(np.int64)
  lo = np.asarray(offset_vx, np.int64)
  inside = finite & np.all(voxels >= lo, axis=1) & np.all(voxels < lo + np.asarray(size_vx),
                                                          axis=1)
  return voxels, inside


def lookup_segments(cloudpath_or_cv, points_nm, mip: int = 0, return_inside: bool = False):
  """Segment id at each point of a precomputed segmentation layer.

  points_nm: float (N, 3) (x, y, z) nm. Returns uint64 (N,): the label of voxel
  floor(point / resolution(mip)) in the layer frame, 0 outside the layer's bounds (and
  (ids, inside bool (N,)) with return_inside). Only the chunks that hold points are
  downloaded, one request per chunk (threaded for remote layers)."""
  cloudpath, cv = _open_segmentation(cloudpath_or_cv, mip)
  geo = layer_geometry(cv, mip)
  points = np.asarray(points_nm, np.float64).reshape(-1, 3)
  out = np.zeros(len(points), np.uint64)
  voxels, inside = point_voxels(points, geo["resolution"], geo["offset"], geo["size"])
  members = np.flatnonzero(inside)
  if members.size:
    grid = (voxels[members] - geo["offset"]) // geo["chunk"]
    chunks, inverse = np.unique(grid, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(chunks) + 1))

    def fetch(k):
      from cloudvolume import Bbox
      start = geo["offset"] + chunks[k] * geo["chunk"]
      stop = np.minimum(start + geo["chunk"], geo["offset"] + geo["size"])
      try:
        cutout = np.asarray(cv.download(Bbox(start, stop), mip=mip))
      except Exception as err:
        raise IicatsError(f"segmentation {cloudpath}: cannot read chunk {start.tolist()}-"
                          f"{stop.tolist()} at mip {mip} ({type(err).__name__}: {err})")
      nodes = members[order[bounds[k]:bounds[k + 1]]]
      local = voxels[nodes] - start
      out[nodes] = cutout[local[:, 0], local[:, 1], local[:, 2], 0]

    remote = not str(cloudpath).startswith(("file://", "mem://")) and "://" in str(cloudpath)
    if remote and len(chunks) > 1:
      with ThreadPoolExecutor(REMOTE_THREADS) as pool:
        list(pool.map(fetch, range(len(chunks))))
    else:
      for k in range(len(chunks)):
        fetch(k)
  return (out, inside) if return_inside else out


# --------------------------------------------------------------------------------------------
# inputs


def _points(value, reader, shape_tail, what) -> np.ndarray:
  """Points (nm) from an array or a CSV path -> float64 (M,) + shape_tail."""
  if value is None:
    return np.zeros((0,) + shape_tail)
  if isinstance(value, (str, os.PathLike)):
    return reader(str(value)).reshape((-1,) + shape_tail)
  array = np.asarray(value, np.float64)
  if array.size % int(np.prod(shape_tail)):
    raise IicatsError(f"{what}: expected rows of {int(np.prod(shape_tail))} coordinates (nm), "
                      f"got shape {array.shape}")
  array = array.reshape((-1,) + shape_tail)
  if not np.all(np.isfinite(array)):
    raise IicatsError(f"{what}: coordinates must be finite numbers")
  return array


def _dense_scores(seg_cv, seg_path, gt_labels, mip, boundary_tolerance_nm=0.0,
                  notes=True) -> dict:
  """VOI and adapted Rand error over the overlap of the segmentation at mip and the
  ground-truth layer's scale at the same resolution; both are downloaded whole over that box.
  With a boundary tolerance also voi_split_tolerant, voi_merge_tolerant and arand_tolerant
  over the voxels metrics.boundary_tolerance_mask keeps."""
  from cloudvolume import Bbox
  from .layers import read_box, scale_at_resolution
  gt_path, gt_cv = _open_segmentation(gt_labels, 0, what="ground-truth labels")
  seg_geo = layer_geometry(seg_cv, mip)
  gt_mip = scale_at_resolution(gt_cv, seg_geo["resolution"], f"ground-truth labels {gt_path}",
                               at=f"the segmentation's (mip {mip}) resolution")
  gt_cv.mip = gt_mip  # download() checks boxes against the bounds at cv.mip
  gt_geo = layer_geometry(gt_cv, gt_mip)
  start = np.maximum(seg_geo["offset"], gt_geo["offset"])
  stop = np.minimum(seg_geo["offset"] + seg_geo["size"], gt_geo["offset"] + gt_geo["size"])
  if np.any(stop <= start):
    raise IicatsError(f"ground-truth labels {gt_path}: does not overlap the segmentation "
                      f"{seg_path}")
  box = Bbox(start, stop)
  seg_box = Bbox(seg_geo["offset"], seg_geo["offset"] + seg_geo["size"])
  if box != seg_box and notes:
    share = np.prod(box.size3()) / np.prod(seg_box.size3())
    print(f"note: ground-truth labels {gt_path} cover {share:.0%} of the segmentation "
          f"({[int(v) for v in seg_box.minpt]}-{[int(v) for v in seg_box.maxpt]} voxels): "
          f"VOI and ARAND are scored on the overlap {[int(v) for v in start]}-"
          f"{[int(v) for v in stop]}", flush=True)
  seg_cv.mip = mip
  try:
    seg = read_box(seg_cv, box, "segmentation", seg_path)[..., 0]
    gt = read_box(gt_cv, box, "ground-truth labels", gt_path)[..., 0]
  except IicatsError:
    raise
  except Exception as err:
    raise IicatsError(f"cannot read {seg_path} / {gt_path} over {start.tolist()}-"
                      f"{stop.tolist()} ({type(err).__name__}: {err})")
  split, merge = voi(seg, gt)
  arand, precision, recall = adapted_rand_error(seg, gt, all_stats=True)
  scores = {"voi_split": split, "voi_merge": merge, "arand": arand,
            "rand_precision": precision, "rand_recall": recall,
            "dense_bbox_vx": [start.tolist(), stop.tolist()], "dense_voxels": int(seg.size),
            "gt_labels": gt_path}
  if boundary_tolerance_nm:
    keep = boundary_tolerance_mask(gt, seg_geo["resolution"], boundary_tolerance_nm)
    if notes and keep.mean() < 0.1:
      print(f"note: --boundary-tolerance-nm {boundary_tolerance_nm:g} leaves {keep.mean():.1%} "
            f"of the voxels to score (voxel size {resolution_text(seg_geo['resolution'])}): "
            "the *_tolerant scores say little", flush=True)
    split, merge = voi(seg[keep], gt[keep])
    scores.update({"boundary_tolerance_nm": float(boundary_tolerance_nm),
                   "tolerant_voxel_fraction": float(keep.mean()),
                   "voi_split_tolerant": split, "voi_merge_tolerant": merge,
                   "arand_tolerant": adapted_rand_error(seg[keep], gt[keep])})
  return scores


def _locate_violations(records, vertices_nm, nuclei_nm, synapses_nm) -> list[dict]:
  """Attach positions (nm) and a short description to metrics' violation records."""
  out = []
  for rec in records:
    item = {"segment": int(rec["segment"]), "kind": rec["kind"]}
    if rec["kind"] == "merge":
      item["position"] = vertices_nm[rec["node"]].tolist()
      item["skeletons"] = rec["skeletons"]
      shown = ", ".join(str(s) for s in rec["skeletons"][:10])
      more = f" and {len(rec['skeletons']) - 10} more" if len(rec["skeletons"]) > 10 else ""
      item["detail"] = f"joins skeletons {shown}{more}"
    elif rec["kind"] == "nuclei":
      item["position"] = nuclei_nm[rec["nucleus"]].tolist()
      item["count"] = rec["count"]
      item["detail"] = f"holds {rec['count']} nuclei"
    else:
      item["position"] = synapses_nm[rec["synapse"], 0].tolist()
      item["post_position"] = synapses_nm[rec["synapse"], 1].tolist()
      item["count"] = rec["count"]
      item["detail"] = f"holds pre and post of {rec['count']} synapse(s)"
    out.append(item)
  return out


def _split_locations(flat, node_segments, limit) -> tuple[int, list[dict]]:
  """Edges whose ends lie in two different non-zero segments (false splits) -> (count, up to
  `limit` dicts {skeleton, position (edge midpoint, nm), segments (the two, sorted)})."""
  a, b = flat.edges[:, 0], flat.edges[:, 1]
  sa, sb = node_segments[a], node_segments[b]
  split = np.flatnonzero((sa != sb) & (sa != 0) & (sb != 0))
  shown = split[:limit]
  mid = (flat.vertices_nm[a[shown]] + flat.vertices_nm[b[shown]]) / 2
  skel = flat.ids[flat.node_skeleton[a[shown]]]
  return len(split), [{"skeleton": int(s), "position": p, "segments": sorted([int(x), int(y)])}
                      for s, p, x, y in zip(skel.tolist(), mid.tolist(), sa[shown].tolist(),
                                            sb[shown].tolist())]


def ground_truth_violations(metrics: dict, n_nuclei: int, n_synapses: int) -> dict:
  """The ground-truth violations in run_length_metrics' output, for the kinds of points
  given: n_nucleus_violating_segments (segments holding two or more nuclei, with nuclei) and
  n_merged_synapses (synapses whose two partners lie in one segment, with synapses)."""
  counts = {}
  if n_nuclei:
    counts["n_nucleus_violating_segments"] = len(metrics["nucleus_violating_segments"])
  if n_synapses:
    counts["n_merged_synapses"] = metrics["n_merged_synapses"]
  return counts


def _cropped_to_layer(skeletons, geo, what: str, notes: bool = True) -> list:
  """The skeletons cropped to the layer's bounds (metrics.crop_skeleton), with a note on the
  nodes left out; none left is an IicatsError."""
  cropped, total, left_out = [], 0, 0
  for skeleton in skeletons:
    _, inside = point_voxels(skeleton.vertices_nm, geo["resolution"], geo["offset"],
                             geo["size"])
    total += len(inside)
    left_out += int(np.count_nonzero(~inside))
    kept = crop_skeleton(skeleton, inside)
    if kept is not None:
      cropped.append(kept)
  if total and not cropped:
    raise IicatsError(f"none of the {total} skeleton nodes lies in the {what}: nothing left "
                      "to score after cropping")
  if notes and left_out:
    print(f"note: ground-truth skeletons cropped to the {what}: {left_out} of their {total} "
          f"nodes lie outside it and are left out, with their edges", flush=True)
  return cropped


def _check_points_inside(seg_path, geo, points_nm, inside, kinds, notes=True) -> None:
  """Points in another frame than the layer's (µm for nm, another volume's offset) would
  each count as unsegmented and give an ERL of 0 or no violations without a word: none of
  the skeleton nodes inside is an error, most of any kind outside a note.
  kinds: (name, first, stop) index ranges of points_nm/inside."""
  lo = geo["offset"] * geo["resolution"]
  hi = (geo["offset"] + geo["size"]) * geo["resolution"]
  layer_box = f"{lo.tolist()}-{hi.tolist()} nm"
  for name, first, stop in kinds:
    total = stop - first
    outside = total - int(np.count_nonzero(inside[first:stop]))
    if not total or outside * 2 <= total:
      continue
    points = points_nm[first:stop]
    finite = points[np.all(np.isfinite(points), axis=1)]
    span = (f"they span {finite.min(axis=0).round(1).tolist()}-"
            f"{finite.max(axis=0).round(1).tolist()} nm" if len(finite) else "none is finite")
    text = (f"{outside} of the {total} {name} lie outside the segmentation {seg_path} "
            f"({layer_box}); {span}: are they in nm, in this layer's frame?")
    if name == "skeleton nodes" and outside == total:
      raise IicatsError(f"{text} Nothing would be measured")
    if notes:
      print(f"note: {text} Those outside count as unsegmented", flush=True)


def evaluate(segmentation, skeletons=None, nuclei=None, synapses=None, gt_labels=None,
             mip: int = 0, pooled: bool = False, max_locations: int = MAX_LOCATIONS,
             boundary_tolerance_nm: float = 0.0, skeleton_ids=None,
             notes: bool = True, crop_skeletons: bool = False) -> dict:
  """Evaluate a segmentation layer against ground truth.

  segmentation: cloudpath (or CloudVolume) of a segmentation layer; skeletons: list of
  Skeleton, an SWC directory or a precomputed layer cloudpath with skeletons (skeleton_ids:
  only those, e.g. the proofread neurons); nuclei: float
  (M, 3) nm or a CSV path (x,y,z); synapses: float (P, 2, 3) / (P, 6) nm or a CSV path
  (pre_x,...,post_z); gt_labels: cloudpath of dense ground-truth labels (VOI, ARAND);
  mip: the segmentation's mip; pooled: funlib-style pooled runs; boundary_tolerance_nm: also
  score VOI and ARAND without the voxels that close to a ground-truth interface (*_tolerant);
  notes: print the notes on the inputs (ground truth covering part of the layer, points
  outside it, a tolerance that leaves few voxels); crop_skeletons: score the skeletons cropped
  to the layer's bounds (a segmentation of part of the ground truth's volume) instead of
  counting their nodes outside it as unsegmented (DESIGN.md's definition, the default).

  Returns a JSON-able dict: erl, berl, nerl, total_length (nm; None without skeletons),
  voi_split, voi_merge, arand (only with gt_labels), counts, the ground_truth_violations
  (for the kinds of points given), `skeletons` (per-skeleton
  details, see metrics.run_length_metrics), `violations` ({segment, kind: merge | nuclei |
  synapse, position nm, detail}), `splits` (split edge locations, at most max_locations) and
  the input description. All inputs are read and checked before anything is computed."""
  from .skeletons import load_skeletons, read_nuclei_csv, read_synapses_csv
  seg_path, cv = _open_segmentation(segmentation, mip)
  skeleton_list = load_skeletons(skeletons, skeleton_ids) if skeletons is not None else []
  nuclei_nm = _points(nuclei, read_nuclei_csv, (3,), "nuclei")
  synapses_nm = _points(synapses, read_synapses_csv, (2, 3), "synapses")
  if skeletons is None and gt_labels is None and not len(nuclei_nm) and not len(synapses_nm):
    raise IicatsError("nothing to evaluate: give skeletons and/or ground-truth labels")
  geo = layer_geometry(cv, mip)
  if crop_skeletons:
    skeleton_list = _cropped_to_layer(skeleton_list, geo, f"segmentation {seg_path}", notes)
  flat = concatenate_skeletons(skeleton_list)
  if boundary_tolerance_nm:
    if gt_labels is None:
      raise IicatsError("a boundary tolerance needs ground-truth labels (--gt-labels)")
    boundary_tolerance_steps(geo["resolution"], boundary_tolerance_nm)

  points = np.concatenate([flat.vertices_nm, nuclei_nm, synapses_nm.reshape(-1, 3)])
  segments, inside = lookup_segments(cv, points, mip=mip, return_inside=True)
  n, m = flat.n_nodes, len(nuclei_nm)
  _check_points_inside(seg_path, geo, points, inside,
                       (("skeleton nodes", 0, n), ("nuclei", n, n + m),
                        ("synapse ends", n + m, len(points))), notes)
  node_segments = segments[:n]
  nucleus_segments = segments[n:n + m]
  synapse_segments = segments[n + m:].reshape(-1, 2)
  metrics = run_length_metrics(flat, node_segments, nucleus_segments, synapse_segments,
                               pooled=pooled)
  n_splits, splits = _split_locations(flat, node_segments, max_locations)
  violations = _locate_violations(metrics.pop("violations"), flat.vertices_nm, nuclei_nm,
                                  synapses_nm)
  result = {
    "segmentation": seg_path, "mip": int(mip),
    "resolution_nm": geo["resolution"].tolist(), "voxel_offset": geo["offset"].tolist(),
    "volume_size": geo["size"].tolist(),
    "skeleton_source": None if skeletons is None else (
      str(skeletons) if isinstance(skeletons, (str, os.PathLike))
      else f"{len(skeleton_list)} skeletons"),
    "erl": metrics.pop("erl"), "berl": metrics.pop("berl"), "nerl": metrics.pop("nerl"),
    "total_length": metrics.pop("total_length"), "skeletons_cropped": bool(crop_skeletons),
  }
  if skeletons is None:
    result["total_length"] = None
  result.update(ground_truth_violations(metrics, m, len(synapses_nm)))
  del metrics["n_merged_synapses"]  # reported above, where synapses were given
  result.update(metrics)
  result.update({
    "n_nuclei": int(m), "n_synapses": int(len(synapses_nm)),
    "n_nodes_outside": int(np.count_nonzero(~inside[:n])),
    "n_nuclei_outside": int(np.count_nonzero(~inside[n:n + m])),
    "n_split_edges": int(n_splits), "splits": splits, "violations": violations,
    "n_violations": len(violations),
  })
  if gt_labels is not None:
    result.update(_dense_scores(cv, seg_path, gt_labels, mip, boundary_tolerance_nm, notes))
  return result


def evaluate_tables(supervoxels, tables: dict, skeletons, nuclei=None, synapses=None,
                    mip: int = 0, crop_skeletons: bool = False) -> list[dict]:
  """ERL/bERL/nERL of several agglomerations of one supervoxel layer, without writing them
  (crop_skeletons: as evaluate's).

  tables: {threshold: (fragment_ids uint64 (F,), segment_ids uint64 (F,))}. Node, nucleus and
  synapse points are looked up in the supervoxels once; each table maps them to segments
  (a supervoxel missing from a table keeps its own id). Returns one dict per threshold,
  sorted: {threshold, erl, berl, nerl} and the ground_truth_violations.
  """
  from .skeletons import load_skeletons, read_nuclei_csv, read_synapses_csv
  path, cv = _open_segmentation(supervoxels, mip, what="supervoxels")
  skeleton_list = load_skeletons(skeletons)
  if crop_skeletons:
    skeleton_list = _cropped_to_layer(skeleton_list, layer_geometry(cv, mip),
                                      f"supervoxels {path}", notes=False)
  flat = concatenate_skeletons(skeleton_list)
  nuclei_nm = _points(nuclei, read_nuclei_csv, (3,), "nuclei")
  synapses_nm = _points(synapses, read_synapses_csv, (2, 3), "synapses")
  points = np.concatenate([flat.vertices_nm, nuclei_nm, synapses_nm.reshape(-1, 3)])
  fragments = lookup_segments(cv, points, mip=mip).astype(np.uint64)
  n, m = flat.n_nodes, len(nuclei_nm)
  rows = []
  for threshold, (fragment_ids, segment_ids) in sorted(tables.items()):
    index = np.clip(np.searchsorted(fragment_ids, fragments), 0, len(fragment_ids) - 1)
    found = (fragment_ids[index] == fragments) & (fragments != 0)
    segments = np.where(found, segment_ids[index], fragments)
    metrics = run_length_metrics(flat, segments[:n], segments[n:n + m],
                                 segments[n + m:].reshape(-1, 2), details=False)
    rows.append({"threshold": float(threshold), "erl": metrics["erl"],
                 "berl": metrics["berl"], "nerl": metrics["nerl"],
                 **ground_truth_violations(metrics, m, len(synapses_nm))})
  return rows


def write_json(result: dict, path: str) -> str:
  """Write the result as JSON (creating the folder)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(result, fh, indent=1)
  return path


# --------------------------------------------------------------------------------------------
# report


def position_linker(neuroglancer_url: str | None) -> Callable | None:
  """A link_for_position(xyz_nm) -> url built from a Neuroglancer URL ('...#!{state}'): the
  state's position moved to the point (x, y, z dimensions in metres). None when the URL holds
  no such state."""
  if not neuroglancer_url or "#!" not in neuroglancer_url:
    return None
  prefix, fragment = neuroglancer_url.split("#!", 1)
  try:
    state = json.loads(urllib.parse.unquote(fragment))
    dims = state["dimensions"]
    scale = np.array([float(dims[a][0]) for a in "xyz"])
    if any(dims[a][1] != "m" for a in "xyz"):
      return None
  except (ValueError, KeyError, TypeError, IndexError):
    return None

  def link(xyz_nm):
    moved = dict(state)
    moved["position"] = (np.asarray(xyz_nm, float) * 1e-9 / scale).tolist()
    text = json.dumps(moved, separators=(",", ":"))
    return prefix + "#!" + urllib.parse.quote(text, safe="~@#$&()*!+=:;,.?/'")
  return link


def _figure_png(fig) -> bytes:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  import matplotlib.pyplot as plt
  plt.close(fig)
  return buffer.getvalue()


def _run_length_figure(result):
  """Cable length per run-length bin (ERL and bERL runs), log bins, µm."""
  import matplotlib.pyplot as plt
  runs = [np.array([r for s in result.get("skeletons", []) for r in s[key]]) / 1000
          for key in ("runs", "berl_runs")]
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  positive = np.concatenate(runs)
  positive = positive[positive > 0]
  if positive.size:
    bins = np.geomspace(positive.min(), positive.max() * 1.0001, 30) if positive.min() < \
      positive.max() else np.array([positive.min() * 0.9, positive.max() * 1.1])
    for values, label in zip(runs, ("ERL runs", "bERL runs")):
      ax.hist(values[values > 0], bins=bins, weights=values[values > 0], alpha=0.55, label=label)
    ax.set_xscale("log")
    ax.legend()
  else:
    ax.text(0.5, 0.5, "no correct runs", ha="center", va="center", transform=ax.transAxes)
  ax.set_xlabel("run length (µm)")
  ax.set_ylabel("cable in runs of that length (µm)")
  ax.set_title("Run-length distribution")
  return fig


def _nucleus_figure(result):
  """Per neuron with a nucleus: r_s / L_s and the fraction of leaves reached."""
  import matplotlib.pyplot as plt
  neurons = [s for s in result.get("skeletons", []) if s.get("has_nucleus")]
  neurons.sort(key=lambda s: -(s["nucleus_fraction"] or 0))
  shown = neurons[:60]
  fig, ax = plt.subplots(figsize=(6.4, max(2.4, 0.22 * len(shown) + 1.2)))
  if shown:
    y = np.arange(len(shown))
    ax.barh(y - 0.2, [s["nucleus_fraction"] or 0 for s in shown], height=0.4,
            label="cable from nucleus (r_s / L_s)")
    ax.barh(y + 0.2, [s["leaf_fraction"] or 0 for s in shown], height=0.4,
            label="leaves reached")
    ax.set_yticks(y, [str(s["id"]) for s in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
  else:
    ax.text(0.5, 0.5, "no skeleton with a nucleus node", ha="center", va="center",
            transform=ax.transAxes)
  ax.set_xlabel("fraction")
  title = "Nucleus-connected completeness per neuron"
  ax.set_title(title + (f" (first {len(shown)} of {len(neurons)})"
                        if len(neurons) > len(shown) else ""))
  return fig


def _sweep_figure(sweep, baseline_sweep=None):
  """ERL, bERL, nERL (µm) against the agglomeration threshold; the unconstrained baseline's
  dashed in the same colours, when given."""
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  for rows, style, suffix in ((sweep, "-", ""), (baseline_sweep or [], "--", ", baseline")):
    rows = sorted(rows, key=lambda r: r["threshold"])
    for colour, (key, label) in enumerate((("erl", "ERL"), ("berl", "bERL"), ("nerl", "nERL"))):
      pts = [(r["threshold"], r[key] / 1000) for r in rows if r.get(key) is not None]
      if pts:
        ax.plot(*zip(*pts), style, marker="o", color=f"C{colour}", label=label + suffix)
  ax.set_xlabel("agglomeration threshold")
  ax.set_ylabel("µm")
  ax.set_title("Run lengths vs threshold")
  ax.legend(fontsize="small")
  return fig


def _fmt(value, unit=""):
  if value is None:
    return "–"
  if unit == "µm":
    return f"{value / 1000:.3f} µm"
  if unit == "nm":
    return f"{value:g} nm"
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def _position_cell(position, link_for_position):
  text = "(" + ", ".join(f"{v:.0f}" for v in position) + ") nm"
  if link_for_position is None:
    return html.escape(text)
  try:
    url = link_for_position(position)
  except Exception:
    url = None
  if not url:
    return html.escape(text)
  return f'<a href="{html.escape(url, quote=True)}" target="_blank">{html.escape(text)}</a>'


def _table(header, rows) -> str:
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


METRIC_ROWS = (("ERL", "erl", "µm"), ("bERL", "berl", "µm"), ("nERL", "nerl", "µm"),
               ("total GT cable", "total_length", "µm"), ("VOI split", "voi_split", ""),
               ("VOI merge", "voi_merge", ""), ("adapted Rand error", "arand", ""),
               ("boundary tolerance", "boundary_tolerance_nm", "nm"),
               ("VOI split, tolerant", "voi_split_tolerant", ""),
               ("VOI merge, tolerant", "voi_merge_tolerant", ""),
               ("adapted Rand, tolerant", "arand_tolerant", ""),
               ("skeletons", "n_skeletons", ""), ("with a nucleus", "n_nucleus_skeletons", ""),
               ("nodes", "n_nodes", ""), ("nodes outside the layer", "n_nodes_outside", ""),
               ("nodes in segment 0", "n_background_nodes", ""),
               ("merging segments", "merging_segments", "n"),
               ("violating segments (bERL)", "violating_segments", "n"),
               ("segments with two or more GT nuclei", "n_nucleus_violating_segments", ""),
               ("GT synapses with both partners in one segment", "n_merged_synapses", ""),
               ("split edges", "n_split_edges", ""))


# counted along skeletons: without any, "–" (not measured) rather than a measured 0
SKELETON_COUNTS = ("n_skeletons", "n_nucleus_skeletons", "n_nodes", "n_nodes_outside",
                   "n_background_nodes", "merging_segments", "violating_segments",
                   "n_split_edges")


def metric_rows(result) -> list[tuple[str, str]]:
  """(name, formatted value) for the metrics present in a result."""
  rows = []
  for name, key, unit in METRIC_ROWS:
    if key not in result:
      continue
    value = result[key]
    if key in SKELETON_COUNTS and not result.get("n_skeletons"):
      rows.append((name, "–"))
      continue
    rows.append((name, str(len(value)) if unit == "n" else _fmt(value, unit)))
  return rows


def write_report(result: dict, report_dir: str, neuroglancer_url: str | None = None,
                 sweep: Sequence[dict] | None = None,
                 baseline_sweep: Sequence[dict] | None = None,
                 link_for_position: Callable | None = None) -> str:
  """Write report_dir/index.html (self-contained: figures embedded, also saved beside it as
  PNG): metrics table, run-length distribution, per-neuron nucleus-connected completeness,
  ERL/bERL/nERL vs agglomeration threshold (sweep: list of {threshold, erl, berl, nerl};
  baseline_sweep: the same for the unconstrained agglomeration, beside it), constraint
  violations and split locations with Neuroglancer links (link_for_position(xyz_nm) -> url;
  by default derived from neuroglancer_url's state, else plain coordinates), and per-skeleton
  details. Returns the HTML path."""
  import matplotlib
  matplotlib.use("Agg")
  os.makedirs(report_dir, exist_ok=True)
  if link_for_position is None:
    link_for_position = position_linker(neuroglancer_url)
  figures = [("run_lengths.png", _run_length_figure(result)),
             ("nucleus_completeness.png", _nucleus_figure(result))]
  if sweep:
    figures.append(("threshold_sweep.png", _sweep_figure(sweep, baseline_sweep)))
  images = []
  for name, fig in figures:
    data = _figure_png(fig)
    with open(os.path.join(report_dir, name), "wb") as fh:
      fh.write(data)
    images.append(f'<img alt="{name}" src="data:image/png;base64,'
                  f'{base64.b64encode(data).decode()}">')
  parts = [f"<h1>Evaluation of {html.escape(str(result.get('segmentation', '')))}</h1>"]
  if neuroglancer_url:
    parts.append(f'<p><a href="{html.escape(neuroglancer_url, quote=True)}" target="_blank">'
                 "Open in Neuroglancer</a></p>")
  parts.append("<h2>Metrics</h2>" + _table(("metric", "value"), [
    (html.escape(n), html.escape(v)) for n, v in metric_rows(result)]))
  if sweep:
    baseline = {r["threshold"]: r for r in baseline_sweep or []}
    header = ["threshold", "ERL", "bERL", "nERL"]
    if baseline:
      header += ["baseline ERL", "baseline bERL", "baseline nERL"]
    rows = []
    for r in sorted(sweep, key=lambda r: r["threshold"]):
      rows.append([_fmt(r["threshold"])] + [_fmt(r.get(k), "µm") for k in ("erl", "berl", "nerl")]
                  + ([_fmt(baseline.get(r["threshold"], {}).get(k), "µm")
                      for k in ("erl", "berl", "nerl")] if baseline else []))
    parts.append("<h2>Threshold sweep</h2>" + images[2] + _table(header, rows))
  parts.append("<h2>Run lengths</h2>" + images[0])
  parts.append("<h2>Nucleus to spines</h2>" + images[1])
  violations = result.get("violations", [])
  parts.append(f"<h2>Constraint violations and merges ({len(violations)})</h2>" + _table(
    ("segment", "kind", "detail", "location"),
    [(str(v["segment"]), html.escape(v["kind"]), html.escape(v.get("detail", "")),
      _position_cell(v["position"], link_for_position)) for v in violations]))
  splits = result.get("splits", [])
  more = result.get("n_split_edges", len(splits)) - len(splits)
  parts.append(f"<h2>Split locations ({result.get('n_split_edges', len(splits))})</h2>" + _table(
    ("skeleton", "segments", "location"),
    [(str(s["skeleton"]), html.escape(" | ".join(str(x) for x in s["segments"])),
      _position_cell(s["position"], link_for_position)) for s in splits])
    + (f"<p>… and {more} more (see the JSON)</p>" if more > 0 else ""))
  parts.append("<h2>Skeletons</h2>" + _table(
    ("id", "length", "ERL", "bERL", "nucleus run / L", "leaves reached", "splits",
     "merging segments"),
    [(str(s["id"]), _fmt(s["length"], "µm"), _fmt(s["erl"], "µm"), _fmt(s["berl"], "µm"),
      _fmt(s["nucleus_fraction"]), _fmt(s["leaf_fraction"]), str(s["n_splits"]),
      html.escape(", ".join(str(x) for x in s["merging_segments"][:10])))
     for s in result.get("skeletons", [])]))
  style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;"
           "padding:2px 8px;text-align:left;font-size:13px}img{max-width:100%}")
  page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>iicats-cv evaluation"
          f"</title><style>{style}</style></head><body>" + "\n".join(parts) + "</body></html>")
  path = os.path.join(report_dir, "index.html")
  with open(path, "w", encoding="utf-8") as fh:
    fh.write(page)
  return path


# --------------------------------------------------------------------------------------------
# command line


def summary_line(result: dict) -> str:
  """One line: the run-length metrics, dense metrics, and error counts."""
  parts = []
  for name, key in (("ERL", "erl"), ("bERL", "berl"), ("nERL", "nerl")):
    if result.get(key) is not None:
      parts.append(f"{name} {result[key] / 1000:.3f} µm")
  if result.get("total_length") is not None:
    parts.append(f"over {result.get('n_skeletons', 0)} skeletons "
                 f"({result['total_length'] / 1000:.1f} µm)")
  for name, key in (("VOI split", "voi_split"), ("VOI merge", "voi_merge"),
                    ("ARAND", "arand")):
    if result.get(key) is not None:
      parts.append(f"{name} {result[key]:.4f}")
  if result.get("boundary_tolerance_nm"):
    parts.append(f"within {result['boundary_tolerance_nm']:g} nm of GT boundaries left out "
                 f"({result['tolerant_voxel_fraction']:.0%} of the voxels scored): "
                 f"VOI {result['voi_split_tolerant']:.4f} / {result['voi_merge_tolerant']:.4f},"
                 f" ARAND {result['arand_tolerant']:.4f}")
  parts.append(f"{len(result.get('merging_segments', []))} merging segment(s), "
               f"{len(result.get('violating_segments', []))} violating"
               + (f" ({result['n_merged_synapses']} merged synapse(s))"
                  if "n_merged_synapses" in result else "")
               + f", {result.get('n_split_edges', 0)} split edge(s)")
  return "; ".join(parts)


def _skeleton_ids(value: str) -> list[int]:
  """--skeleton-ids: '12,40' or a file of ids separated by commas, spaces or lines."""
  import re
  text = value
  if os.path.isfile(value):
    with open(value) as fh:
      text = fh.read()
  parts = [p for p in re.split(r"[\s,]+", text) if p]
  bad = [p for p in parts if not p.isdigit()]
  if bad or not parts:
    raise IicatsError(f"--skeleton-ids {value}: expected skeleton ids (positive integers) "
                      f"separated by commas{', got ' + repr(bad[0]) if bad else ''}")
  return sorted({int(p) for p in parts})


@click.command("evaluate")
@click.argument("segmentation", metavar="SEGMENTATION_CLOUDPATH")
@click.option("--skeletons", default=None, metavar="SWC_DIR_OR_CLOUDPATH",
              help="Ground-truth skeletons: a directory of SWC files (nm, type 1 = soma) or a "
                   "precomputed layer with skeletons.")
@click.option("--skeleton-ids", default=None, metavar="IDS_OR_FILE",
              help="Score only these skeletons (e.g. the proofread neurons): ids separated by "
                   "commas, or a file of ids (commas, spaces or lines).")
@click.option("--nuclei", default=None, metavar="CSV",
              help="Ground-truth nucleus points, CSV with header x,y,z (nm), all cells.")
@click.option("--synapses", default=None, metavar="CSV",
              help="Ground-truth synapses, CSV with header pre_x,pre_y,pre_z,post_x,post_y,post_z "
                   "(nm).")
@click.option("--gt-labels", default=None, metavar="CLOUDPATH",
              help="Dense ground-truth labels layer (VOI, adapted Rand error).")
@click.option("--boundary-tolerance-nm", type=FiniteFloatRange(min=0), default=0.0,
              show_default=True,
              help="Also score VOI and ARAND without the voxels this close to a ground-truth "
                   "interface (CREMI's border mask), for ground truth drawn up to the membrane.")
@click.option("--mip", type=int, default=0, show_default=True, help="Segmentation mip level.")
@click.option("--crop-skeletons", is_flag=True,
              help="Score the skeletons cropped to the segmentation's bounds (a segmentation "
                   "of part of the ground truth's volume); by default their nodes outside it "
                   "count as unsegmented.")
@click.option("--pooled", is_flag=True,
              help="Pool all correct edges of a segment within a skeleton (funlib.evaluate) "
                   "instead of connected runs.")
@click.option("--json", "json_path", default=None, metavar="OUT",
              help="Also write the full results (JSON) here.")
@click.option("--report", "report_dir", default=None, metavar="DIR",
              callback=lambda ctx, param, value: value and check_output_path(value, "--report",
                                                                             folder=True),
              help="Write an HTML report (with PNG figures) into DIR.")
def evaluate_command(segmentation, skeletons, skeleton_ids, nuclei, synapses, gt_labels,
                     boundary_tolerance_nm, mip, crop_skeletons, pooled, json_path, report_dir):
  """Score SEGMENTATION_CLOUDPATH: ERL, bERL, nERL on GT skeletons; VOI, ARAND on GT labels.

  \b
  Example:
    iicats evaluate gs://bucket/run/segmentation --skeletons gt/skeletons \\
      --nuclei gt/nuclei.csv --synapses gt/synapses.csv \\
      --gt-labels gs://bucket/gt/neurons --json metrics.json --report report/
  """
  if mip < 0:
    raise IicatsError(f"--mip must be >= 0, got {mip}")
  if skeletons is None and gt_labels is None:
    raise IicatsError("give --skeletons and/or --gt-labels (nothing to evaluate)")
  if json_path and os.path.isdir(json_path):
    raise IicatsError(f"--json {json_path}: is a directory; give a file name")
  if (nuclei or synapses) and skeletons is None:
    click.echo("note: --nuclei/--synapses only report violations without --skeletons")
  if skeleton_ids and skeletons is None:
    raise IicatsError("--skeleton-ids picks among --skeletons: give those too")
  result = evaluate(segmentation, skeletons=skeletons, nuclei=nuclei, synapses=synapses,
                    gt_labels=gt_labels, mip=mip, pooled=pooled, crop_skeletons=crop_skeletons,
                    boundary_tolerance_nm=boundary_tolerance_nm,
                    skeleton_ids=_skeleton_ids(skeleton_ids) if skeleton_ids else None)
  if json_path:
    write_json(result, json_path)
  rows = metric_rows(result)
  width = max(len(name) for name, _ in rows + [("metric", "")]) + 2
  click.echo(f"{'metric':<{width}}value")
  for name, value in rows:
    click.echo(f"{name:<{width}}{value}")
  if report_dir:
    click.echo(f"report: {write_report(result, report_dir)}")
  click.echo(summary_line(result) + (f" -> {json_path}" if json_path else ""))
