"""`iicats import` for every file type, and one clear error per bad input."""

import h5py
import numpy as np
import pytest
import tensorstore as ts
import tifffile
from click.testing import CliRunner
from cloudvolume import CloudVolume

from iicats_cv.cli import cli


def invoke(*args):
  return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def volume_zyx():
  rng = np.random.default_rng(0)
  return rng.integers(0, 255, (12, 20, 24)).astype(np.uint8)


@pytest.mark.parametrize("suffix", ["npy", "npz", "tif", "h5"])
def test_import_each_format(tmp_path, volume_zyx, suffix):
  src = tmp_path / f"em.{suffix}"
  if suffix == "npy":
    np.save(src, volume_zyx)
  elif suffix == "npz":
    np.savez(src, image=volume_zyx)
  elif suffix == "tif":
    tifffile.imwrite(src, volume_zyx)
  else:
    with h5py.File(src, "w") as h5:
      h5["raw"] = volume_zyx
  dest = "file://" + str(tmp_path / "layer")
  result = invoke("import", src, dest, "--type", "image", "--resolution", "4,4,40",
                  "--offset", "10,20,3")
  assert result.exit_code == 0, result.output
  cv = CloudVolume(dest)
  assert tuple(cv.resolution) == (4, 4, 40) and tuple(cv.voxel_offset) == (10, 20, 3)
  np.testing.assert_array_equal(cv[:, :, :][..., 0], volume_zyx.transpose(2, 1, 0))
  store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": dest + "/"}).result()
  np.testing.assert_array_equal(np.asarray(store.read().result())[..., 0],
                                volume_zyx.transpose(2, 1, 0))
  assert cv.provenance.processing[-1]["method"]["task"] == "import"


@pytest.mark.parametrize("suffix", ["tif", "png"])
def test_import_a_folder_of_sections(tmp_path, volume_zyx, suffix):
  """One 2D image per z, named as microscopes name them: s2 comes before s10."""
  from PIL import Image
  folder = tmp_path / "sections"
  folder.mkdir()
  def write(path, section):
    tifffile.imwrite(path, section) if suffix == "tif" else Image.fromarray(section).save(path)
  for z, section in enumerate(volume_zyx):
    write(folder / f"s{z}.{suffix}", section)
  (folder / "notes.txt").write_text("not a section")
  dest = "file://" + str(tmp_path / "layer")
  result = invoke("import", folder, dest, "--type", "image", "--resolution", "4,4,40")
  assert result.exit_code == 0, result.output
  np.testing.assert_array_equal(CloudVolume(dest)[:, :, :][..., 0], volume_zyx.transpose(2, 1, 0))
  write(folder / f"s99.{suffix}", volume_zyx[0, :10])
  result = invoke("import", folder, dest + "2", "--type", "image", "--resolution", "4,4,40")
  assert result.exit_code != 0 and "sections must match" in result.output
  assert "Traceback" not in result.output and not (tmp_path / "layer2").exists()


def test_a_uint16_image_keeps_its_contrast_despite_hot_pixels(tmp_path, volume_zyx):
  image = volume_zyx.astype(np.uint16) * 100 + 1000  # grey values 1000-26400
  image[0, 0, 0] = 65535  # a saturated detector pixel
  np.save(tmp_path / "em16.npy", image)
  dest = "file://" + str(tmp_path / "em")
  result = invoke("import", tmp_path / "em16.npy", dest, "--type", "image",
                  "--resolution", "4,4,40")
  assert result.exit_code == 0, result.output
  assert "mapped to uint8 0-255" in result.output
  stored = CloudVolume(dest)[:, :, :][..., 0].transpose(2, 1, 0)
  assert stored.dtype == np.uint8 and stored.max() == 255
  inside = np.ones(image.shape, bool)
  inside[0, 0, 0] = False
  # min-max scaling would squeeze the tissue into 0-102
  assert np.corrcoef(stored[inside], volume_zyx[inside])[0, 1] > 0.999
  assert np.percentile(stored[inside], 99) > 240
  method = CloudVolume(dest).provenance.processing[-1]["method"]
  assert method["grey_values_mapped_to_0_255"][1] < 65535


def test_grey_values_to_uint8():
  from iicats_cv.volume_io import to_uint8
  values = np.array([np.nan, -3, 0, 5, 10, 99], np.float32)
  assert to_uint8(values, (0, 10)).tolist() == [0, 0, 0, 128, 255, 255]
  assert to_uint8(values, (4, 4)).tolist() == [0] * 6  # an empty window


def test_import_segmentation_uses_compressed_segmentation(tmp_path):
  labels = np.arange(8 * 8 * 8, dtype=np.uint32).reshape(8, 8, 8) % 5
  np.save(tmp_path / "gt.npy", labels)
  dest = "file://" + str(tmp_path / "gt")
  result = invoke("import", tmp_path / "gt.npy", dest, "--type", "segmentation",
                  "--resolution", "8,8,8", "--axes", "xyz")
  assert result.exit_code == 0, result.output
  cv = CloudVolume(dest)
  assert cv.layer_type == "segmentation" and cv.encoding == "compressed_segmentation"
  np.testing.assert_array_equal(cv[:, :, :][..., 0], labels)


@pytest.mark.parametrize("args, message", [
  (["missing.npy", "DEST", "--type", "image", "--resolution", "4,4,40"], "no such file"),
  (["SRC", "DEST", "--type", "image", "--resolution", "4x4x40"], "--resolution: expected three"),
  (["SRC", "DEST", "--type", "image", "--resolution", "4,4"], "--resolution: expected three"),
  (["SRC", "DEST", "--type", "image", "--resolution", "4,-4,40"], "must be positive"),
  (["SRC", "redis://x/y", "--type", "image", "--resolution", "4,4,40"], "unknown protocol"),
  (["SRC", "gs:/x/y", "--type", "image", "--resolution", "4,4,40"],
   "malformed cloudpath (did you mean gs://x/y?)"),
  (["SRC", "DEST", "--type", "image", "--resolution", "4,4,40", "--chunk-size", "0,64,64"],
   "--chunk-size: values must be positive"),
  (["EMPTY", "DEST", "--type", "image", "--resolution", "4,4,40"], "empty volume"),
])
def test_import_bad_inputs(tmp_path, volume_zyx, args, message):
  np.save(tmp_path / "em.npy", volume_zyx)
  args = [a.replace("SRC", str(tmp_path / "em.npy")).replace("DEST", str(tmp_path / "out"))
          if isinstance(a, str) else a for a in args]
  if args[0] == "missing.npy":
    args[0] = str(tmp_path / "missing.npy")
  if args[0] == "EMPTY":
    np.save(tmp_path / "empty.npy", np.zeros((0, 64, 64), np.uint8))
    args[0] = str(tmp_path / "empty.npy")
  result = invoke("import", *args)
  assert result.exit_code != 0
  assert message in result.output
  assert "Traceback" not in result.output
  assert not (tmp_path / "out").exists()


def test_pipeline_bad_inputs_leave_nothing(tmp_path, volume_zyx):
  out = tmp_path / "run"
  # nonexistent image layer
  result = invoke("pipeline", "--image", "file://" + str(tmp_path / "nope"), "--out", out)
  assert result.exit_code != 0 and "no precomputed 'info'" in result.output
  # a segmentation where an image is expected
  np.save(tmp_path / "seg.npy", volume_zyx.astype(np.uint32))
  seg = "file://" + str(tmp_path / "seg")
  assert invoke("import", tmp_path / "seg.npy", seg, "--type", "segmentation",
                "--resolution", "4,4,40").exit_code == 0
  result = invoke("pipeline", "--image", seg, "--out", out)
  assert result.exit_code != 0 and "is a 'segmentation' layer, expected 'image'" in result.output
  # an unknown queue protocol
  np.save(tmp_path / "em.npy", volume_zyx)
  img = "file://" + str(tmp_path / "em")
  assert invoke("import", tmp_path / "em.npy", img, "--type", "image",
                "--resolution", "4,4,40").exit_code == 0
  result = invoke("pipeline", "--image", img, "--out", out, "--queue", "amqp://q")
  assert result.exit_code != 0 and "unknown protocol 'amqp://'" in result.output
  # a malformed task shape
  result = invoke("pipeline", "--image", img, "--out", out, "--task-shape", "64,64")
  assert result.exit_code != 0 and "--task-shape" in result.output
  # a task shape that is not a multiple of the layers' 64³ chunks
  result = invoke("pipeline", "--image", img, "--out", out, "--task-shape", "96,96,96")
  assert result.exit_code != 0 and "not a multiple of the chunk size" in result.output
  # a threshold no affinity can reach
  result = invoke("pipeline", "--image", img, "--out", out, "--threshold", "1.5")
  assert result.exit_code != 0 and "--threshold" in result.output
  # levels of a hierarchy that was not asked for
  result = invoke("pipeline", "--image", img, "--out", out, "--levels", "2")
  assert result.exit_code != 0 and "needs hierarchy (--hierarchy N)" in result.output
  for result_output in (result.output,):
    assert "Traceback" not in result_output
  assert not out.exists()


def test_pipeline_rejects_bad_ground_truth_files_before_running(tmp_path, volume_zyx):
  np.save(tmp_path / "em.npy", volume_zyx)
  img = "file://" + str(tmp_path / "em")
  assert invoke("import", tmp_path / "em.npy", img, "--type", "image",
                "--resolution", "4,4,40").exit_code == 0
  bad = tmp_path / "nuclei.csv"
  bad.write_text("a,b,c\n1,2,3\n")
  out = tmp_path / "run"
  result = invoke("pipeline", "--image", img, "--out", out, "--nuclei", bad)
  assert result.exit_code != 0 and "nuclei.csv" in result.output
  assert not out.exists()
  # a boundary tolerance without dense ground truth, and one below a 4 nm voxel
  result = invoke("pipeline", "--image", img, "--out", out, "--boundary-tolerance-nm", "10")
  assert result.exit_code != 0 and "give gt_labels (--gt-labels)" in result.output
  gt = "file://" + str(tmp_path / "gt")
  assert invoke("import", tmp_path / "em.npy", gt, "--type", "segmentation",
                "--resolution", "4,4,40").exit_code == 0
  result = invoke("pipeline", "--image", img, "--out", out, "--gt-labels", gt,
                  "--boundary-tolerance-nm", "3")
  assert result.exit_code != 0 and "must reach at least one voxel" in result.output
  assert not out.exists()


def test_two_stage_commands_without_a_queue_run_every_stage_locally(tmp_path):
  """With neither --queue nor -p each stage gets a private queue and a local worker: the
  second stage (here mip 2) must not wait for external workers on the first stage's queue,
  which is gone. A subprocess, so that a regression fails on the timeout instead of hanging."""
  import subprocess
  import sys
  from iicats_cv.volume_io import import_volume
  image = np.random.default_rng(0).integers(0, 255, (128, 128, 128), dtype=np.uint8)
  path = import_volume(image, "file://" + str(tmp_path / "em"), "image", (10, 10, 10))
  done = subprocess.run([sys.executable, "-c", "from iicats_cv.cli import cli; cli()",
                         "downsample", path, "--num-mips", "2"],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "2 mip(s) written" in done.stdout and "note" not in done.stdout
  assert len(CloudVolume(path).available_mips) == 3
  # more mips than the volume allows: the ones that fit, and a note saying why
  result = invoke("downsample", path, "--num-mips", "4")
  assert result.exit_code == 0, result.output
  assert "note: 2 of the 4 mips: the next would have fewer than 32 voxels" in result.output


def test_pyramid_depth_counts_only_the_axes_that_are_downsampled():
  """An ssEM stack of 20 sections is never halved in z: its in-plane mips are made all the
  same. A volume too small for any mip gets none (Igneous would refuse it, and a stage that
  wrote nothing was listed as done)."""
  from iicats_cv.tasks.igneous_stages import downsample_factor, pyramid_depth
  assert downsample_factor((4.6, 4.6, 45)) == (2, 2, 1)
  assert pyramid_depth((512, 512, 20), (4.6, 4.6, 45), 3) == 3
  assert pyramid_depth((512, 512, 20), (10, 10, 10), 3) == 0
  assert pyramid_depth((16, 16, 16), (10, 10, 10), 2) == 0
  assert pyramid_depth((128, 128, 128), (10, 10, 10), 4) == 2


def test_overwrite_replaces_the_whole_layer_and_a_source_inside_dest_is_refused(tmp_path,
                                                                                volume_zyx):
  """--overwrite left the old layer's chunks that the new one does not cover (and its meshes
  and other scales), read back as part of the new layer."""
  np.save(tmp_path / "em.npy", volume_zyx)
  np.save(tmp_path / "small.npy", volume_zyx[:8, :32, :32])
  dest = tmp_path / "layer"
  assert invoke("import", tmp_path / "em.npy", dest, "--type", "image", "--resolution",
                "4,4,40", "--chunk-size", "32,32,8").exit_code == 0
  (dest / "mesh").mkdir()
  (dest / "mesh" / "info").write_text("{}")
  result = invoke("import", tmp_path / "small.npy", dest, "--type", "image", "--resolution",
                  "4,4,40", "--chunk-size", "32,32,8", "--overwrite")
  assert result.exit_code == 0, result.output
  scale, = [p for p in dest.iterdir() if p.is_dir()]  # no mesh/ left
  assert [p.name for p in scale.iterdir()] == ["0-24_0-20_0-8"]  # the new layer's one chunk
  inside = dest / "sections.npy"
  np.save(inside, volume_zyx)
  result = invoke("import", inside, dest, "--type", "image", "--resolution", "4,4,40",
                  "--overwrite")
  assert result.exit_code != 0 and "lies inside DEST" in result.output
  assert inside.exists()


def test_an_empty_constraint_list_is_refused(tmp_path):
  result = invoke("pipeline", "--image", tmp_path / "em", "--out", tmp_path / "run",
                  "--constraints", ",")
  assert result.exit_code != 0 and "name the evidence" in result.output
  assert not (tmp_path / "run").exists()
