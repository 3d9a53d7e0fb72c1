"""Shared fixtures: small checkpoints, layers in tmp folders, the shared real data."""
import os

import numpy as np
import pytest
import torch

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def shared_file(name):
  """Path of a file in ../shared/data, or skip the test with the reason."""
  path = os.path.join(SHARED_DATA, name)
  if not os.path.exists(path):
    pytest.skip(f"../shared/data/{name} is not beside this checkout (real-data test)")
  return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
  """A randomly initialised small network saved in the checkpoint format."""
  from iicats_cv.model import ModelConfig, UNet3D, save_checkpoint
  torch.manual_seed(0)
  config = ModelConfig(width=(4, 8), downsample=((2, 2, 2),), patch_size=(16, 16, 16))
  model = UNet3D(config)
  path = str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
  save_checkpoint(path, model, {"note": "random weights for tests"})
  return path


@pytest.fixture
def cloudpath(tmp_path):
  """A function giving file:// cloudpaths under this test's tmp folder."""
  return lambda name: "file://" + str(tmp_path / name)


def blobs(shape=(48, 48, 32), n=6, seed=0):
  """Dense labels of n Voronoi cells and an EM-like image (dark boundaries), (x, y, z)."""
  rng = np.random.default_rng(seed)
  centres = rng.uniform(0, 1, (n, 3)) * np.array(shape)
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
  dist = ((grid[..., None, :] - centres) ** 2).sum(-1)
  labels = (np.argmin(dist, -1) + 1).astype(np.uint32)
  boundary = np.zeros(shape, bool)
  for axis in range(3):
    diff = np.diff(labels, axis=axis) != 0
    sl = [slice(None)] * 3
    sl[axis] = slice(1, None)
    boundary[tuple(sl)] |= diff
  image = np.where(boundary, 60, 170).astype(np.float32) + rng.normal(0, 8, shape)
  return labels, np.clip(image, 0, 255).astype(np.uint8)


def noisy_affinities(labels, seed=0, noise=0.1, smooth=0.0):
  """GT affinities scaled to [0.1, 0.9] plus Gaussian noise of std `noise`, spatially
  correlated over `smooth` voxels (sigma) as a network's errors are."""
  from scipy import ndimage
  from iicats_cv.train import affinities_from_labels
  affs, _ = affinities_from_labels(labels)
  rng = np.random.default_rng(seed)
  error = rng.normal(0, 1, affs.shape)
  if smooth:
    error = ndimage.gaussian_filter(error, (0, smooth, smooth, smooth))
  error *= noise / error.std()
  return np.clip(affs * 0.8 + 0.1 + error, 0, 1).astype(np.float32)


@pytest.fixture(scope="session")
def synthetic_demo(tmp_path_factory):
  """`iicats demo --dataset synthetic` through an fq:// queue with 64³ tasks, run once per
  session: (out folder, summary dict, CLI output, queue url)."""
  import json
  from click.testing import CliRunner
  from iicats_cv.cli import cli
  root = tmp_path_factory.mktemp("demo")
  out = root / "run"
  summary_path = root / "summary.json"
  queue = "fq://" + str(root / "queue")
  result = CliRunner().invoke(cli, [
    "demo", "--dataset", "synthetic", "--out", str(out), "--queue", queue, "-p", "1",
    "--task-shape", "64,64,64", "--json", str(summary_path)])
  assert result.exit_code == 0, result.output
  with open(summary_path) as fh:
    return out, json.load(fh), result.output, queue
