"""Igneous task creation for meshes, skeletons and mip pyramids, run on our queues.

Nothing is re-implemented: these return Igneous' own tasks (zmesh, kimimaro, tinybrain); the
pipeline inserts them into the same queue as our tasks and validates what they wrote.
"""
from __future__ import annotations

import igneous.task_creation as tc
import igneous.tasks  # noqa: F401  (registers Igneous tasks for workers)
import numpy as np

from iicats_cv.layers import open_layer, add_provenance, resolve_cloudpath


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
  """How many mips to add (≤ most) while every axis of the new mip keeps ≥ `smallest` voxels."""
  size = np.asarray(size, dtype=float)
  factor = np.asarray(downsample_factor(resolution))
  depth = 0
  while depth < most and ((size / factor) >= smallest).all():
    size = size / factor
    depth += 1
  return max(depth, 1)


def downsample_tasks(cloudpath: str, mip: int):
  """Tasks making mip+1 from mip (averaging for images, mode pooling for segmentation).

  One mip per stage: Igneous then never refuses a volume whose next mip is smaller than a
  chunk, which small crops are; those get 32³ chunks at the coarser mips.
  """
  cv = open_layer(cloudpath, mip=mip)
  factor = downsample_factor(cv.meta.resolution(0))
  next_size = np.asarray(cv.meta.volume_size(mip)) // np.asarray(factor)
  chunk = None if (next_size >= 2 * np.asarray(cv.meta.chunk_size(mip))).all() else (32, 32, 32)
  return tc.create_downsampling_tasks(resolve_cloudpath(cloudpath), mip=mip, num_mips=1, factor=factor,
                                      compress=_compress(cloudpath), chunk_size=chunk)


def mesh_tasks(cloudpath: str, task_shape, dust_threshold: int = 100):
  return tc.create_meshing_tasks(resolve_cloudpath(cloudpath), mip=0, shape=tuple(task_shape), mesh_dir="mesh",
                                 compress=_compress(cloudpath), dust_threshold=dust_threshold,
                                 sharded=False, spatial_index=True)


def mesh_manifest_tasks(cloudpath: str):
  return tc.create_mesh_manifest_tasks(resolve_cloudpath(cloudpath), magnitude=1)


def skeleton_tasks(cloudpath: str, task_shape, dust_threshold: int = 1000):
  cv = open_layer(cloudpath)
  return tc.create_skeletonizing_tasks(resolve_cloudpath(cloudpath), mip=0, shape=tuple(task_shape),
                                       teasar_params=teasar_params(cv.resolution),
                                       dust_threshold=dust_threshold, sharded=False,
                                       spatial_index=True, fix_borders=True)


def skeleton_merge_tasks(cloudpath: str, dust_threshold: int = 1000):
  return tc.create_unsharded_skeleton_merge_tasks(resolve_cloudpath(cloudpath), magnitude=1,
                                                  dust_threshold=dust_threshold,
                                                  tick_threshold=0)


def record(cloudpath: str, step: str, params: dict):
  add_provenance(open_layer(cloudpath), step, params)
