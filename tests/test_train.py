"""Affinity targets, augmentations that keep targets consistent, masked loss, resumable
training, fine-tuning and the `iicats train` command on precomputed layers."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from iicats_cv.cli import cli
from iicats_cv.errors import IicatsError
from iicats_cv.model import (AFFINITY_CHANNELS, LSD_CHANNELS, ORGANELLE_CHANNELS, ModelConfig,
                            load_checkpoint, long_range_channels)
from iicats_cv.train import (LSD_XY_TRANSPOSED, PatchSampler, TrainingVolume,
                             affinities_from_labels, affinity_error_map,
                             local_shape_descriptors, masked_balanced_bce, masked_soft_dice,
                             mirror_shape_descriptors, train, window_sums)
from iicats_cv.volume_io import import_volume
from conftest import blobs

TINY = dict(width=(4, 8), downsample=((2, 2, 2),), patch_size=(16, 16, 16))


def test_affinities_from_labels_by_hand():
  labels = np.zeros((3, 1, 1), np.uint32)
  labels[:, 0, 0] = [1, 1, 2]
  affs, mask = affinities_from_labels(labels)
  assert affs[0, :, 0, 0].tolist() == [0, 1, 0]   # x: (1,0) same, (2,1) differ
  assert mask[0, :, 0, 0].tolist() == [0, 1, 1]   # voxel 0 has no -x neighbour
  zero = np.zeros((2, 1, 1), np.uint32)
  assert affinities_from_labels(zero)[0].sum() == 0  # background is never affine


def test_augmented_targets_match_labels_of_augmented_image():
  labels, image = blobs((20, 20, 20), n=4)
  vol = TrainingVolume("t", image=image, labels=labels)
  sampler = PatchSampler([vol], ModelConfig(**TINY), isotropic=True, seed=3)
  for _ in range(10):
    img, target, mask = sampler.sample()
    # dark image voxels are label boundaries: affinities there are mostly 0 where valid
    boundary = img[0] < np.median(img[0]) - 1.0
    valid = mask[0] > 0
    assert target[0][boundary & valid].mean() < target[0][~boundary & valid].mean()


def test_long_range_targets_follow_every_augmentation():
  """The image is the labels (one grey value per label), so each augmented patch's labels can
  be read back from it: every affinity channel, short and long range, must equal the
  affinities of those labels wherever both are defined."""
  labels, _ = blobs((24, 24, 24), n=5)
  labels = labels + 1                     # no background: every grey value is one label
  image = (labels * 20 + 10).astype(np.uint8)
  config = ModelConfig(**TINY, out_channels=AFFINITY_CHANNELS + ORGANELLE_CHANNELS
                       + long_range_channels((2, 4)))
  sampler = PatchSampler([TrainingVolume("t", image=image, labels=labels)], config,
                         isotropic=True, seed=5)
  offsets = [(axis, 1, axis) for axis in range(3)] + [
    (axis, d, 6 + 3 * i + axis) for i, d in enumerate((2, 4)) for axis in range(3)]
  for _ in range(12):
    img, target, mask = sampler.sample()
    assert target.shape[0] == 12
    # intensity augmentation is increasing, so grey-value ranks are the labels
    seen = np.unique(img[0], return_inverse=True)[1].reshape(img[0].shape) + 1
    for axis, distance, channel in offsets:
      expected, valid = affinities_from_labels(seen, distance)
      both = (valid[axis] > 0) & (mask[channel] > 0)
      assert both.any()
      np.testing.assert_array_equal(target[channel][both], expected[axis][both])


def test_shape_descriptors_by_hand():
  """Two objects meeting at y = 20: deep inside, the window is all one object (no offset, no
  covariance, full size, variance near sigma²); beside the contact each voxel's object centre
  lies away from the other object, and unlabelled voxels stay 0."""
  labels = np.zeros((40, 40, 40), np.uint32)
  labels[:, :20], labels[:, 20:38] = 1, 2
  d = local_shape_descriptors(labels, (3, 3, 3))
  assert d.shape == (len(LSD_CHANNELS), 40, 40, 40) and d.dtype == np.float32
  np.testing.assert_allclose(d[[0, 1, 2, 6, 7, 8, 9], 20, 10, 20], [0.5] * 6 + [1], atol=1e-3)
  assert 0.95 < d[3, 20, 10, 20] <= 1
  assert d[1, 20, 19, 20] < 0.3 and d[1, 20, 20, 20] > 0.7   # centres on either side
  assert d[9, 20, 19, 20] == pytest.approx(d[9, 20, 20, 20], abs=1e-3) and d[9, 20, 19, 20] < 0.6
  assert not d[:, :, 38:].any()


def test_mirrored_shape_descriptors_match_those_of_mirrored_labels():
  labels, _ = blobs((30, 30, 24), n=6)
  sigma = (2, 2, 3)
  d = local_shape_descriptors(labels, sigma)
  for axis in range(3):
    np.testing.assert_allclose(mirror_shape_descriptors(np.flip(d, axis + 1), axis),
                               local_shape_descriptors(np.flip(labels, axis).copy(), sigma),
                               atol=1e-3)
  transposed = local_shape_descriptors(labels.transpose(1, 0, 2).copy(), sigma)
  np.testing.assert_allclose(d[list(LSD_XY_TRANSPOSED)].transpose(0, 2, 1, 3), transposed,
                             atol=1e-3)


def test_shape_descriptor_targets_follow_every_augmentation():
  """As for the affinities: the patch's labels are read back from its image, and away from
  the patch faces (where the precomputed descriptors saw more context) its descriptor
  targets are those of the labels it shows."""
  labels, _ = blobs((30, 30, 30), n=5)
  labels = labels + 1
  image = (labels * 20 + 10).astype(np.uint8)
  config = ModelConfig(**TINY, out_channels=AFFINITY_CHANNELS + ORGANELLE_CHANNELS
                       + LSD_CHANNELS)
  descriptors = [local_shape_descriptors(labels, (1, 1, 1))]
  sampler = PatchSampler([TrainingVolume("t", image=image, labels=labels)], config,
                         isotropic=True, seed=7, shape_descriptors=descriptors)
  inner = (slice(None),) + (slice(4, -4),) * 3
  for _ in range(12):
    img, target, mask = sampler.sample()
    seen = np.unique(img[0], return_inverse=True)[1].reshape(img[0].shape) + 1
    np.testing.assert_allclose(target[6:][inner], local_shape_descriptors(seen, (1, 1, 1))[inner],
                               atol=1e-2)
    assert (mask[6:] == 1).all()


def test_shape_descriptor_training_keeps_the_usual_channels(tmp_path, tiny_checkpoint):
  """The descriptor head is a training aid: the checkpoint has the usual channels, records
  the scale, and fine-tuning a model without it (lr 0) leaves that model's weights as they
  were."""
  labels, image = blobs((40, 40, 40), n=5)
  vol = TrainingVolume("blobs", image=image, labels=labels)
  out = str(tmp_path / "lsd.safetensors")
  meta = train([vol], out, config=ModelConfig(**TINY), iterations=2, progress=False,
               lsd_sigma_nm=20, val_fraction=0)
  assert meta["shape_descriptors"] == {"sigma_nm": 20, "weight": 1.0}
  assert load_checkpoint(out)[0].config.out_channels == AFFINITY_CHANNELS + ORGANELLE_CHANNELS
  start = load_checkpoint(tiny_checkpoint)[0]
  train([vol], out, config=start.config, iterations=1, progress=False, lsd_sigma_nm=20,
        val_fraction=0, init=tiny_checkpoint, lr=0)
  tuned = load_checkpoint(out)[0]
  for name, weights in start.state_dict().items():
    torch.testing.assert_close(tuned.state_dict()[name], weights)


def test_loss_ignores_masked_channels():
  logits = torch.zeros(1, 6, 4, 4, 4)
  target = torch.ones(1, 6, 4, 4, 4)
  mask = torch.zeros(1, 6, 4, 4, 4)
  mask[:, 0] = 1
  base = masked_balanced_bce(logits, target, mask)
  target[:, 3:] = 0  # unlabelled organelle channels must not change the loss
  assert torch.isclose(masked_balanced_bce(logits, target, mask), base)


def test_soft_dice_scores_overlap_inside_the_mask():
  target = torch.zeros(2, 6, 4, 4, 4)
  target[0, 4, :2] = 1
  mask = torch.ones_like(target)
  mask[:, 5] = 0  # synapses unlabelled: skipped
  sure = (target * 2 - 1) * 20  # logits: confident and right everywhere
  assert masked_soft_dice(sure, target, mask, [3, 4, 5]) < 1e-3
  # everything predicted present: mitochondria Dice 2·32/(128+32+1), nuclei 1/(128+1)
  wrong = torch.full_like(target, 20.0)
  expected = ((1 - 1 / 129) + (1 - 65 / 161)) / 2
  assert masked_soft_dice(wrong, target, mask, [3, 4, 5]).item() == pytest.approx(expected, 1e-4)
  assert masked_soft_dice(wrong, target, torch.zeros_like(mask), [3, 4, 5]).item() == 0


def test_train_resume_and_metadata(tmp_path):
  labels, image = blobs((40, 40, 40), n=5)
  vol = TrainingVolume("blobs", image=image, labels=labels, nucleus=labels == 1)
  out = str(tmp_path / "m.safetensors")
  meta = train([vol], out, config=ModelConfig(**TINY), iterations=6, checkpoint_every=3,
               progress=False, command="test", dice_weight=0.5)
  model, stored = load_checkpoint(out)
  assert stored["iterations"] == 6 and stored["training_command"] == "test"
  assert stored["dice_weight"] == 0.5
  assert "affinity_ap" in stored["validation"]["blobs"]
  assert meta["training_data"][0]["labels"] == ["labels", "nucleus"]
  assert stored["trained_outputs"] == ["affinities", "nucleus"]



def test_validation_fraction_zero_trains_on_every_section(tmp_path):
  """A volume one patch (+1 section of context) deep has no room for a validation patch: the
  default refuses it, --val-fraction 0 trains on all of it and records no validation."""
  labels, image = blobs((40, 40, 17), n=3)
  vol = TrainingVolume("thin", image=image, labels=labels)
  out = str(tmp_path / "thin.safetensors")
  with pytest.raises(IicatsError, match="thin: 17 z slices; need at least 34"):
    train([vol], out, config=ModelConfig(**TINY), iterations=1, progress=False)
  meta = train([vol], out, config=ModelConfig(**TINY), iterations=2, progress=False,
               val_fraction=0)
  assert meta["validation"] == {} and load_checkpoint(out)[1]["validation_fraction"] == 0

def _blob_layers(tmp_path):
  """(image, labels, image layer, labels layer): a small blob volume as precomputed layers."""
  labels, image = blobs((40, 40, 40), n=5)
  img = "file://" + str(tmp_path / "img")
  lab = "file://" + str(tmp_path / "lab")
  import_volume(image, img, "image", (10, 10, 10))
  import_volume(labels, lab, "segmentation", (10, 10, 10))
  return image, labels, img, lab


def test_train_command_on_layers(tmp_path):
  _, _, img, lab = _blob_layers(tmp_path)
  out = str(tmp_path / "cli.safetensors")
  result = CliRunner().invoke(cli, ["train", "--image", img, "--labels", lab, "--out", out,
                                    "--iterations", "2", "--patch-size", "16,16,16"])
  assert result.exit_code == 0, result.output
  _, meta = load_checkpoint(out)
  assert "iicats train" in meta["training_command"]
  long = str(tmp_path / "long.safetensors")
  result = CliRunner().invoke(cli, ["train", "--image", img, "--labels", lab, "--out", long,
                                    "--iterations", "2", "--patch-size", "16,16,16",
                                    "--long-range", "4", "--long-range", "2"])
  assert result.exit_code == 0, result.output
  assert load_checkpoint(long)[0].config.out_channels[6:] == long_range_channels((2, 4))
  too_far = CliRunner().invoke(cli, ["train", "--image", img, "--labels", lab, "--out", long,
                                     "--patch-size", "16,16,16", "--long-range", "16"])
  assert too_far.exit_code != 0 and "--long-range" in too_far.output
  bad = CliRunner().invoke(cli, ["train", "--image", img, "--labels", lab, "--labels", lab,
                                 "--out", out])
  assert bad.exit_code != 0 and "given 2 time(s) for 1 --image" in bad.output
  deep = str(tmp_path / "deep.safetensors")
  result = CliRunner().invoke(cli, ["train", "--image", img, "--labels", lab, "--out", deep,
                                    "--iterations", "1", "--patch-size", "16,16,16",
                                    "--widths", "4,8,8,16", "--val-fraction", "0"])
  assert result.exit_code == 0, result.output
  config = load_checkpoint(deep)[0].config
  assert config.width == (4, 8, 8, 16) and config.downsample == ((2, 2, 2),) * 3
  one_level = CliRunner().invoke(cli, ["train", "--image", img, "--labels", lab, "--out", deep,
                                       "--widths", "8"])
  assert one_level.exit_code != 0 and "--widths" in one_level.output


def test_training_at_a_coarser_mip_reads_the_labels_at_its_resolution(tmp_path):
  """--mip 1 of a 5 nm image: the labels' 10 nm scale is read, and the model records 10 nm;
  labels without that scale are refused, naming the resolution."""
  from iicats_cv.tasks import igneous_stages as ig
  from iicats_cv.tasks.runner import run_tasks
  labels, image = blobs((80, 80, 80), n=5)
  img = import_volume(image, "file://" + str(tmp_path / "img"), "image", (5, 5, 5))
  lab = import_volume(labels, "file://" + str(tmp_path / "lab"), "segmentation", (5, 5, 5))
  for layer in (img, lab):
    run_tasks(ig.downsample_tasks(layer, 0), None, 1, desc="downsample")
  out = str(tmp_path / "mip1.safetensors")
  args = ["train", "--image", img, "--out", out, "--iterations", "1", "--patch-size",
          "16,16,16", "--widths", "4,8", "--val-fraction", "0", "--mip", "1"]
  result = CliRunner().invoke(cli, args + ["--labels", lab, "--bounds", "0,0,8,40,40,40"])
  assert result.exit_code == 0, result.output
  assert load_checkpoint(out)[0].config.resolution == (10.0, 10.0, 10.0)
  _, _, _, coarse = _blob_layers(tmp_path / "other")  # 10 nm labels only
  result = CliRunner().invoke(cli, args[:-1] + ["0", "--labels", coarse])
  assert result.exit_code != 0 and "has no scale at 5×5×5 nm" in result.output


def test_fine_tuning_starts_from_the_checkpoint(tmp_path):
  """--init: the weights come from the checkpoint (with lr 0 they stay exactly its own), its
  architecture is kept, and the provenance says where training started."""
  image, labels, img, lab = _blob_layers(tmp_path)
  start = str(tmp_path / "start.safetensors")
  assert CliRunner().invoke(cli, ["train", "--image", img, "--labels", lab, "--out", start,
                                  "--iterations", "2", "--patch-size", "16,16,16",
                                  "--long-range", "2"]).exit_code == 0
  tuned = str(tmp_path / "tuned.safetensors")
  result = CliRunner().invoke(cli, ["train", "--init", start, "--image", img, "--labels", lab,
                                    "--out", tuned, "--iterations", "2", "--lr", "0"])
  assert result.exit_code == 0, result.output
  (before, _), (after, meta) = load_checkpoint(start), load_checkpoint(tuned)
  assert after.config.out_channels == before.config.out_channels
  for name, weights in before.state_dict().items():
    torch.testing.assert_close(after.state_dict()[name], weights)
  assert meta["initialised_from"]["checkpoint"] == start
  assert "--long-range 2" in meta["initialised_from"]["training_command"]
  # the recorded command runs as written: no architecture option that --init refuses
  assert "--init" in meta["training_command"] and "--patch-size" not in meta["training_command"]
  clash = CliRunner().invoke(cli, ["train", "--init", start, "--image", img, "--labels", lab,
                                   "--out", tuned, "--patch-size", "32,32,32"])
  assert clash.exit_code != 0 and "leave out --patch-size" in clash.output
  with pytest.raises(IicatsError, match="not the one asked for"):
    train([TrainingVolume("blobs", image=image, labels=labels)], tuned,
          config=ModelConfig(**TINY), iterations=1, progress=False, init=start)
  # what each stage taught adds up along the chain
  assert load_checkpoint(start)[1]["trained_outputs"] == ["affinities"]
  organelles_only = str(tmp_path / "organelles.safetensors")
  train([TrainingVolume("blobs", image=image, labels=None, mitochondria=labels == 1)],
        organelles_only, config=after.config, iterations=1, progress=False, init=start)
  assert load_checkpoint(organelles_only)[1]["trained_outputs"] == ["affinities",
                                                                    "mitochondria"]



def test_window_sums_match_brute_force():
  values = np.random.default_rng(0).random((7, 6, 5))
  sums = window_sums(values, (3, 2, 4))
  brute = np.array([[[values[i:i + 3, j:j + 2, k:k + 4].sum() for k in range(2)]
                     for j in range(5)] for i in range(5)])
  np.testing.assert_allclose(sums, brute)


def test_hard_examples_are_drawn_where_the_model_errs():
  """The error map is the balanced BCE of the affinities: small where they are right, large
  where they are wrong; with hard_fraction 1 every patch holds the one wrong voxel."""
  labels, image = blobs((40, 40, 40), n=5)
  right = affinities_from_labels(labels)[0]
  wrong = right.copy()
  wrong[:, 30, 30, 30] = 1 - wrong[:, 30, 30, 30]
  error = affinity_error_map(wrong, labels)
  assert error.shape == labels.shape and error[30, 30, 30] > 10
  assert np.delete(error.ravel(), np.ravel_multi_index((30, 30, 30), error.shape)).max() < 0.01
  only_there = np.zeros(labels.shape, np.float32)
  only_there[30, 30, 30] = 1
  marker = image.copy()
  marker[30, 30, 30] = 255  # the voxel, recognisable in the sampled image
  vol = TrainingVolume("marked", image=marker, labels=labels)
  sampler = PatchSampler([vol], ModelConfig(**TINY), True, augment=False, hard=[only_there],
                         hard_fraction=1.0)
  for _ in range(5):
    img, _, _ = sampler.sample()
    assert img.max() == pytest.approx((1.0 - 0.5) / 0.25)


def test_fine_tuning_with_hard_examples_records_it(tmp_path, tiny_checkpoint):
  labels, image = blobs((40, 40, 40), n=5)
  out = str(tmp_path / "hard.safetensors")
  meta = train([TrainingVolume("blobs", image=image, labels=labels)], out,
               config=load_checkpoint(tiny_checkpoint)[0].config, iterations=2,
               progress=False, init=tiny_checkpoint, val_fraction=0, hard_fraction=0.5)
  assert meta["hard_example_fraction"] == 0.5


def test_focus_labels_draw_patches_where_they_lie(tmp_path):
  """--focus-labels: with fraction 1 every patch holds voxels of the chosen label (here one
  small blob, marked in the image); the checkpoint records the labels and the fraction; ids
  that no training label layer holds, or that are not ids, are refused before training."""
  labels, image = blobs((40, 40, 40), n=5)
  labels[:] = np.where(labels == 3, 0, labels)
  labels[30:33, 30:33, 30:33] = 99
  marker = image.copy()
  marker[labels == 99] = 255
  vol = TrainingVolume("marked", image=marker, labels=labels)
  sampler = PatchSampler([vol], ModelConfig(**TINY), True, augment=False,
                         focus=[(labels == 99).astype(np.float32)], focus_fraction=1.0)
  for _ in range(5):
    img, _, _ = sampler.sample()
    assert img.max() == pytest.approx((1.0 - 0.5) / 0.25)
  img_path = "file://" + str(tmp_path / "img")
  lab_path = "file://" + str(tmp_path / "lab")
  import_volume(marker, img_path, "image", (10, 10, 10))
  import_volume(labels, lab_path, "segmentation", (10, 10, 10))
  out = str(tmp_path / "focus.safetensors")
  base = ["train", "--image", img_path, "--labels", lab_path, "--out", out, "--iterations",
          "1", "--patch-size", "16,16,16", "--val-fraction", "0"]
  result = CliRunner().invoke(cli, base + ["--focus-labels", "99", "--focus-fraction", "0.5"])
  assert result.exit_code == 0, result.output
  meta = load_checkpoint(out)[1]
  assert meta["focus"] == {"labels": [99], "fraction": 0.5}
  assert "--focus-labels 99" in meta["training_command"]
  missing = CliRunner().invoke(cli, base + ["--focus-labels", "12345"])
  assert missing.exit_code != 0 and "none of these labels" in missing.output
  garbled = CliRunner().invoke(cli, base + ["--focus-labels", "glia"])
  assert garbled.exit_code != 0 and "--focus-labels" in garbled.output
  plain = CliRunner().invoke(cli, base)
  assert plain.exit_code == 0 and load_checkpoint(out)[1]["focus"] is None


def test_diverged_training_stops_and_a_checkpoint_with_nan_weights_is_refused(tmp_path):
  """A learning rate that blows the loss up (to NaN, or far above its lowest) stops training
  with one line (no checkpoint of NaN or useless weights), and a checkpoint that holds NaN
  weights is refused where it is loaded."""
  from iicats_cv.model import UNet3D, save_checkpoint
  labels, image = blobs((40, 40, 40), n=5)
  vol = TrainingVolume("blobs", image=image, labels=labels)
  out = tmp_path / "nan.safetensors"
  for lr, message in ((1e30, "the loss (is (nan|inf)|rose to)"), (1000, "the loss rose to")):
    # 1000: 0.73 to 48 in two iterations, a finite loss that took a few more to overflow
    with pytest.raises(IicatsError, match=f"training diverged: {message} .*lower --lr"):
      train([vol], str(out), config=ModelConfig(**TINY), iterations=5, lr=lr,
            progress=False, val_fraction=0)
    assert not out.exists()
  model = UNet3D(ModelConfig(**TINY))
  with torch.no_grad():
    model.head.bias.fill_(float("nan"))
  save_checkpoint(str(out), model, {})
  with pytest.raises(IicatsError, match="1 weight tensor.* hold NaN or inf .*head.bias"):
    load_checkpoint(str(out))


def test_train_checks_its_options_and_inputs_before_training(tmp_path):
  """Mistakes that used to surface after training (an --out folder that does not exist, a
  folder as --out, a shipped model's name) or as tracebacks (float or empty labels, no
  labels at all, a resume state of another model) are one line each, before any work."""
  _, labels, img, lab = _blob_layers(tmp_path)
  from cloudvolume import CloudVolume
  floats = "file://" + str(tmp_path / "floats")
  info = CloudVolume.create_new_info(1, "image", "float32", "raw", [10, 10, 10], [0, 0, 0],
                                     labels.shape)
  layer = CloudVolume(floats, info=info)
  layer.commit_info()
  layer[:, :, :] = labels.astype(np.float32)
  empty = "file://" + str(tmp_path / "empty")
  import_volume(np.zeros_like(labels), empty, "segmentation", (10, 10, 10))
  (tmp_path / "folder").mkdir()
  out = str(tmp_path / "m.safetensors")
  base = ["train", "--image", img, "--iterations", "1", "--patch-size", "16,16,16"]
  cases = [
    (["--labels", lab, "--out", str(tmp_path / "nowhere" / "m.safetensors")], "no such folder"),
    (["--labels", lab, "--out", str(tmp_path / "folder")], "is a folder"),
    (["--labels", lab, "--out", "default"], "means the shipped model"),
    (["--labels", lab, "--out", out, "--iterations", "0"], "'--iterations'"),
    (["--labels", floats, "--out", out], "an image layer of float32; neuron labels are a"),
    (["--labels", empty, "--out", out], "no labelled voxel"),
    (["--labels", "none", "--out", out], "nothing to learn from"),
  ]
  for args, message in cases:
    result = CliRunner().invoke(cli, base + args)
    assert result.exit_code != 0 and message in result.output, (args, result.output)
    assert not (tmp_path / "m.safetensors").exists()
  (tmp_path / "m.safetensors.state").write_bytes(b"")
  result = CliRunner().invoke(cli, base + ["--labels", lab, "--out", out, "--resume"])
  assert result.exit_code != 0 and "is not a training state of this model" in result.output
