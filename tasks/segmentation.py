"""Watershed, RAG, agglomeration/tracking and remap tasks.

Data in the bucket, next to the layers (`OUT` is the run's prefix):
  OUT/supervoxels            uint64 fragments, globally unique ids (block index offsets)
  OUT/rag/<block>.npz        one RAG object per block (edges across its low faces included)
  OUT/hierarchy/<N>/level<L>/<part>.npz  with --hierarchy N: one part's region RAG and its
                             fragment -> region table, per level L of the hierarchy
  OUT/hierarchy/<N>/nodes/<block>.npz  with --hierarchy N and a learned edge scorer: the
                             stitched node of each fragment of a block RAG, with its totals
  OUT/agglomeration/table.npz  fragment -> segment tables (constrained, baseline, sweep)
  OUT/tracked.json           tracked neurons (id, seed, size)
  OUT/segmentation           uint64 agglomerated (and tracked) neurons
"""
from __future__ import annotations

import dataclasses
from functools import partial


import fastremap
import numpy as np
from cloudvolume import Bbox
from taskqueue import queueable

from iicats_cv.agglomerate import (AgglomerationParams, agglomerate, agglomerate_interior,
                                   derive_constraints)
from iicats_cv.edge_scorer import score_edge_pieces
from iicats_cv.errors import IicatsError
from iicats_cv.layers import (IMAGE_DTYPES, open_layer, create_layer, join, read_box,
                              resolve_cloudpath)
from iicats_cv.rag import (EDGE_FIELDS, block_rag, contract_stitched, merge_rags, relabel,
                          stitched_node_table)
from iicats_cv.watershed import (AXES, BACKGROUND_SIDE_NM, FLOOD_SEED_REACH, LATTICE_SPACING,
                                 face_agreement, fragments, image_background)
from .common import (LAYER_CHUNK_SIZE, block_grid, check_task_shape, mark_done, block_name,
                     done_names, put_npz, get_npz, put_json, get_json, read_image)
from cloudfiles import CloudFiles


EDGE_SCORER_OBJECT = "agglomeration/edge_scorer.json"


def agglomeration_params(params: dict, out_prefix: str) -> AgglomerationParams:
  """AgglomerationParams from a task's JSON params, whose "edge_scorer" (when set) names the
  learned edge scorer's object under out_prefix."""
  params = dict(params)
  if params.get("edge_scorer"):
    params["edge_scorer"] = _edge_scorer(out_prefix, params["edge_scorer"])
  return AgglomerationParams(**params)


def _edge_scorer(out_prefix: str, key: str) -> dict:
  scorer = get_json(out_prefix, key)
  if scorer is None:
    raise IicatsError(f"{join(out_prefix, key)}: the run's edge scorer is missing; run the "
                      "pipeline again")
  return scorer


def _probability_channels(cv, bbox, what: str, channels: int | None = None, first: int = 0,
                          keep_uint8: bool = False) -> np.ndarray:
  """Read a multi-channel probability layer (`channels` of it from channel `first`, or all)
  as float32 (c, x, y, z) in [0, 1]; a uint8 layer as read (value / 255 stands for the
  probability) where keep_uint8, a quarter of the memory."""
  data = read_box(cv, bbox if channels is None else
                  tuple(bbox.to_slices()) + (slice(first, first + channels),), what)
  data = np.moveaxis(data, -1, 0)
  if data.dtype == np.uint8:
    return data if keep_uint8 else data.astype(np.float32) / 255.0
  data = data.astype(np.float32)
  if not np.isfinite(data).all():
    raise IicatsError(f"{what} {cv.cloudpath}: NaN or inf values in {bbox}")
  return data


def check_affinities(path: str):
  """The affinities layer: x, y, z to the -1 neighbour, then optionally x, y, z per long-range
  distance (which the segmentation does not read)."""
  cv = open_layer(path, layer_type="image", dtypes=("uint8", "float32"), what="affinities layer")
  if cv.num_channels < 3 or cv.num_channels % 3:
    raise IicatsError(f"affinities layer {path}: has {cv.num_channels} channel(s), expected 3 "
                      "(x, y, z), plus 3 per long-range distance")
  return cv


SYNAPSE_CHANNEL = 2  # organelles layer: nucleus, mitochondria, synapse


def check_organelles(path: str, aff_cv):
  """The organelles layer (nucleus, mitochondria, synapse), on the affinities' voxel grid."""
  org_cv = open_layer(path, num_channels=3, what="organelles layer")
  if (list(org_cv.resolution) != list(aff_cv.resolution)
      or org_cv.bounds != aff_cv.bounds):
    raise IicatsError(f"organelles layer {path}: bounds {org_cv.bounds} at resolution "
                      f"{list(org_cv.resolution)} differ from the affinities' {aff_cv.bounds} "
                      f"at {list(aff_cv.resolution)}")
  return org_cv


def context_voxels(context_nm: float | None, resolution) -> np.ndarray:
  """Context per axis (voxels) for a physical margin: fewer voxels along a coarse z. The
  default is 48 voxels of the finest axis. With 24, 64³ tasks and one task over the FIB crop
  gave fragments that still differed near task faces, on 1.8% of the voxels. Mean-affinity
  agglomeration absorbed that (its segmentations came out 3e-6 ARAND apart), but the learned
  edge scorer sees each fragment's size and appearance, and its segmentations came out 0.0027
  apart. With 48 voxels of context they are 6e-5 apart."""
  res = np.asarray(resolution, float)
  if context_nm is None:
    context_nm = 48.0 * res.min()
  return np.maximum(1, np.round(context_nm / res)).astype(int)


@queueable
def watershed_task(affinities_path: str, supervoxels_path: str, start: list, stop: list,
                   block_index: int, id_stride: int, context_nm: float | None = None,
                   threshold: float = 0.5, min_size: int = 50, per_section: bool = False,
                   state_prefix: str = "", organelles_path: str = "",
                   synapse_boundary: float = 0.0, synapse_cut: float = 0.5,
                   image_path: str = "", image_mip: int = 0, fill_missing: bool = False,
                   image_window: list | None = None):
  """Fragments of one block, computed with `context_nm` of margin around it, ids offset by
  block_index * id_stride so they are unique across all blocks. Also stores, per face, where
  this watershed joins the voxels straddling the face (SUPERVOXELS/faces/BLOCK.npz): the rag
  stage stitches fragments that both blocks beside a face see as one.
  organelles_path, synapse_boundary, synapse_cut: where the organelles layer's synapse channel
  exceeds synapse_cut, synapse_boundary is added to the boundary map (watershed.fragments).
  image_path, image_mip, fill_missing, image_window: the EM image on the affinities' voxel
  grid, read as inference reads it; its black regions (watershed.image_background) get no
  fragment (label 0)."""
  aff_cv = check_affinities(affinities_path)
  bounds = aff_cv.bounds
  context = context_voxels(context_nm, aff_cv.resolution)
  lo = np.maximum(np.asarray(start) - context, bounds.minpt)
  hi = np.minimum(np.asarray(stop) + context, bounds.maxpt)
  affs = _probability_channels(aff_cv, Bbox(lo, hi), "affinity layer", channels=3,
                               keep_uint8=True)
  synapse = None
  if organelles_path and synapse_boundary > 0:
    org_cv = check_organelles(organelles_path, aff_cv)
    synapse = _probability_channels(org_cv, Bbox(lo, hi), "organelle layer", channels=1,
                                    first=SYNAPSE_CHANNEL)[0] > synapse_cut
  background = None
  if image_path:
    image_cv = open_layer(image_path, mip=image_mip, layer_type="image", dtypes=IMAGE_DTYPES,
                          num_channels=1, fill_missing=fill_missing, what="image layer")
    image = read_image(image_cv, Bbox(lo, hi), image_path, image_window)
    background = image_background(image, aff_cv.resolution)
    del image
  labels = fragments(affs, aff_cv.resolution, threshold=threshold, min_size=min_size,
                     per_section=per_section, synapse=synapse,
                     synapse_boundary=synapse_boundary, origin=lo, background=background)
  core_lo, core_hi = np.asarray(start) - lo, np.asarray(stop) - lo
  put_npz(join(supervoxels_path, "faces"), f"{block_name(start)}.npz",
          face_agreement(labels, core_lo, core_hi))
  block = labels[tuple(slice(a, b) for a, b in zip(core_lo, core_hi))]
  block, _ = fastremap.renumber(block, preserve_zero=True)
  block = block.astype(np.uint64)
  block[block > 0] += np.uint64(block_index) * np.uint64(id_stride)
  sv_cv = open_layer(supervoxels_path)
  sv_cv[tuple(slice(a, b) for a, b in zip(start, stop))] = block
  if state_prefix:
    mark_done(state_prefix, "watershed", block_name(start))


def create_watershed_tasks(affinities_path: str, supervoxels_path: str, task_shape,
                           threshold: float = 0.5, min_size: int = 50,
                           context_nm: float | None = None,
                           per_section: bool | None = None, state_prefix: str = "",
                           chunk_size=LAYER_CHUNK_SIZE, organelles_path: str = "",
                           synapse_boundary: float = 0.0, synapse_cut: float = 0.5,
                           image_path: str = "", image_mip: int = 0,
                           fill_missing: bool = False, image_window: list | None = None):
  """Watershed tasks over the affinities' bounds (watershed_task). With organelles_path and
  synapse_boundary > 0 the predicted synapses raise the boundary map (see fragments); with
  image_path (at image_mip, on the affinities' grid) its black regions stay unsegmented."""
  aff_cv = check_affinities(affinities_path)
  check_task_shape(task_shape, chunk_size, supervoxels_path)
  if synapse_boundary < 0:
    raise IicatsError(f"synapse_boundary must be >= 0, got {synapse_boundary}")
  if synapse_boundary > 0:
    if not organelles_path:
      raise IicatsError("synapse_boundary > 0 needs the organelles layer (its synapse channel)")
    check_organelles(organelles_path, aff_cv)
  else:
    organelles_path = ""
  bounds = aff_cv.bounds
  res = aff_cv.resolution
  if per_section is None:
    per_section = bool(res[2] > 2.5 * min(res[0], res[1]))
  create_layer(supervoxels_path, layer_type="segmentation", dtype="uint64",
               resolution=aff_cv.resolution, voxel_offset=bounds.minpt,
               volume_size=bounds.size3(), chunk_size=chunk_size, step="watershed",
               params={"affinities": affinities_path, "threshold": threshold,
                       "min_size": min_size,
                       "context_voxels": context_voxels(context_nm, res).tolist(),
                       "per_section": per_section,
                       "synapse_boundary": synapse_boundary,
                       "synapse_cut": synapse_cut, "organelles": organelles_path,
                       "task_shape": list(task_shape),
                       "flood": "local order: boundary level, seed distance (up to "
                                f"{FLOOD_SEED_REACH} voxels), global position hash",
                       "seed_lattice_voxels": LATTICE_SPACING,
                       "background": (f"black image regions {BACKGROUND_SIDE_NM:g} nm wide "
                                      f"({image_path}, mip {image_mip}) are 0"
                                      if image_path else None),
                       "ids": "local id + block index * voxels per block"})
  id_stride = int(np.prod(task_shape))
  done = done_names(state_prefix, "watershed") if state_prefix else set()
  return [
    partial(watershed_task, affinities_path=affinities_path, supervoxels_path=supervoxels_path,
                   start=lo, stop=hi, block_index=index, id_stride=id_stride,
                   context_nm=context_nm,
                   threshold=threshold, min_size=min_size, per_section=per_section,
                   state_prefix=state_prefix, organelles_path=organelles_path,
                   synapse_boundary=float(synapse_boundary), synapse_cut=float(synapse_cut),
                   image_path=image_path, image_mip=int(image_mip),
                   fill_missing=bool(fill_missing), image_window=image_window)
    for lo, hi, index in block_grid(bounds.minpt, bounds.maxpt, task_shape)
    if block_name(lo) not in done
  ]


@queueable
def rag_task(supervoxels_path: str, affinities_path: str, organelles_path: str,
             rag_prefix: str, start: list, stop: list, task_shape: list,
             state_prefix: str = "", histogram: bool = False,
             organelle_thresholds: list = (0.5, 0.5, 0.5), image_path: str = "",
             image_mip: int = 0, fill_missing: bool = False, image_window: list | None = None):
  """RAG of one block: voxel pairs whose upper voxel lies in the block (reads one voxel of
  context below each face that has a neighbour), with the stitching of its low faces.
  organelle_thresholds: nucleus, mitochondria, synapse probability cuts. image_path: the EM
  image layer, read at image_mip (the supervoxels' resolution) for the fragments' appearance
  (a learned edge scorer needs it), its missing chunks black with fill_missing, its grey
  values mapped with image_window as inference maps them."""
  sv_cv = open_layer(supervoxels_path, layer_type="segmentation", what="supervoxels layer")
  bounds = sv_cv.bounds
  context = [1 if s > b else 0 for s, b in zip(start, bounds.minpt)]
  lo = np.asarray(start) - np.asarray(context)
  block = Bbox(start, stop)
  supervoxels = read_box(sv_cv, Bbox(lo, stop), "supervoxels layer")[..., 0]
  aff_cv = check_affinities(affinities_path)
  affs = _probability_channels(aff_cv, block, "affinity layer", channels=3, keep_uint8=True)
  organelles = None
  if organelles_path:
    org_cv = check_organelles(organelles_path, aff_cv)
    organelles = _probability_channels(org_cv, Bbox(lo, stop), "organelle layer", keep_uint8=True)
  image = None
  if image_path:
    image_cv = open_layer(image_path, mip=image_mip, layer_type="image", dtypes=IMAGE_DTYPES,
                          num_channels=1, fill_missing=fill_missing, what="image layer")
    image = read_image(image_cv, block, image_path, image_window)
  agreement = _low_face_agreement(supervoxels_path, start, task_shape, context)
  rag = block_rag(supervoxels, affs, organelles, context, block_origin=start,
                  face_agreement=agreement, histogram=histogram,
                  organelle_threshold=list(organelle_thresholds), image=image)
  put_npz(rag_prefix, f"{block_name(start)}.npz", rag)
  if state_prefix:
    mark_done(state_prefix, "rag", block_name(start))


def _low_face_agreement(supervoxels_path, start, task_shape, context) -> dict:
  """{axis: bool face} where this block's and the lower neighbour's watersheds both join the
  voxels straddling the face."""
  faces = join(supervoxels_path, "faces")
  mine = get_npz(faces, f"{block_name(start)}.npz")
  agreement = {}
  for axis, name in enumerate(AXES):
    if context[axis]:
      below = list(start)
      below[axis] -= int(task_shape[axis])
      theirs = get_npz(faces, f"{block_name(below)}.npz")
      agreement[axis] = mine[f"{name}_low"] & theirs[f"{name}_high"]
  return agreement


def create_rag_tasks(supervoxels_path, affinities_path, organelles_path, rag_prefix,
                     task_shape, state_prefix="", histogram=False,
                     organelle_thresholds=(0.5, 0.5, 0.5), image_path="", image_mip=0,
                     fill_missing=False, image_window=None):
  sv_cv = open_layer(supervoxels_path, layer_type="segmentation", what="supervoxels layer")
  bounds = sv_cv.bounds
  done = done_names(state_prefix, "rag") if state_prefix else set()
  return [
    partial(rag_task, supervoxels_path=supervoxels_path, affinities_path=affinities_path,
             organelles_path=organelles_path or "", rag_prefix=rag_prefix, start=lo, stop=hi,
             task_shape=list(task_shape), state_prefix=state_prefix, histogram=histogram,
             organelle_thresholds=[float(t) for t in organelle_thresholds],
             image_path=image_path, image_mip=image_mip, fill_missing=fill_missing,
             image_window=image_window)
    for lo, hi, _ in block_grid(bounds.minpt, bounds.maxpt, task_shape)
    if block_name(lo) not in done
  ]


def _seed_fragments(rag, params, seeds_nm, supervoxels_path, stitching):
  """Seeds -> {seed number: node index in rag} and their positions (nm).

  Without explicit seeds every detected nucleus instance is a seed (its largest nuclear
  node). Explicit seeds (N, 3) nm are looked up in the supervoxels layer; `stitching` =
  (fragment ids, node id of each) takes a supervoxel id to its node.
  """
  frag = rag["frag_id"]
  sv_cv = open_layer(supervoxels_path)
  res = np.asarray(sv_cv.resolution)
  if seeds_nm is None:
    constraints, centroids = derive_constraints(rag, params)
    seeds, positions = {}, {}
    for k in range(1, int(constraints.nucleus.max(initial=0)) + 1):
      members = np.flatnonzero(constraints.nucleus == k)
      best = members[np.argmax(rag["frag_nucleus_voxels"][members])]
      seeds[k] = int(best)
      positions[k] = (centroids[k - 1] * res).tolist()
    return seeds, positions
  from iicats_cv.evaluate import lookup_segments
  points = np.asarray(seeds_nm, dtype=float).reshape(-1, 3)
  supervoxels = lookup_segments(sv_cv, points)  # one read per chunk holding seeds
  fragment_ids, node_of = stitching
  seeds, positions = {}, {}
  for k, (point, sv) in enumerate(zip(points, supervoxels.tolist()), start=1):
    at = np.searchsorted(fragment_ids, sv)
    if not sv or at == len(fragment_ids) or fragment_ids[at] != sv:
      continue  # outside the volume, or on background
    seeds[k] = int(np.searchsorted(frag, node_of[at]))
    positions[k] = point.tolist()
  return seeds, positions


def _npz_keys(prefix: str, what: str) -> list:
  keys = sorted(k for k in CloudFiles(resolve_cloudpath(prefix)).list(flat=True)
                if k.endswith(".npz"))
  if not keys:
    raise IicatsError(f"{prefix}: no {what} objects (did the previous stage run?)")
  return keys


def _stitched_rag(rag_prefix: str, hierarchy_prefix: str = ""):
  """The graph the global step agglomerates, stitched fragments contracted: (fragment ids
  (F,), node id of each (F,), node RAG, whether its edges already carry a learned edge
  scorer's probabilities). Built from every block RAG, or from the regions of the last level
  of the hierarchy when hierarchy_prefix (that level's prefix) is given."""
  if hierarchy_prefix:
    parts = [get_npz(hierarchy_prefix, k) for k in _npz_keys(hierarchy_prefix, "region RAG")]
    scored = [bool(p.pop("edge_scored", False)) for p in parts]
    if len(set(scored)) > 1:
      raise IicatsError(f"{hierarchy_prefix}: some parts were agglomerated with a learned "
                        "edge scorer and some without; remove the folder and run the reduce "
                        "stages again")
    fragments = np.concatenate([p.pop("fragments") for p in parts])
    regions = np.concatenate([p.pop("regions") for p in parts])
    order = np.argsort(fragments)
    fragments, regions = fragments[order], regions[order]
    if np.any(fragments[1:] == fragments[:-1]):
      raise IicatsError(f"{hierarchy_prefix}: parts overlap (objects left from a run with "
                        "other parts?); remove the folder and run the reduce stage again")
    # edge ends in other parts are fragment ids: rename them to their regions
    region_rag = merge_rags(relabel(p, fragments, regions) for p in parts)
    rag, node_of_region = contract_stitched(region_rag)
    return (fragments, node_of_region[np.searchsorted(region_rag["frag_id"], regions)], rag,
            scored[0])
  fragment_rag = merge_rags(get_npz(rag_prefix, k) for k in _npz_keys(rag_prefix, "RAG"))
  rag, node_of_fragment = contract_stitched(fragment_rag)
  return fragment_rag["frag_id"], node_of_fragment, rag, False


def _global_params(params: dict, out_prefix: str, hierarchy_prefix: str,
                   prescored: bool) -> AgglomerationParams:
  """The global step's AgglomerationParams (the baseline's own threshold left to the caller).
  After hierarchical reduction the learned scorer has already scored the edges (reduce_task),
  so it is not applied to the regions again."""
  p = agglomeration_params({k: v for k, v in params.items() if k != "baseline_threshold"},
                           out_prefix)
  if hierarchy_prefix and prescored != (p.edge_scorer is not None):
    raise IicatsError(f"{hierarchy_prefix}: the parts were reduced "
                      f"{'with' if prescored else 'without'} a learned edge scorer and this "
                      f"run's parameters name {'none' if prescored else 'one'}; remove the "
                      "folder and run the reduce stages again")
  return dataclasses.replace(p, edge_scorer=None) if prescored else p


NODES_FOLDER = "nodes"


@queueable
def node_table_task(rag_prefix: str, hierarchy_prefix: str, state_prefix: str = ""):
  """Hierarchical agglomeration with a learned edge scorer, before the reduce stage: the
  stitched node of every fragment and the node's totals (size, appearance) over the whole
  volume, which one part alone cannot know for nodes that cross its faces. One global task,
  holding every fragment's statistics and the stitch edges, not the RAG's other edges.
  Writes HIERARCHY/nodes/<block>.npz: the rows (rag.stitched_node_table) of every fragment
  id in that block's RAG, edge ends included.
  """
  keys = _npz_keys(rag_prefix, "RAG")
  stitches, ids = [], {}
  for key in keys:
    block = get_npz(rag_prefix, key)
    stitch = block.get("stitch", np.zeros(len(block["u"]))) > 0
    stitches.append({k: (v[stitch] if k in EDGE_FIELDS else v) for k, v in block.items()
                     if k != "aff_hist"})
    ids[key] = np.unique(np.concatenate([block["frag_id"], block["u"], block["v"]]))
  table = stitched_node_table(merge_rags(stitches))
  for key, wanted in ids.items():
    at = np.minimum(np.searchsorted(table["fragments"], wanted), len(table["fragments"]) - 1)
    if np.any(table["fragments"][at] != wanted):
      raise IicatsError(f"{join(rag_prefix, key)}: its edges name fragments that no block RAG "
                        "holds; run the rag stage again")
    put_npz(join(hierarchy_prefix, NODES_FOLDER), key,
            {field: values[at] for field, values in table.items()})
  if state_prefix:
    mark_done(state_prefix, "nodes", "global", {"fragments": int(len(table["fragments"]))})


def _node_table(shards: list) -> dict:
  """One node table from the (overlapping) shards of node_table_task."""
  fragments = np.concatenate([shard["fragments"] for shard in shards])
  _, first = np.unique(fragments, return_index=True)
  return {field: np.concatenate([shard[field] for shard in shards])[first]
          for field in shards[0]}


def level_prefix(hierarchy_prefix: str, level: int) -> str:
  """Where the regions of one level of hierarchical agglomeration go (level 1, 2, ...)."""
  return join(hierarchy_prefix, f"level{level}")


def _region_table(children: list) -> tuple[np.ndarray, np.ndarray]:
  """(fragment ids (sorted), region id of each) over a part's children: a reduced part's
  table, or the identity over a block RAG's own fragments."""
  fragments = np.concatenate([c.pop("fragments", c["frag_id"]) for c in children])
  regions = np.concatenate([c.pop("regions", c["frag_id"]) for c in children])
  order = np.argsort(fragments)
  return fragments[order], regions[order]


@queueable
def reduce_task(source_prefix: str, hierarchy_prefix: str, name: str, children: list,
                neighbours: list, threshold: float, quantile: float = None,
                state_prefix: str = "", level: int = 1, constraints: list = None,
                nucleus_fraction: float | None = None, out_prefix: str = "",
                edge_scorer: str = "", interior_bonus: float = 0.0):
  """One part of one level of hierarchical agglomeration (abiss-style): the part's interior
  regions merge down to `threshold` (see agglomerate_interior), and its RAG, contracted to
  the new regions, goes to HIERARCHY/level<L>/NAME.npz with the fragment -> region table. The
  next level (or the global step) then holds only those regions' edges in memory.

  children: names of the part's objects under source_prefix (block RAGs at level 1, parts of
    the level below above it); neighbours: names of the objects just beyond the part's high
    faces (they hold the edges that enter the part from above).
  constraints: the kinds of organelle evidence the global step will use (default: all):
    fragments beside a synapse cannot-link stay frozen only when "synapse" is among them;
    nuclear fragments always do (tracking seeds come from them).
  nucleus_fraction: as the global step's AgglomerationParams.nucleus_fraction (default: its
    default), so that both see the same nuclear fragments.
  edge_scorer: the learned edge scorer's object under out_prefix (the run's params'
    "edge_scorer"): level 1 then scores every block edge with it (score_edge_pieces, the
    nodes' totals from the nodes stage), and the levels above and the global step merge on
    the mean of those probabilities (quantile must be None).
  interior_bonus: as the global step's AgglomerationParams.interior_bonus.
  Edge ends outside a part keep their fragment ids at every level, so a part recognises the
  ends of its neighbours' edges that lie inside it by its own fragment table.
  """
  if edge_scorer and quantile is not None:
    raise IicatsError("reduce: a learned edge scorer replaces the affinity statistic; give it "
                      "or a quantile, not both")
  loaded = [get_npz(source_prefix, f"{c}.npz") for c in children]
  scored = bool(edge_scorer)
  if scored and level > 1 and not all(c.pop("edge_scored", False) for c in loaded):
    raise IicatsError(f"{source_prefix}: the parts below were reduced without the learned "
                      "edge scorer; remove the hierarchy folder and run the reduce stages "
                      "again")
  fragments, regions = _region_table(loaded)
  own = relabel(merge_rags(loaded), fragments, regions)
  if scored and level == 1:
    nodes_prefix = join(hierarchy_prefix, NODES_FOLDER)
    table = _node_table([get_npz(nodes_prefix, f"{c}.npz") for c in children])
    own = score_edge_pieces(own, table, _edge_scorer(out_prefix, edge_scorer))
  ids = own["frag_id"]
  inside_u, inside_v = np.isin(own["u"], ids), np.isin(own["v"], ids)
  border = [own["u"][inside_u & ~inside_v], own["v"][inside_v & ~inside_u]]
  for b in neighbours:
    above = get_npz(source_prefix, f"{b}.npz")
    ends = np.concatenate([above["u"], above["v"]])
    at = np.minimum(np.searchsorted(fragments, ends), len(fragments) - 1)
    border.append(regions[at][fragments[at] == ends])
  internal = {k: (v[inside_u & inside_v] if k in EDGE_FIELDS else v) for k, v in own.items()}
  nodes, node_of = contract_stitched(internal)
  frozen = np.isin(nodes["frag_id"], node_of[np.isin(ids, np.concatenate(border))])
  given = {"constraints": None if constraints is None else tuple(constraints),
           "nucleus_fraction": nucleus_fraction}
  used = AgglomerationParams(**{key: value for key, value in given.items() if value is not None})
  evidence, _ = derive_constraints(nodes, used)
  frozen |= evidence.nucleus > 0  # always: tracking seeds come from nuclei
  frozen[evidence.cannot_link.ravel()] = True
  region_of_node = agglomerate_interior(nodes, frozen, threshold, quantile,
                                        evidence.mito_edge, used.mito_bonus, interior_bonus)
  new_region = region_of_node[np.searchsorted(nodes["frag_id"], node_of)]  # per ids
  put_npz(level_prefix(hierarchy_prefix, level), f"{name}.npz",
          {**relabel(own, ids, new_region), "fragments": fragments,
           "regions": new_region[np.searchsorted(ids, regions)],
           "edge_scored": np.array(scored)})
  if state_prefix:
    mark_done(state_prefix, f"reduce{level}", name)


def create_reduce_tasks(supervoxels_path, rag_prefix, hierarchy_prefix, task_shape,
                        part_blocks: int, threshold: float, quantile=None, state_prefix="",
                        level: int = 1, constraints=None, nucleus_fraction=None,
                        out_prefix: str = "", edge_scorer: str = "",
                        interior_bonus: float = 0.0):
  """One reduce task per part of level `level`: part_blocks**level blocks along each axis,
  made of part_blocks³ parts of the level below (of blocks at level 1). With edge_scorer
  (see reduce_task) the nodes stage (create_node_table_tasks) must have run."""
  bounds = open_layer(supervoxels_path, layer_type="segmentation").bounds
  shape = np.asarray(task_shape)
  index = {tuple(lo): (np.asarray(lo) - bounds.minpt) // shape
           for lo, _, _ in block_grid(bounds.minpt, bounds.maxpt, task_shape)}

  def part_name(lo, at_level):
    if at_level == 0:
      return block_name(lo)
    return "_".join(str(int(i)) for i in index[lo] // part_blocks ** at_level)

  parts = {}
  for lo in index:
    children, neighbours = parts.setdefault(part_name(lo, level), (set(), set()))
    children.add(part_name(lo, level - 1))
    for axis in range(3):
      above = list(lo)
      above[axis] += int(shape[axis])
      above = tuple(above)
      if above in index and part_name(above, level) != part_name(lo, level):
        neighbours.add(part_name(above, level - 1))
  source = rag_prefix if level == 1 else level_prefix(hierarchy_prefix, level - 1)
  done = done_names(state_prefix, f"reduce{level}") if state_prefix else set()
  return [
    partial(reduce_task, source_prefix=source, hierarchy_prefix=hierarchy_prefix, name=name,
            children=sorted(children), neighbours=sorted(neighbours), threshold=threshold,
            quantile=quantile, state_prefix=state_prefix, level=level,
            constraints=None if constraints is None else list(constraints),
            nucleus_fraction=nucleus_fraction, out_prefix=out_prefix, edge_scorer=edge_scorer,
            interior_bonus=interior_bonus)
    for name, (children, neighbours) in sorted(parts.items()) if name not in done
  ]


def create_node_table_tasks(rag_prefix: str, hierarchy_prefix: str, state_prefix: str = ""):
  """The one node_table_task (none when a resumed run has done it)."""
  if state_prefix and done_names(state_prefix, "nodes"):
    return []
  return [partial(node_table_task, rag_prefix=rag_prefix, hierarchy_prefix=hierarchy_prefix,
                  state_prefix=state_prefix)]


_TABLES = {}  # remap tables cached per worker process: one download per run, not per block


@queueable
def agglomerate_task(rag_prefix: str, supervoxels_path: str, out_prefix: str, params: dict,
                     sweep: list, seeds_nm: list = None, track: bool = True,
                     state_prefix: str = "", hierarchy_prefix: str = ""):
  """Global step: merge all block RAGs, agglomerate with and without constraints (the
  baseline at params["baseline_threshold"] when given), track.

  Writes OUT/agglomeration/table.npz (fragment_ids, segment_ids, baseline_ids, sweep_<t>,
  baseline_sweep_<t>), OUT/agglomeration/summary.json and OUT/tracked.json.
  """
  fragment_ids, node_of_fragment, rag, prescored = _stitched_rag(rag_prefix, hierarchy_prefix)
  p = _global_params(params, out_prefix, hierarchy_prefix, prescored)
  seeds, positions = (None, {})
  if track:
    seeds, positions = _seed_fragments(rag, p, seeds_nm, supervoxels_path,
                                       (fragment_ids, node_of_fragment))
  result = agglomerate(rag, p, sweep_thresholds=sweep, seeds=seeds)
  baseline = agglomerate(rag, dataclasses.replace(
    p, use_constraints=False, threshold=params.get("baseline_threshold", p.threshold)),
    sweep_thresholds=sweep)
  # tables per fragment (what remap reads), from the tables per stitched node
  node_index = np.searchsorted(result.fragment_ids, node_of_fragment)
  arrays = {"fragment_ids": fragment_ids, "segment_ids": result.segment_ids[node_index],
            "baseline_ids": baseline.segment_ids[node_index]}
  for prefix, run in (("sweep", result), ("baseline_sweep", baseline)):
    for t, table in run.sweep.items():
      arrays[f"{prefix}_{t:.3f}"] = table[node_index]
  put_npz(out_prefix, "agglomeration/table.npz", arrays)
  _TABLES.clear()  # a remap in this process must read the new tables
  for neuron in result.tracked:
    neuron["seed_nm"] = positions.get(neuron["seed"])
  summary = {"params": params, "hierarchy_prefix": hierarchy_prefix,
             "fragments": int(len(fragment_ids)),
             "stitched_fragments": int(len(result.fragment_ids)),
             "edges": int(len(rag["u"])),
             "segments": int(len(np.unique(result.segment_ids))),
             "baseline_segments": int(len(np.unique(baseline.segment_ids))),
             "violations": result.violations, "baseline_violations": baseline.violations,
             "tracked": len({n["id"] for n in result.tracked}), "sweep": sorted(result.sweep)}
  put_json(out_prefix, "agglomeration/summary.json", summary)
  put_json(out_prefix, "tracked.json", result.tracked)
  if state_prefix:
    mark_done(state_prefix, "agglomerate", "global", summary)


@queueable
def track_task(rag_prefix: str, supervoxels_path: str, out_prefix: str, params: dict,
               name: str = "tracked", seeds_nm: list = None, state_prefix: str = "",
               hierarchy_prefix: str = ""):
  """Seeded neuron tracking over the whole RAG: every seed (a detected nucleus instance, or a
  point in nm) grows best edge first down to params["track_threshold"], honouring the
  constraints; two seeds never claim one segment.

  Writes OUT/NAME/table.npz (fragment_ids, tracked_ids: the neuron's id or 0) and
  OUT/NAME.json ([{"id", "seed", "seed_nm", "fragments", "voxels"}]).
  """
  fragment_ids, node_of_fragment, rag, prescored = _stitched_rag(rag_prefix, hierarchy_prefix)
  p = _global_params(params, out_prefix, hierarchy_prefix, prescored)
  seeds, positions = _seed_fragments(rag, p, seeds_nm, supervoxels_path,
                                     (fragment_ids, node_of_fragment))
  if not seeds:
    what = "no seed point lies on a fragment" if seeds_nm else "no nucleus was detected"
    raise IicatsError(f"{supervoxels_path}: nothing to track: {what}")
  result = agglomerate(rag, p, seeds=seeds)
  segment = result.segment_ids[np.searchsorted(result.fragment_ids, node_of_fragment)]
  neurons = np.array([n["id"] for n in result.tracked], dtype=np.uint64)
  put_npz(out_prefix, f"{name}/table.npz", {
    "fragment_ids": fragment_ids,
    "tracked_ids": np.where(np.isin(segment, neurons), segment, 0).astype(np.uint64)})
  _TABLES.clear()
  for neuron in result.tracked:
    neuron["seed_nm"] = positions.get(neuron["seed"])
  put_json(out_prefix, f"{name}.json", result.tracked)
  if state_prefix:
    mark_done(state_prefix, "track", name, {"tracked": len(result.tracked)})


def _table(out_prefix, column, table_key="agglomeration/table.npz"):
  key = (out_prefix, table_key, column)
  if key not in _TABLES:
    tables = get_npz(out_prefix, table_key)
    if column not in tables:
      raise IicatsError(f"{out_prefix}/{table_key}: no table '{column}'")
    _TABLES[key] = dict(zip(tables["fragment_ids"].tolist(), tables[column].tolist()))
  return _TABLES[key]


@queueable
def remap_task(supervoxels_path: str, segmentation_path: str, out_prefix: str, column: str,
               start: list, stop: list, state_prefix: str = "",
               table_key: str = "agglomeration/table.npz"):
  """segmentation[block] = table[supervoxels[block]] (fastremap; 0 stays 0)."""
  sv_cv = open_layer(supervoxels_path, layer_type="segmentation", what="supervoxels layer")
  slices = tuple(slice(a, b) for a, b in zip(start, stop))
  block = read_box(sv_cv, slices, "supervoxels layer")
  out = fastremap.remap(block, _table(out_prefix, column, table_key),
                        preserve_missing_labels=True)
  open_layer(segmentation_path)[slices] = out.astype(np.uint64)
  if state_prefix:
    mark_done(state_prefix, f"remap-{column}", block_name(start))


def create_remap_tasks(supervoxels_path, segmentation_path, out_prefix, task_shape,
                       column="segment_ids", state_prefix="", chunk_size=LAYER_CHUNK_SIZE,
                       table_key="agglomeration/table.npz", method: dict | None = None):
  """Remap tasks writing segmentation_path; `method`: how the table was made (e.g. the
  agglomeration's threshold and constraints), recorded in the layer's provenance."""
  sv_cv = open_layer(supervoxels_path, layer_type="segmentation", what="supervoxels layer")
  bounds = sv_cv.bounds
  create_layer(segmentation_path, layer_type="segmentation", dtype="uint64",
               resolution=sv_cv.resolution, voxel_offset=bounds.minpt,
               volume_size=bounds.size3(), chunk_size=chunk_size, step="remap",
               params={"supervoxels": supervoxels_path,
                       "table": join(out_prefix, table_key), "column": column,
                       **(method or {})})
  done = done_names(state_prefix, f"remap-{column}") if state_prefix else set()
  return [
    partial(remap_task, supervoxels_path=supervoxels_path, segmentation_path=segmentation_path,
               out_prefix=out_prefix, column=column, start=lo, stop=hi,
               state_prefix=state_prefix, table_key=table_key)
    for lo, hi, _ in block_grid(bounds.minpt, bounds.maxpt, task_shape)
    if block_name(lo) not in done
  ]
