"""`iicats mesh|skeleton` in both output formats: multi-resolution Draco shards + sharded
skeletons (the default) and legacy per-label files (--unsharded); validation names what is
missing in either."""
import os

import pytest
from click.testing import CliRunner
from cloudvolume import CloudVolume

from browser_support import write_layer
from conftest import blobs
from iicats_cv.cli import cli
from iicats_cv.tasks.igneous_stages import lod_chunk_size, validate_layer


@pytest.fixture
def segmentation(tmp_path):
  labels, _ = blobs(shape=(96, 96, 64), n=5, seed=3)
  path = "file://" + str(tmp_path / "seg")
  write_layer(path, "segmentation", labels, (8, 8, 8))
  return path, sorted(int(i) for i in set(labels.ravel().tolist()))


def mesh_and_skeletonize(path, *flags):
  for verb in ("mesh", "skeleton"):
    result = CliRunner().invoke(cli, [verb, path, "-p", "1", "--task-shape", "64,64,64",
                                      *flags])
    assert result.exit_code == 0, result.output
    assert "validated:" in result.output and "done:" in result.output


def test_sharded_default_has_every_label_with_coarser_lods(segmentation):
  path, labels = segmentation
  mesh_and_skeletonize(path)
  cv = CloudVolume(path)
  assert cv.mesh.meta.info["@type"] == "neuroglancer_multilod_draco"
  assert cv.mesh.meta.info["sharding"] and cv.skeleton.meta.info["sharding"]
  for label in labels:
    assert len(cv.mesh.get(label)[label].vertices) > 0
    assert len(cv.skeleton.get(label).vertices) > 0
  assert max(cv.mesh.get_manifest(label).num_lods for label in labels) >= 2
  shards = [name for name in os.listdir(path[len("file://"):] + "/mesh")
            if name.endswith(".shard")]
  assert shards
  os.remove(os.path.join(path[len("file://"):], "mesh", shards[0]))
  assert validate_layer(path, min_voxels=1)["missing_meshes"], "a lost shard must be reported"


def test_sharded_merge_at_a_resolution_of_fractional_nanometres(tmp_path):
  """ssTEM at 4.6 nm: Igneous' merges turned 588.8 nm back into voxel 127, not 128, and asked
  for fragment files that do not exist (seung-lab/igneous#177)."""
  labels, _ = blobs(shape=(256, 192, 24), n=5, seed=3)
  path = "file://" + str(tmp_path / "seg")
  write_layer(path, "segmentation", labels, (4.6, 4.6, 45))
  mesh_and_skeletonize(path)
  cv = CloudVolume(path)
  for label in sorted(set(labels.ravel().tolist()) - {0}):
    assert len(cv.mesh.get(label)[label].vertices) > 0
    assert len(cv.skeleton.get(label).vertices) > 0


def test_unsharded_writes_one_file_per_label_and_validation_names_a_gap(segmentation):
  path, labels = segmentation
  mesh_and_skeletonize(path, "--unsharded")
  cv = CloudVolume(path)
  layer = path[len("file://"):]
  assert "sharding" not in cv.mesh.meta.info or not cv.mesh.meta.info["sharding"]
  for label in labels:
    assert os.path.exists(os.path.join(layer, "mesh", f"{label}:0"))
    assert len(cv.skeleton.get(label).vertices) > 0
  os.remove(os.path.join(layer, "mesh", f"{labels[0]}:0"))
  assert validate_layer(path, min_voxels=1)["missing_meshes"] == [labels[0]]
  result = CliRunner().invoke(cli, ["validate", path, "--min-voxels", "1", "--no-skeletons"])
  assert result.exit_code != 0
  assert f"have no mesh: {labels[0]}" in result.output


def test_lod_chunk_size_scales_with_the_volume():
  assert lod_chunk_size((96, 96, 64)) == (16, 16, 16)
  assert lod_chunk_size((512, 512, 300)) == (32, 32, 32)
  assert lod_chunk_size((40000, 40000, 7000)) == (256, 256, 256)


def test_an_image_layer_is_refused_before_any_task(tmp_path):
  _, image = blobs(shape=(64, 64, 64), n=3, seed=1)
  path = "file://" + str(tmp_path / "em")
  write_layer(path, "image", image, (8, 8, 8))
  for verb in ("mesh", "skeleton"):
    result = CliRunner().invoke(cli, [verb, path, "-p", "1"])
    assert result.exit_code == 1
    assert "is a 'image' layer, expected 'segmentation'" in result.output
    assert f"[{verb}]" not in result.output
  assert not (tmp_path / "em" / "mesh").exists()


def test_mistakes_leave_the_layer_as_it_was(segmentation, tmp_path):
  """An unknown queue or a task shape of 0 is refused before Igneous writes the layer's mesh
  or skeleton info, and meshes of one format are not overwritten in the other (Igneous
  rewrote mesh/info and left a layer CloudVolume could no longer read)."""
  path, _ = segmentation
  layer = tmp_path / "seg"
  before = {p.name: p.read_bytes() for p in layer.iterdir() if p.is_file()}
  for verb in ("mesh", "skeleton"):
    for args, message in [(["--queue", "xx://q"], "unknown protocol 'xx://'"),
                          (["--task-shape", "0,64,64"], "--task-shape: values must be positive")]:
      result = CliRunner().invoke(cli, [verb, path, "-p", "1", *args])
      assert result.exit_code != 0 and message in result.output, result.output
  assert {p.name: p.read_bytes() for p in layer.iterdir() if p.is_file()} == before
  assert not (layer / "mesh").exists()
  mesh_and_skeletonize(path)
  mesh_info = (layer / "mesh" / "info").read_bytes()
  for verb in ("mesh", "skeleton"):
    result = CliRunner().invoke(cli, [verb, path, "-p", "1", "--unsharded"])
    assert result.exit_code != 0 and "are sharded; writing unsharded ones" in result.output
  assert (layer / "mesh" / "info").read_bytes() == mesh_info
  # sharded over legacy is allowed: an interrupted sharded run leaves a legacy-looking info
  import shutil
  shutil.rmtree(layer / "mesh")
  for flags in (["--unsharded"], []):
    result = CliRunner().invoke(cli, ["mesh", path, "-p", "1", *flags])
    assert result.exit_code == 0, result.output


def test_a_fleet_worker_logs_the_igneous_tasks_of_a_run(segmentation, tmp_path, capsys):
  """`iicats execute` logs each task by its kind and block; for Igneous' tasks of a run that
  label was made after the task ran, from its payload, which deserialising had stripped of
  its 'class' key: the worker crashed (KeyError) after each MeshTask and the run's driver
  waited for ever."""
  from iicats_cv.tasks import igneous_stages as ig
  from iicats_cv.tasks.runner import execute, open_queue
  path, _ = segmentation
  qurl = "fq://" + str(tmp_path / "queue")
  state = "file://" + str(tmp_path / "state")
  tasks = ig.in_run(ig.mesh_tasks(path, (64, 64, 64)), state)
  open_queue(qurl).insert(tasks)
  stats = execute(qurl, exit_on_empty=True, log_tasks=True)
  assert stats == {"executed": len(tasks), "failed": 0, "dead": 0}
  assert capsys.readouterr().out.count("MeshTask ") == len(tasks)
  # the merge: a python-task-queue function task, whose payload is a list, not a dict
  merges = ig.in_run(ig.mesh_merge_tasks(path), state)
  open_queue(qurl).insert(merges)
  assert execute(qurl, exit_on_empty=True, log_tasks=True)["executed"] == len(merges)
  assert validate_layer(path, skeletons=False)["problems"] == []
