"""Igneous task creation for meshes, skeletons and mip pyramids, run on our queues.

Nothing is re-implemented: these return Igneous' own tasks (zmesh, kimimaro, tinybrain); the
pipeline inserts them into the same queue as our tasks and validates what they wrote.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import re
from functools import partial

import igneous.task_creation as tc
import igneous.tasks  # noqa: F401  (registers Igneous tasks for workers)
import igneous.tasks.mesh.multires as igneous_multires
import numpy as np
from cloudfiles import CloudFiles
from cloudvolume.datasource.precomputed.spatial_index import SpatialIndex
from cloudvolume.lib import Bbox
from igneous.tasks.skeleton import ShardedSkeletonMergeTask, UnshardedSkeletonMergeTask
from taskqueue import queueable
from taskqueue.lib import jsonify
from taskqueue.queueables import totask

from iicats_cv.errors import IicatsError
from iicats_cv.layers import open_layer, add_provenance, resolve_cloudpath

# Resolutions of fractional nanometres (ssTEM at 4.6 nm) break the sharded mesh and skeleton
# merges of CloudVolume 12.15 / Igneous 4.37 (seung-lab/igneous#177, open): the spatial index
# is listed by stepping through nanometres in floating point, which can add a sliver file
# that no task wrote, and the merges turn a file's nanometre box back into voxels by
# truncation (588.8 / 4.6 -> 127), naming fragment files that do not exist. Both lookups are
# replaced here by ones on the integer voxel grid the tasks wrote; a worker gets them with
# the task registrations above. Integer resolutions keep CloudVolume's own listing.
_cloudvolume_index_paths = getattr(SpatialIndex, "index_file_paths_for_bbox", None)


def _index_paths_on_the_voxel_grid(self, bbox):
  if not self.precision:
    return _cloudvolume_index_paths(self, bbox)
  resolution = np.asarray(self.resolution, dtype=float)
  chunk = np.round(np.asarray(self.chunk_size, dtype=float) / resolution).astype(int)
  lo_bound, hi_bound = (np.asarray(p, dtype=int) for p in (self.bounds.minpt,
                                                          self.bounds.maxpt))
  lo = np.maximum(np.floor(np.asarray(bbox.minpt, dtype=float) / resolution + 1e-6), lo_bound)
  hi = np.minimum(np.ceil(np.asarray(bbox.maxpt, dtype=float) / resolution - 1e-6), hi_bound)
  lo = lo_bound + (lo.astype(int) - lo_bound) // chunk * chunk
  paths = []
  for z in range(lo[2], int(hi[2]), chunk[2]):
    for y in range(lo[1], int(hi[1]), chunk[1]):
      for x in range(lo[0], int(hi[0]), chunk[0]):
        start = np.array([x, y, z])
        box = Bbox(start, np.minimum(start + chunk, hi_bound))
        # the name the mesh and skeleton tasks gave the file: voxel box × resolution
        paths.append((box.astype(self.resolution.dtype) * self.resolution)
                     .to_filename(self.precision) + ".spatial")
  return paths


def _fragment_files(spatial_index, labels, resolution) -> dict:
  """{label: ['.frags' files]} of the spatial index files that hold each label, in voxels."""
  locations = spatial_index.file_locations_per_label(labels)
  resolution = np.asarray(resolution, dtype=float)
  for label, files in locations.items():
    boxes = (Bbox.from_filename(re.sub(r"\.spatial$", "", name)) for name in files)
    locations[label] = [Bbox(np.round(np.asarray(box.minpt) / resolution).astype(int),
                             np.round(np.asarray(box.maxpt) / resolution).astype(int))
                        .to_filename() + ".frags" for box in boxes]
  return locations


# (only where the versions installed still have these lookups)
if hasattr(SpatialIndex, "index_file_paths_for_bbox"):
  SpatialIndex.index_file_paths_for_bbox = _index_paths_on_the_voxel_grid
if hasattr(igneous_multires, "locations_for_labels"):
  igneous_multires.locations_for_labels = lambda cv, labels: _fragment_files(
    cv.mesh.spatial_index, labels, cv.meta.resolution(cv.mesh.meta.mip))
if hasattr(ShardedSkeletonMergeTask, "locations_for_labels"):
  ShardedSkeletonMergeTask.locations_for_labels = lambda self, labels, cv: _fragment_files(
    cv.skeleton.spatial_index, labels, cv.meta.resolution(cv.skeleton.meta.mip))

# Igneous 4.37's skeleton merges join each label's fragments in the order of a set of file
# names, which string hashing randomises per process (sharded), or in the order CloudFiles
# returned the files (unsharded): identical runs wrote skeletons whose vertices came in
# another order (34 of 98 on a synthetic run of 64³ tasks), so their files differed. Its
# mesh merge sorts fragments by file name; the skeleton merges do too here.
_igneous_unfused_skeletons = ShardedSkeletonMergeTask.get_unfused
_igneous_fuse_skeletons = UnshardedSkeletonMergeTask.fuse_skeletons


def _unfused_skeletons_in_file_order(self, labels, filenames, cv, frag_path):
  return _igneous_unfused_skeletons(self, labels, sorted(filenames), cv, frag_path)


def _fuse_skeletons_in_file_order(self, skels):
  return _igneous_fuse_skeletons(self, sorted(skels, key=lambda pair: pair[0].to_filename()))


ShardedSkeletonMergeTask.get_unfused = _unfused_skeletons_in_file_order
UnshardedSkeletonMergeTask.fuse_skeletons = _fuse_skeletons_in_file_order


def _compress(cloudpath):
  return None if cloudpath.startswith("file://") else "gzip"


def teasar_params(resolution) -> dict:
  """TEASAR parameters scaled to the voxel size: invalidation ball = 4 × radius + 30 voxels of
  the finest axis (nm), the same physical behaviour at 4 nm ssEM and 10 nm FIB."""
  return {"scale": 4, "const": 30.0 * float(min(resolution)), "pdrf_scale": 100000,
          "pdrf_exponent": 4, "soma_detection_threshold": 750, "soma_acceptance_threshold": 3500,
          "soma_invalidation_scale": 2, "soma_invalidation_const": 300}


def downsample_factor(resolution) -> tuple:
  """(2,2,2) for near-isotropic data, (2,2,1) when z is much coarser (ssEM)."""
  res = np.asarray(resolution)
  return (2, 2, 2) if res[2] <= 1.5 * min(res[:2]) else (2, 2, 1)


def pyramid_depth(size, resolution, most: int, smallest: int = 32) -> int:
  """How many mips to add (≤ most, possibly 0) while every downsampled axis of the new mip
  keeps ≥ `smallest` voxels (an ssEM stack of 20 sections, never downsampled in z, still
  gets its in-plane mips). Igneous itself makes no mip of a volume it finds too small."""
  size = np.asarray(size, dtype=float)
  factor = np.asarray(downsample_factor(resolution))
  halved = factor > 1
  depth = 0
  while depth < most and ((size / factor)[halved] >= smallest).all():
    size = size / factor
    depth += 1
  return depth


def downsample_tasks(cloudpath: str, mip: int):
  """Tasks making mip+1 from mip (averaging for images, mode pooling for segmentation).

  One mip per stage: Igneous then never refuses a volume whose next mip is smaller than a
  chunk, which small crops are; those get 32³ chunks at the coarser mips.
  """
  cv = open_layer(cloudpath, mip=mip)
  factor = downsample_factor(cv.meta.resolution(0))
  next_size = np.asarray(cv.meta.volume_size(mip)) // np.asarray(factor)
  chunk = None if (next_size >= 2 * np.asarray(cv.meta.chunk_size(mip))).all() else (32, 32, 32)
  with contextlib.redirect_stdout(io.StringIO()):  # its 'Volume Bounds' / 'Selected ROI' lines
    return list(tc.create_downsampling_tasks(resolve_cloudpath(cloudpath), mip=mip, num_mips=1,
                                             factor=factor, compress=_compress(cloudpath),
                                             chunk_size=chunk))


def mesh_tasks(cloudpath: str, task_shape, dust_threshold: int = 100, sharded: bool = True):
  """Mesh fragments per task (zmesh), one voxel of overlap, into the layer's `mesh` dir
  (`.frags` files for the sharded merge, per-label fragments for legacy manifests)."""
  cv = open_layer(cloudpath, layer_type="segmentation", what="layer")  # before any task
  _check_existing_format(cloudpath, cv, "mesh", sharded)
  return tc.create_meshing_tasks(resolve_cloudpath(cloudpath), mip=0, shape=tuple(task_shape),
                                 mesh_dir="mesh", compress=_compress(cloudpath),
                                 dust_threshold=dust_threshold, sharded=sharded,
                                 spatial_index=True)


def lod_chunk_size(volume_size) -> tuple:
  """Finest octree chunk (voxels) of multi-resolution meshes: Igneous' 256³ for real volumes,
  down to 16³ so that neurons of a small crop still get coarser levels of detail (Igneous
  adds a level only where a neuron spans twice the chunk on every axis)."""
  side = int(np.clip(2 ** np.floor(np.log2(max(min(volume_size) // 8, 1))), 16, 256))
  return (side, side, side)


def mesh_merge_tasks(cloudpath: str, sharded: bool = True, num_lod: int = 3):
  """Multi-resolution Draco shards (`neuroglancer_multilod_draco`, up to num_lod coarser
  levels, fewer for neurons smaller than the octree allows) or legacy manifests."""
  if sharded:
    size = open_layer(cloudpath).meta.volume_size(0)
    _say_reading_spatial_index(cloudpath, "mesh")
    return tc.create_sharded_multires_mesh_tasks(resolve_cloudpath(cloudpath), num_lod=num_lod,
                                                 min_chunk_size=lod_chunk_size(size),
                                                 progress=False)
  return tc.create_mesh_manifest_tasks(resolve_cloudpath(cloudpath), magnitude=1)


def _say_reading_spatial_index(cloudpath: str, kind: str) -> None:
  # Igneous reads it with CloudVolume(progress=True) hard-coded: its bars carry no name
  print(f"reading the {kind} fragments' spatial index of {cloudpath} for the shard plan "
        "(Igneous' progress bars follow)", flush=True)


def skeleton_tasks(cloudpath: str, task_shape, dust_threshold: int = 100,
                   sharded: bool = True):
  """kimimaro skeleton fragments per task (one voxel of overlap, borders fixed at merge).

  The dust threshold applies per task, so it stays small: a neuron cut into many blocks must
  still leave pieces to skeletonise (validation demands a skeleton for every big label).
  """
  cv = open_layer(cloudpath, layer_type="segmentation", what="layer")
  _check_existing_format(cloudpath, cv, "skeletons", sharded)
  return tc.create_skeletonizing_tasks(resolve_cloudpath(cloudpath), mip=0,
                                       shape=tuple(task_shape),
                                       teasar_params=teasar_params(cv.resolution),
                                       dust_threshold=dust_threshold, sharded=sharded,
                                       spatial_index=True, fix_borders=True)


def skeleton_merge_tasks(cloudpath: str, sharded: bool = True):
  # no cable-length dust or tick pruning at merge: what was skeletonised is kept, so that
  # validation can demand a skeleton for every label above the voxel threshold
  if sharded:
    _say_reading_spatial_index(cloudpath, "skeleton")
    return tc.create_sharded_skeleton_merge_tasks(resolve_cloudpath(cloudpath),
                                                  dust_threshold=0, tick_threshold=0)
  return tc.create_unsharded_skeleton_merge_tasks(resolve_cloudpath(cloudpath), magnitude=1,
                                                  dust_threshold=0, tick_threshold=0)


def label_sizes(cloudpath: str, max_voxels: int = 512 ** 3) -> dict:
  """{label: voxel count at mip 0} from the finest mip that fits in max_voxels (counts at a
  coarser mip are scaled by the mip's voxel volume)."""
  import fastremap
  cv = open_layer(cloudpath, layer_type="segmentation")
  for mip in cv.available_mips:
    size = np.prod(cv.meta.volume_size(mip))
    if size <= max_voxels or mip == max(cv.available_mips):
      break
  scale = np.prod(cv.meta.resolution(mip)) / np.prod(cv.meta.resolution(0))
  data = open_layer(cloudpath, mip=mip, fill_missing=True)[:, :, :]
  ids, counts = fastremap.unique(np.asarray(data), return_counts=True)
  return {int(i): int(c * scale) for i, c in zip(ids, counts) if i != 0}


def validate_layer(cloudpath: str, min_voxels: int = 8000, meshes: bool = True,
                   skeletons: bool = True) -> dict:
  """Check a segmentation layer after meshing/skeletonising: info consistent, every mip's
  chunks readable, and every label of ≥ min_voxels voxels has a mesh and a skeleton.

  Returns {"labels_checked", "missing_meshes", "missing_skeletons", "problems"}; an empty
  `problems` list means the layer is complete.
  """
  cv = open_layer(cloudpath, layer_type="segmentation")
  problems = []
  for mip in cv.available_mips:
    if any(s <= 0 for s in cv.meta.volume_size(mip)):
      problems.append(f"mip {mip}: empty volume size in info")
  sizes = label_sizes(cloudpath)
  big = sorted(label for label, count in sizes.items() if count >= min_voxels)
  cf = CloudFiles(resolve_cloudpath(cloudpath))
  missing = {"mesh": [], "skeletons": []}
  for kind, wanted in (("mesh", meshes), ("skeletons", skeletons)):
    if not wanted:
      continue
    directory = cv.info.get(kind)
    if not directory:
      problems.append(f"info has no '{kind}' directory")
      missing[kind] = big
      continue
    if _is_sharded(cf, directory):
      missing[kind] = _missing_from_shards(cv, kind, big)
    else:
      keys = [f"{directory}/{label}:0" if kind == "mesh" else f"{directory}/{label}"
              for label in big]
      exists = cf.exists(keys)
      missing[kind] = [label for label, key in zip(big, keys) if not exists[key]]
  for kind, labels in missing.items():
    if labels:
      shown = ", ".join(str(l) for l in labels[:10]) + (" …" if len(labels) > 10 else "")
      problems.append(f"{len(labels)} of {len(big)} labels ≥ {min_voxels} voxels have no "
                      f"{'mesh' if kind == 'mesh' else 'skeleton'}: {shown}")
  return {"labels_checked": len(big), "missing_meshes": missing["mesh"],
          "missing_skeletons": missing["skeletons"], "problems": problems}


def _missing_from_shards(cv, kind: str, labels: list) -> list:
  """Labels without an entry in their shard's minishard index (a missing or unreadable shard
  file counts as missing every label it should hold)."""
  if kind == "mesh":
    reader, path = cv.mesh.reader, cv.mesh.meta.mesh_path
  else:
    reader, path = cv.skeleton.reader, cv.skeleton.meta.skeleton_path
  by_shard = {}
  for label in labels:
    by_shard.setdefault(reader.get_filename(label), []).append(label)
  found = {}
  for shard_labels in by_shard.values():
    try:
      found.update(reader.exists(shard_labels, path))
    except Exception:  # cloud-volume raises on a missing or corrupt shard index
      pass
  return [label for label in labels if not found.get(label)]


def _check_existing_format(cloudpath: str, cv, kind: str, sharded: bool) -> None:
  """Refuse unsharded meshes or skeletons (kind: the info key, 'mesh' or 'skeletons') over
  sharded ones: Igneous rewrites their info and leaves a layer whose shards CloudVolume then
  reads as legacy files (AttributeError in every reader). Sharded over unsharded is allowed:
  the sharded merge writes its own info last, and until then (an interrupted run) the info
  reads as unsharded."""
  directory = cv.info.get(kind)
  if sharded or not directory:
    return
  if _is_sharded(CloudFiles(resolve_cloudpath(cloudpath)), directory):
    things = "meshes" if kind == "mesh" else kind
    raise IicatsError(f"layer {cloudpath}: its {things} ({directory}/) are sharded; writing "
                      "unsharded ones over them would mix both formats. Delete "
                      f"{directory}/ first to change the format, or leave out --unsharded")


def _is_sharded(cf, directory) -> bool:
  info = cf.get_json(f"{directory}/info") or {}
  return "sharding" in info and info["sharding"] is not None


@queueable
def igneous_task(payload, state_prefix: str = ""):
  """One Igneous task, from its payload. The pipeline queues Igneous' tasks in this wrapper so
  that they carry the run's state_prefix: one that fails for good on any worker leaves its
  dead letter where the driver looks (runner.drain), as the run's own tasks do."""
  totask(copy.deepcopy(payload)).execute()  # deserialising deletes a payload's 'class' key


def in_run(tasks, state_prefix: str) -> list:
  """Igneous tasks wrapped as igneous_task for a run whose state lives at state_prefix."""
  return [partial(igneous_task, payload=json.loads(jsonify(totask(task).payload())),
                  state_prefix=state_prefix) for task in tasks]


def record(cloudpath: str, step: str, params: dict):
  add_provenance(open_layer(cloudpath), step, params)
