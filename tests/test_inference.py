"""Blending, task-shape independence, channel layout and checkpoints."""
import os

import numpy as np
import pytest
import tensorstore as ts
import torch
from cloudfiles import CloudFiles

from iicats_cv.errors import IicatsError
from iicats_cv.inference import bump_weights, default_overlap, patches_for_block, predict_block, \
  grid_starts, forward_probabilities, in_plane_orientations
from iicats_cv.model import load_checkpoint, save_checkpoint, ModelConfig, UNet3D, \
  AFFINITY_CHANNELS, ORGANELLE_CHANNELS, long_range_channels, long_range_offsets
from iicats_cv.volume_io import import_volume
from conftest import blobs


def test_bump_weights_positive_and_peaked():
  w = bump_weights((16, 16, 8))
  assert w.shape == (16, 16, 8) and w.dtype == np.float32
  assert (w > 0).all()
  assert w[8, 8, 4] == pytest.approx(w.max())
  assert w[0, 0, 0] < 1e-3 * w.max()


def test_grid_covers_dataset_and_ends_flush():
  starts = grid_starts(0, 100, 32, 24)
  assert starts[0] == 0 and starts[-1] == 100 - 32
  assert (np.diff(starts) <= 24).all()
  assert list(grid_starts(5, 20, 32, 24)) == [5]


class ConstantModel(torch.nn.Module):
  """Outputs logit 0 everywhere: every blended probability must be exactly 0.5."""

  def __init__(self, config):
    super().__init__()
    self.config = config

  def forward(self, x):
    return torch.zeros((x.shape[0], len(self.config.out_channels)) + tuple(x.shape[2:]))


def _constant_image_on_a_grid(shape):
  """A constant uint8 image of `shape` and the patch grid (16³ patches, stride 12) over it."""
  config = ModelConfig(width=(4, 8), downsample=((2, 2, 2),), patch_size=(16, 16, 16))
  image = np.full(shape, 100, np.uint8)
  start, stop = np.array([0, 0, 0]), np.array(shape)
  patches = patches_for_block(start, stop, start, stop, np.array(config.patch_size),
                              np.array([12, 12, 12]))
  return config, image, start, stop, patches


def test_blending_weights_sum_to_one():
  config, image, start, stop, patches = _constant_image_on_a_grid((40, 40, 30))
  out = predict_block(ConstantModel(config), image, start, start, stop, patches)
  # a constant prediction survives normalised blending unchanged iff weights sum to 1
  np.testing.assert_allclose(out, 0.5, rtol=1e-5)


def test_batches_fill_across_z_layers_and_slabs_cover_the_block():
  config, image, start, stop, patches = _constant_image_on_a_grid((40, 40, 64))
  assert len(patches) == 9 * 5  # 9 patches per z layer: a batch of 4 never divides a layer
  model = ConstantModel(config)
  sizes, slabs = [], []
  model.forward = lambda x: sizes.append(x.shape[0]) or ConstantModel.forward(model, x)
  out = predict_block(model, image, start, start, stop, patches, batch_size=4,
                      on_final=lambda z0, z1, probs: slabs.append((z0, z1, probs.copy())),
                      z_align=8)
  # the last batch holds one patch, which runs beside an all-zero tile (a patch run alone
  # gets other values)
  assert sizes == [4] * 11 + [2]
  # on_final runs in a pool of two threads, so slabs may arrive in any order
  slabs.sort(key=lambda slab: slab[0])
  assert [z0 for z0, _, _ in slabs] == [0] + [z1 for _, z1, _ in slabs[:-1]]
  assert slabs[-1][1] == 64 and all(z0 % 8 == 0 for z0, _, _ in slabs)
  np.testing.assert_allclose(np.concatenate([p for _, _, p in slabs], axis=-1), out)
  np.testing.assert_allclose(out, 0.5, rtol=1e-5)


class _DictCache:
  """predict_block's patch cache, in memory."""

  def __init__(self):
    self.patches = {}

  def get(self, start):
    return self.patches.get(tuple(start))

  def put(self, start, probabilities):
    self.patches[tuple(start)] = np.array(probabilities)


@pytest.mark.parametrize("shape, cut", [
  ((96, 48, 48), 48),  # the left block's one shared patch ran alone, in a batch of one
  ((120, 48, 60), 60),  # cached patches used to be added before the computed ones
])
def test_a_blocks_values_do_not_depend_on_who_computed_its_shared_patches(shape, cut):
  """Bit for bit: the float32 sums must change neither with the order in which patches
  arrive (a cached one at once, a computed one with its batch) nor with the batch a patch ran
  in. The shipped model: the tiny test network shows neither difference."""
  model = load_checkpoint(None)[0]
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  start, stop = np.zeros(3, int), np.array(shape)
  patch = np.array(model.config.patch_size)
  stride = patch - default_overlap(patch)

  def block(lo, hi, cache):
    lo, hi = np.array(lo), np.array(hi)
    starts = patches_for_block(lo, hi, start, stop, patch, stride)
    return predict_block(model, image, start, lo, hi, starts, patch_cache=cache)

  right = ((cut, 0, 0), shape)
  alone = block(*right, None)
  cache = _DictCache()
  block((0, 0, 0), (cut,) + shape[1:], cache)
  assert cache.patches
  np.testing.assert_array_equal(block(*right, cache), alone)


def _run_inference(tmp_path, checkpoint, task_shape, name, share_patches=True, augment=False):
  from iicats_cv.tasks.inference import create_inference_tasks
  from iicats_cv.tasks.runner import run_tasks
  labels, image = blobs((64, 64, 40))
  image_path = "file://" + str(tmp_path / "image")
  import_volume(image, image_path, "image", (10, 10, 10), chunk_size=(32, 32, 32))
  aff = "file://" + str(tmp_path / name / "aff")
  org = "file://" + str(tmp_path / name / "org")
  tasks = create_inference_tasks(image_path, aff, org, checkpoint, task_shape,
                                 chunk_size=(32, 32, 32), share_patches=share_patches,
                                 augment=augment)
  run_tasks(tasks, None, 1, desc="inference")
  return aff, org


def test_inference_independent_of_task_shape(tmp_path, tiny_checkpoint):
  from cloudvolume import CloudVolume
  aff_a, org_a = _run_inference(tmp_path, tiny_checkpoint, (32, 32, 32), "a")
  aff_b, org_b = _run_inference(tmp_path / "b", tiny_checkpoint, (64, 64, 64), "b")
  a = CloudVolume(aff_a)[:, :, :]
  b = CloudVolume(aff_b)[:, :, :]
  assert a.shape == (64, 64, 40, 3) and a.dtype == np.uint8
  # identical: patches are added in one global order, and none runs alone in a batch
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(CloudVolume(org_a)[:, :, :], CloudVolume(org_b)[:, :, :])
  org = CloudVolume(org_a)
  assert org.num_channels == len(ORGANELLE_CHANNELS)
  # an independent reader opens the written layer
  store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": aff_a + "/"}).result()
  assert store.shape[-1] == len(AFFINITY_CHANNELS)
  np.testing.assert_array_equal(np.asarray(store.read().result())[..., :], a)


def test_workers_read_the_drivers_checkpoint_from_the_bucket(tmp_path, tiny_checkpoint):
  """A fleet's workers have no copy of the driver's checkpoint file: the tasks name a copy
  beside the outputs (named by its content), which a worker fetches."""
  import shutil
  from cloudvolume import CloudVolume
  from iicats_cv.tasks import inference
  from iicats_cv.tasks.inference import create_inference_tasks
  from iicats_cv.tasks.runner import run_tasks
  driver_copy = tmp_path / "mine.safetensors"
  shutil.copy(tiny_checkpoint, driver_copy)
  _, image = blobs((32, 32, 32))
  image_path = import_volume(image, "file://" + str(tmp_path / "em"), "image", (10, 10, 10))
  aff = "file://" + str(tmp_path / "aff")
  tasks = create_inference_tasks(image_path, aff, "file://" + str(tmp_path / "org"),
                                 str(driver_copy), (32, 32, 32), chunk_size=(32, 32, 32))
  published = tasks[0].keywords["checkpoint"]
  assert published.startswith(aff + "/model/") and published.endswith(".safetensors")
  os.remove(driver_copy)  # the worker's machine
  inference._MODELS.clear()
  run_tasks(tasks, None, 1, desc="inference")
  assert np.asarray(CloudVolume(aff)[:, :, :]).any()
  again = create_inference_tasks(image_path, aff, "file://" + str(tmp_path / "org"),
                                 tiny_checkpoint, (32, 32, 32), chunk_size=(32, 32, 32))
  assert again[0].keywords["checkpoint"] == published  # one copy per content


def test_augmented_inference_independent_of_task_shape(tmp_path, tiny_checkpoint):
  from cloudvolume import CloudVolume
  aff_a, _ = _run_inference(tmp_path, tiny_checkpoint, (32, 32, 32), "a", augment=True)
  aff_b, _ = _run_inference(tmp_path / "b", tiny_checkpoint, (64, 64, 64), "b", augment=True)
  plain, _ = _run_inference(tmp_path / "c", tiny_checkpoint, (64, 64, 64), "c")
  a, b = CloudVolume(aff_a)[:, :, :], CloudVolume(aff_b)[:, :, :]
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - CloudVolume(plain)[:, :, :].astype(int)).max() > 1
  assert CloudVolume(aff_a).provenance.processing[-1]["method"]["test_time_augmentation"]


def test_patches_across_task_faces_are_computed_once(tmp_path, tiny_checkpoint, monkeypatch):
  """32³ tasks over 64×64×40 voxels: with the patch cache, the model runs each patch of the
  global grid once (as one whole-volume pass would), and the output is that of tasks that
  each compute every patch they touch (to one quantisation step: patches batch differently)."""
  from cloudvolume import CloudVolume
  from iicats_cv.tasks import inference as task_module
  forwarded = []
  model_of = task_module._model

  def counting_model(checkpoint, device):
    model = model_of(checkpoint, device)

    class Counting(torch.nn.Module):
      config = model.config

      def forward(self, x):
        # patches of the image, not the all-zero tile beside a lone patch (a normalised
        # uint8 image is never 0)
        forwarded.append(int(x.flatten(1).any(1).sum()))
        return model(x)
    return Counting()

  monkeypatch.setattr(task_module, "_model", counting_model)
  shared_aff, _ = _run_inference(tmp_path, tiny_checkpoint, (32, 32, 32), "shared")
  shared_runs = sum(forwarded)
  forwarded.clear()
  alone_aff, _ = _run_inference(tmp_path / "alone", tiny_checkpoint, (32, 32, 32), "alone",
                                share_patches=False)
  patch = np.array(load_checkpoint(tiny_checkpoint)[0].config.patch_size)
  whole = patches_for_block(np.zeros(3, int), np.array([64, 64, 40]), np.zeros(3, int),
                            np.array([64, 64, 40]), patch, patch - default_overlap(patch))
  assert shared_runs == len(whole) < sum(forwarded)
  np.testing.assert_array_equal(CloudVolume(shared_aff)[:, :, :],
                                CloudVolume(alone_aff)[:, :, :])
  assert list(CloudFiles(shared_aff).list(prefix="patch_cache/"))
  task_module.clear_patch_cache(shared_aff)
  assert not (tmp_path / "shared" / "aff" / "patch_cache").exists()


def test_long_range_affinities_follow_the_short_range_ones(tmp_path):
  """A model with long-range heads: the affinities layer holds x, y, z, then x3, y3, z3 (named
  in its provenance); the segmentation reads only the first three; a layer whose channels are
  not x, y, z triples is refused by name."""
  import json
  from cloudvolume import Bbox, CloudVolume
  from iicats_cv.model import long_range_channels, save_checkpoint
  from iicats_cv.layers import create_layer
  from iicats_cv.tasks.segmentation import _probability_channels, check_affinities
  torch.manual_seed(0)
  config = ModelConfig(width=(4, 8), downsample=((2, 2, 2),), patch_size=(16, 16, 16),
                       out_channels=AFFINITY_CHANNELS + ORGANELLE_CHANNELS
                       + long_range_channels((3,)))
  checkpoint = str(tmp_path / "long.safetensors")
  save_checkpoint(checkpoint, UNet3D(config), {"note": "random weights for tests"})
  aff, org = _run_inference(tmp_path, checkpoint, (32, 32, 32), "long")
  cv = check_affinities(aff)
  assert cv.num_channels == 6 and CloudVolume(org).num_channels == 3
  provenance = json.loads(CloudFiles(aff).get("provenance"))
  assert provenance["processing"][-1]["method"]["channels"][3:] == [
    "affinity_x3", "affinity_y3", "affinity_z3"]
  box = Bbox((0, 0, 0), (16, 16, 8))
  first = _probability_channels(cv, box, "affinity layer", channels=3)
  np.testing.assert_array_equal(first, _probability_channels(cv, box, "affinity layer")[:3])
  bad = "file://" + str(tmp_path / "four")
  create_layer(bad, layer_type="image", dtype="uint8", resolution=(10, 10, 10),
               voxel_offset=(0, 0, 0), volume_size=(8, 8, 8), chunk_size=(8, 8, 8),
               num_channels=4, step="test", params={})
  with pytest.raises(IicatsError, match="four: has 4 channel"):
    check_affinities(bad)


def test_outputs_finite_and_in_range(tiny_checkpoint):
  model, _ = load_checkpoint(tiny_checkpoint)
  _, image = blobs((32, 32, 32))
  start, stop = np.zeros(3, int), np.array(image.shape)
  patches = patches_for_block(start, stop, start, stop, np.array(model.config.patch_size),
                              np.array([12, 12, 12]))
  out = predict_block(model, image, start, start, stop, patches)
  assert out.shape == (6, 32, 32, 32)
  assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_checkpoint_round_trip(tmp_path, tiny_checkpoint):
  model, meta = load_checkpoint(tiny_checkpoint)
  path = str(tmp_path / "copy.safetensors")
  save_checkpoint(path, model, meta)
  again, meta2 = load_checkpoint(path)
  assert meta2 == meta and again.config == model.config
  for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
    assert k == k2 and torch.equal(v, v2)
  # readable by whoever the umask lets read new files (workers of other users), not 0600
  umask = os.umask(0o022)
  try:
    save_checkpoint(path, model, meta)
  finally:
    os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o644


def test_bad_checkpoints(tmp_path, tiny_checkpoint):
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"not a checkpoint at all")
  with pytest.raises(IicatsError, match="garbage.safetensors"):
    load_checkpoint(str(garbage))
  with pytest.raises(IicatsError, match="not found"):
    load_checkpoint(str(tmp_path / "missing.safetensors"))
  # weights of another architecture under this config
  other = UNet3D(ModelConfig(width=(4, 8), downsample=((2, 2, 2),)))
  from safetensors.torch import save_file
  import json
  tensors = {k: v.contiguous() for k, v in other.state_dict().items()}
  tensors.pop(next(iter(tensors)))
  save_file(tensors, str(tmp_path / "mismatch.safetensors"),
            metadata={"format": "iicats-cv/unet3d/1", "config": other.config.to_json(),
                      "metadata": json.dumps({})})
  with pytest.raises(IicatsError, match="do not match"):
    load_checkpoint(str(tmp_path / "mismatch.safetensors"))


def test_image_of_wrong_dtype_or_channels_rejected(tmp_path, tiny_checkpoint):
  from iicats_cv.tasks.inference import create_inference_tasks
  from iicats_cv.layers import create_layer
  path = "file://" + str(tmp_path / "float_image")
  create_layer(path, layer_type="image", dtype="float64", resolution=(10, 10, 10),
               voxel_offset=(0, 0, 0), volume_size=(32, 32, 32))
  with pytest.raises(IicatsError, match="float64"):
    create_inference_tasks(path, path + "_aff", path + "_org", tiny_checkpoint, (32, 32, 32))
  path2 = "file://" + str(tmp_path / "rgb_image")
  create_layer(path2, layer_type="image", dtype="uint8", resolution=(10, 10, 10),
               voxel_offset=(0, 0, 0), volume_size=(32, 32, 32), num_channels=3)
  with pytest.raises(IicatsError, match="3 channel"):
    create_inference_tasks(path2, path2 + "_aff", path2 + "_org", tiny_checkpoint, (32, 32, 32))
  assert not (tmp_path / "float_image_aff").exists()


def test_a_box_of_a_coarser_mip_is_predicted_as_the_whole_mip_predicts_it(tmp_path,
                                                                          tiny_checkpoint):
  """--mip 1 --bounds: the outputs cover just the box, at mip 1's resolution, and equal the
  whole mip's prediction there (patches reaching past the box read the image around it)."""
  from click.testing import CliRunner
  from cloudvolume import CloudVolume
  from iicats_cv.cli import cli
  from iicats_cv.tasks import igneous_stages as ig
  from iicats_cv.tasks.runner import run_tasks
  _, image = blobs((128, 128, 80), n=10)
  image_path = import_volume(image, "file://" + str(tmp_path / "em"), "image", (5, 5, 5))
  run_tasks(ig.downsample_tasks(image_path, 0), None, 1, desc="downsample")
  outputs = {}
  for name, bounds in (("whole", []), ("box", ["--bounds", "12,8,6,60,50,40"])):
    aff, org = (f"file://{tmp_path}/{name}/{layer}" for layer in ("aff", "org"))
    result = CliRunner().invoke(cli, ["infer", image_path, "--affinities", aff, "--organelles",
                                      org, "--checkpoint", tiny_checkpoint, "--mip", "1",
                                      "--task-shape", "64,64,64", *bounds])
    assert result.exit_code == 0, result.output
    outputs[name] = CloudVolume(aff)
  box = outputs["box"]
  assert list(box.resolution) == [10, 10, 10]
  assert box.bounds.minpt.tolist() == [12, 8, 6] and box.bounds.maxpt.tolist() == [60, 50, 40]
  assert outputs["whole"].bounds.maxpt.tolist() == [64, 64, 40]
  method = box.provenance.processing[-1]["method"]
  assert method["image_mip"] == 1 and method["bounds"] == [12, 8, 6, 60, 50, 40]
  whole = outputs["whole"][12:60, 8:50, 6:40].astype(int)
  assert np.abs(box[:, :, :].astype(int) - whole).max() <= 1  # float summation order


@pytest.mark.parametrize("args, message", [
  (["--bounds", "0,0,0,80,10,10"], r"outside image layer .*em, whose bounds are \[0, 0, 0\]-"
                                   r"\[64, 64, 40\] voxels at mip 0 \(10×10×10 nm\)"),
  (["--bounds", "10,0,0,5,10,10"], "empty"),
  (["--bounds", "3,3,3,4,4,4"], "a single voxel; give a region of two or more"),
  (["--bounds", "1,2,3"], "expected x0,y0,z0,x1,y1,z1"),
  (["--mip", "1"], r"has no mip 1 \(its 1 mip\(s\): 10×10×10 nm; `iicats downsample`"),
])
def test_a_bad_box_or_mip_is_refused_before_anything_is_written(tmp_path, tiny_checkpoint,
                                                                args, message):
  import re
  from click.testing import CliRunner
  from iicats_cv.cli import cli
  _, image = blobs((64, 64, 40))
  image_path = import_volume(image, "file://" + str(tmp_path / "em"), "image", (10, 10, 10))
  result = CliRunner().invoke(cli, ["infer", image_path, "--affinities", str(tmp_path / "aff"),
                                    "--organelles", str(tmp_path / "org"), "--checkpoint",
                                    tiny_checkpoint, *args])
  assert result.exit_code != 0
  assert re.search(message, result.output), result.output
  assert "Traceback" not in result.output
  assert not (tmp_path / "aff").exists()


def test_a_missing_image_chunk_is_named_or_read_as_black(tmp_path, tiny_checkpoint):
  """A chunk never written (Igneous leaves black ones out) fails the task at once, naming the
  chunk and --fill-missing; with --fill-missing it reads as black."""
  from click.testing import CliRunner
  from cloudvolume import CloudVolume
  from iicats_cv.cli import cli
  _, image = blobs((64, 64, 40))
  image_path = import_volume(image, "file://" + str(tmp_path / "em"), "image", (10, 10, 10),
                             chunk_size=(32, 32, 40))
  os.remove(tmp_path / "em" / "10.0_10.0_10.0" / "32-64_0-32_0-40")
  args = ["infer", image_path, "--checkpoint", tiny_checkpoint, "--task-shape", "64,64,64"]
  result = CliRunner().invoke(cli, args + ["--affinities", str(tmp_path / "a" / "aff"),
                                           "--organelles", str(tmp_path / "a" / "org")])
  assert result.exit_code != 0
  assert ("chunk 10.0_10.0_10.0/32-64_0-32_0-40 is missing" in result.output
          and "--fill-missing" in result.output and "attempts: 1" in result.output)
  result = CliRunner().invoke(cli, args + ["--affinities", str(tmp_path / "b" / "aff"),
                                           "--organelles", str(tmp_path / "b" / "org"),
                                           "--fill-missing"])
  assert result.exit_code == 0, result.output
  affinities = CloudVolume("file://" + str(tmp_path / "b" / "aff"))
  assert affinities.provenance.processing[-1]["method"]["fill_missing"] is True
  assert np.asarray(affinities[:, :, :]).any()


def test_a_corrupt_image_chunk_is_named_and_not_retried(tmp_path, tiny_checkpoint):
  """A chunk that does not decode (a truncated upload) fails the task at once with one line
  naming the layer and the chunk, not a codec's traceback after three attempts."""
  from click.testing import CliRunner
  from iicats_cv.cli import cli
  _, image = blobs((64, 64, 40))
  image_path = import_volume(image, "file://" + str(tmp_path / "em"), "image", (10, 10, 10),
                             chunk_size=(32, 32, 40))
  chunk = tmp_path / "em" / "10.0_10.0_10.0" / "32-64_0-32_0-40"
  chunk.write_bytes(chunk.read_bytes()[:1000])
  result = CliRunner().invoke(cli, ["infer", image_path, "--checkpoint", tiny_checkpoint,
                                    "--task-shape", "64,64,64",
                                    "--affinities", str(tmp_path / "aff"),
                                    "--organelles", str(tmp_path / "org")])
  assert result.exit_code != 0
  assert (f"image layer {image_path}: chunk 10.0_10.0_10.0/32-64_0-32_0-40 is corrupt"
          in result.output and "attempts: 1" in result.output), result.output
  assert "Traceback" not in result.output


@pytest.mark.parametrize("layer_type,dtype,compress,damage", [
  ("image", "float32", False, "garbage"), ("segmentation", "uint64", False, "garbage"),
  ("segmentation", "uint64", False, "truncated"), ("image", "uint8", "gzip", "truncated")])
def test_read_box_names_a_chunk_that_does_not_decode(tmp_path, layer_type, dtype, compress,
                                                     damage):
  """A chunk that does not decode is an IicatsError naming the layer and the chunk, whatever
  failed: a raw chunk's size, the compressed_segmentation decoder (which crashes the process
  on a damaged header and decodes a truncated chunk to garbage unless the chunk is checked
  first), or gzip (an error, or an empty result that CloudVolume takes for a missing chunk).
  Intact chunks still read."""
  from cloudvolume import Bbox, CloudVolume
  from iicats_cv.layers import read_box
  path = "file://" + str(tmp_path / "layer")
  encoding = "compressed_segmentation" if layer_type == "segmentation" else "raw"
  info = CloudVolume.create_new_info(1, layer_type, dtype, encoding, [10, 10, 10], [0, 0, 0],
                                     [64, 32, 32], chunk_size=[32, 32, 32])
  cv = CloudVolume(path, info=info, compress=compress)
  cv.commit_info()
  cv[:, :, :] = np.arange(64 * 32 * 32).reshape(64, 32, 32).astype(dtype)
  chunk, = (tmp_path / "layer" / "10_10_10").glob("32-64_0-32_0-32*")
  data = chunk.read_bytes()
  chunk.write_bytes(b"\x07" * 100 if damage == "garbage" else data[:len(data) // 2])
  cv = CloudVolume(path)
  assert read_box(cv, Bbox((0, 0, 0), (32, 32, 32)), "test layer").any()
  with pytest.raises(IicatsError, match=rf"test layer {path}: chunk "
                                        r"10_10_10/32-64_0-32_0-32 is corrupt"):
    read_box(cv, Bbox((0, 0, 0), (64, 32, 32)), "test layer")


@pytest.mark.parametrize("compress", [False, "gzip"])
def test_read_box_with_fill_missing_names_a_chunk_file_without_data(tmp_path, compress):
  """With fill_missing a chunk that was never written reads as black, but one whose file is
  there and holds no data (zero bytes, or gzip of nothing: an upload cut short) is named as
  corrupt, with or without fill_missing, instead of reading as black."""
  import gzip
  from cloudvolume import Bbox, CloudVolume
  from iicats_cv.layers import read_box
  path = "file://" + str(tmp_path / "layer")
  info = CloudVolume.create_new_info(1, "image", "uint8", "raw", [10, 10, 10], [0, 0, 0],
                                     [64, 32, 32], chunk_size=[32, 32, 32])
  cv = CloudVolume(path, info=info, compress=compress)
  cv.commit_info()
  cv[:, :, :] = np.full((64, 32, 32), 7, np.uint8)
  chunk, = (tmp_path / "layer" / "10_10_10").glob("32-64_0-32_0-32*")
  box = Bbox((0, 0, 0), (64, 32, 32))
  for content in (b"", gzip.compress(b"")):
    chunk.write_bytes(content)
    for fill_missing in (False, True):
      with pytest.raises(IicatsError, match=rf"test layer {path}: chunk "
                                            r"10_10_10/32-64_0-32_0-32 is corrupt"):
        read_box(CloudVolume(path, fill_missing=fill_missing), box, "test layer")
  chunk.unlink()
  image = read_box(CloudVolume(path, fill_missing=True), box, "test layer")
  assert (image[:32] == 7).all() and (image[32:] == 0).all()


def test_the_compressed_segmentation_check_passes_every_valid_chunk():
  """The structure check before compressed_segmentation decodes a chunk raises no false
  alarm on valid chunks of any shape (blocks cut at the chunk's edge), label count and dtype,
  and finds every truncation."""
  import compressed_segmentation
  from iicats_cv.layers import compressed_segmentation_problem
  rng = np.random.default_rng(0)
  for trial in range(60):
    shape = tuple(int(n) for n in rng.integers(1, 70, 3)) + (1,)
    dtype = (np.uint32, np.uint64)[trial % 2]
    labels = int(rng.choice([1, 2, 3, 17, 300, 5000]))
    block = (8, 8, 8) if trial % 3 else (4, 4, 4)
    array = np.asfortranarray(rng.integers(0, labels, shape).astype(dtype))
    data = compressed_segmentation.compress(array, block_size=block, order="F")
    assert compressed_segmentation_problem(data, shape, dtype, block) is None
    for cut in (len(data) // 2, len(data) - 4, 8):
      assert compressed_segmentation_problem(data[:cut], shape, dtype, block) is not None


def test_a_uint16_image_is_read_through_its_grey_value_window(tmp_path, tiny_checkpoint):
  """Labs' FIB-SEM is often 16-bit: its grey values map onto the model's 0-255 by a window,
  given (the exact one gives the uint8 image's prediction) or its percentiles."""
  from click.testing import CliRunner
  from cloudvolume import CloudVolume
  from iicats_cv.cli import cli
  from iicats_cv.layers import create_layer
  _, image = blobs((64, 64, 40))
  em8 = import_volume(image, "file://" + str(tmp_path / "em8"), "image", (10, 10, 10))
  em16 = "file://" + str(tmp_path / "em16")
  create_layer(em16, layer_type="image", dtype="uint16", resolution=(10, 10, 10),
               voxel_offset=(0, 0, 0), volume_size=image.shape)[:, :, :] = \
    image.astype(np.uint16) * 100 + 1000

  def infer(image_path, name, *extra):
    result = CliRunner().invoke(cli, [
      "infer", image_path, "--checkpoint", tiny_checkpoint, "--task-shape", "64,64,64",
      "--affinities", f"file://{tmp_path}/{name}/aff", "--organelles",
      f"file://{tmp_path}/{name}/org", *extra])
    return result, CloudVolume(f"file://{tmp_path}/{name}/aff")

  _, plain = infer(em8, "plain")
  result, mapped = infer(em16, "mapped", "--image-window", "1000,26500")
  assert result.exit_code == 0, result.output
  np.testing.assert_array_equal(mapped[:, :, :], plain[:, :, :])
  assert mapped.provenance.processing[-1]["method"]["image_window"] == [1000, 26500]
  result, sampled = infer(em16, "sampled")
  assert result.exit_code == 0, result.output
  assert "image layer " + em16 + " is uint16: grey values" in result.output
  low, high = sampled.provenance.processing[-1]["method"]["image_window"]
  assert 1000 <= low < high <= 26500
  result = CliRunner().invoke(cli, ["infer", em16, "--affinities", "x", "--organelles", "y",
                                    "--image-window", "5,1"])
  assert result.exit_code != 0 and "HI must be larger than LO" in result.output


class MirrorEquivariantModel(torch.nn.Module):
  """Affinity logits from the intensity difference of each voxel and its -d partner (logit 0
  where the partner lies outside the patch); organelle logits from the intensity alone. Its
  prediction of a mirrored patch, mirrored back, is its prediction of the patch."""

  def __init__(self, config):
    super().__init__()
    self.config = config
    self.offsets = [(axis, 1) for axis in range(3)] + long_range_offsets(config.out_channels)

  def forward(self, x):
    image = x[:, 0]
    out = []
    for axis, d in self.offsets[:3]:
      out.append(self._affinity(image, axis, d))
    out += [image * 2.0, -image, image - 0.5]
    for axis, d in self.offsets[3:]:
      out.append(self._affinity(image, axis, d))
    return torch.stack(out, 1)

  @staticmethod
  def _affinity(image, axis, d):
    logit = torch.zeros_like(image)
    here = image.narrow(axis + 1, d, image.shape[axis + 1] - d)
    there = image.narrow(axis + 1, 0, image.shape[axis + 1] - d)
    logit.narrow(axis + 1, d, image.shape[axis + 1] - d).copy_(2.0 - 4.0 * (here - there).abs())
    return logit


def _config_with_long_range(patch_size):
  return ModelConfig(width=(4, 8), downsample=((2, 2, 2),), patch_size=patch_size,
                     out_channels=AFFINITY_CHANNELS + ORGANELLE_CHANNELS
                     + long_range_channels((3,)))


def test_test_time_augmentation_mirrors_affinities_back_onto_their_voxels():
  x = torch.from_numpy(np.random.default_rng(0).random((2, 1, 16, 16, 8), np.float32))
  for patch in ((16, 16, 8), (16, 12, 8)):
    config = _config_with_long_range(patch)
    model = MirrorEquivariantModel(config)
    batch = x[:, :, :, :patch[1]]
    plain = forward_probabilities(model, batch)
    augmented = forward_probabilities(model, batch, augment=True)
    # a wrong shift or channel swap after un-mirroring would move affinities off their voxels
    torch.testing.assert_close(augmented, plain, atol=1e-6, rtol=0)
  assert len(in_plane_orientations(_config_with_long_range((16, 16, 8)))) == 8
  # no x <-> y transpose for a patch that is not square in x, y
  assert len(in_plane_orientations(_config_with_long_range((16, 12, 8)))) == 4


def test_test_time_augmentation_averages_over_the_mirror_images():
  config = ModelConfig(width=(4, 8), downsample=((2, 2, 2),), patch_size=(16, 16, 8))

  class RampModel(ConstantModel):
    """Logits that rise along x and y, whatever the image: not mirror-equivariant."""

    def forward(self, x):
      ramp = torch.linspace(-2, 2, x.shape[2])
      logits = ramp[:, None, None] + ramp[None, :, None] + torch.zeros(x.shape[2:])
      return logits.expand(x.shape[0], len(self.config.out_channels), *x.shape[2:])

  out = forward_probabilities(RampModel(config), torch.zeros((1, 1, 16, 16, 8)), augment=True)
  # organelle channels: sigmoid(r) and sigmoid(-r) average to 0.5 at every voxel
  torch.testing.assert_close(out[:, 3:], torch.full_like(out[:, 3:], 0.5), atol=1e-6, rtol=0)


def test_an_existing_layer_of_another_kind_is_named_with_what_differs(tmp_path):
  from iicats_cv.layers import create_layer
  path = "file://" + str(tmp_path / "aff")
  geometry = {"layer_type": "image", "resolution": (10, 10, 10), "voxel_offset": (0, 0, 0),
              "volume_size": (64, 64, 64), "num_channels": 3}
  create_layer(path, dtype="float32", **geometry)
  create_layer(path, dtype="float32", **geometry)  # the same again: reopened
  with pytest.raises(IicatsError, match=r"exists there as image float32 × 3 channel\(s\).* "
                                        r"not image uint8 × 3 channel\(s\)"):
    create_layer(path, dtype="uint8", **geometry)


def test_infer_refuses_one_layer_for_both_outputs_and_an_infinite_window(tmp_path,
                                                                         tiny_checkpoint):
  from click.testing import CliRunner
  from iicats_cv.cli import cli
  _, image = blobs((32, 32, 32))
  image_path = import_volume(image, "file://" + str(tmp_path / "em"), "image", (10, 10, 10))
  same = "file://" + str(tmp_path / "out")
  base = ["infer", image_path, "--checkpoint", tiny_checkpoint, "-p", "1"]
  result = CliRunner().invoke(cli, base + ["--affinities", same, "--organelles", same])
  assert result.exit_code != 0 and "give each its own layer" in result.output
  result = CliRunner().invoke(cli, base + ["--affinities", same, "--organelles", same + "2",
                                           "--image-window", "0,inf"])
  assert result.exit_code != 0 and "expected two finite grey values" in result.output
  assert not (tmp_path / "out").exists()
  # an --organelles path that holds another layer is refused before --affinities is written
  import_volume(image, "file://" + str(tmp_path / "other"), "image", (10, 10, 10))
  result = CliRunner().invoke(cli, base + ["--affinities", same, "--organelles",
                                           "file://" + str(tmp_path / "other")])
  assert result.exit_code != 0 and "a layer already exists there" in result.output
  assert not (tmp_path / "out").exists()


def test_read_box_reads_one_voxel_of_a_multi_channel_layer(tmp_path):
  """CloudVolume's one-voxel fast path returns a voxel of a 3-channel layer as (3, 1, 1, 1)
  (its channel slice then empty): read_box gives (1, 1, 1, c) with the right values, at the
  layer's upper corner too."""
  from cloudvolume import Bbox, CloudVolume
  from iicats_cv.layers import read_box
  path = "file://" + str(tmp_path / "affinities")
  info = CloudVolume.create_new_info(3, "image", "uint8", "raw", [10, 10, 10], [5, 0, 0],
                                     [4, 4, 4], chunk_size=[4, 4, 4])
  cv = CloudVolume(path, info=info)
  cv.commit_info()
  data = np.arange(4 * 4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 4, 3)
  cv[:, :, :, :] = data
  cv = CloudVolume(path)
  for x, y, z in ((5, 0, 0), (8, 3, 3), (6, 2, 1)):
    voxel = read_box(cv, Bbox((x, y, z), (x + 1, y + 1, z + 1)), "affinities")
    assert voxel.shape == (1, 1, 1, 3)
    assert (voxel[0, 0, 0] == data[x - 5, y, z]).all()
    channel = read_box(cv, (slice(x, x + 1), slice(y, y + 1), slice(z, z + 1), slice(2, 3)),
                       "affinities")
    assert channel.shape == (1, 1, 1, 1) and channel[0, 0, 0, 0] == data[x - 5, y, z, 2]


def test_black_padding_is_filled_with_the_mirror_image_of_the_tissue():
  """The networks never saw black padding: beside it they predicted a strip without
  membranes. A patch's black regions get the mirror image of the tissue across their edge
  (as the volume's own edges do) and predict 0."""
  from iicats_cv.inference import fill_background
  tile = np.zeros((40, 8, 8), np.uint8)
  tile[16:] = (np.arange(24) + 100)[:, None, None]
  filled, background = fill_background(tile, (10, 10, 10))
  assert background[:16].all() and not background[16:].any()
  assert filled[15, 0, 0] == tile[17, 0, 0] and filled[0, 3, 3] == tile[32, 3, 3]
  assert (filled[16:] == tile[16:]).all()
  unchanged, none = fill_background(tile[16:], (10, 10, 10))
  assert none is None and unchanged is not None and (unchanged == tile[16:]).all()


def test_black_padding_predicts_nothing_and_is_left_unsegmented(tmp_path, tiny_checkpoint):
  """A pipeline over tissue beside black padding: no segment in the padding, the tissue all
  segmented; an all-black image ends with no segment instead of one filling it."""
  from cloudvolume import CloudVolume
  from iicats_cv.tasks.pipeline import run_pipeline
  _, image = blobs((64, 64, 32), n=6, seed=3)
  padded = np.zeros((128, 64, 32), np.uint8)
  padded[64:] = image
  for name, volume in (("padded", padded), ("black", np.zeros_like(padded))):
    path = import_volume(volume, "file://" + str(tmp_path / name), "image", (10, 10, 10))
    summary = run_pipeline(path, "file://" + str(tmp_path / f"run_{name}"), meshes=False,
                           report=False, num_mips=0, checkpoint=tiny_checkpoint,
                           task_shape=(64, 64, 64))
    segmentation = CloudVolume(summary["layers"]["segmentation"])[:, :, :][..., 0]
    affinities = CloudVolume(summary["layers"]["affinities"])[:, :, :]
    # a patch holding less than half of BACKGROUND_SIDE_NM of the padding sees it as tissue:
    # its share of the blend leaves the last few voxels of padding above 0 there
    assert not segmentation[:64].any() and not affinities[:56].any()
    assert segmentation[64:].all() == (name == "padded")
    if name == "black":
      assert summary["agglomeration"]["segments"] == 0
