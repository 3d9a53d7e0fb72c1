"""The shipped models by name, and the ssTEM model's organelles on held-out real sections."""
import numpy as np

from iicats_cv.inference import predict_volume
from iicats_cv.model import ORGANELLE_CHANNELS, SHIPPED_MODELS, load_checkpoint
from conftest import shared_file


def test_shipped_models_load_by_name():
  for name in SHIPPED_MODELS:
    model, meta = load_checkpoint(name)
    assert meta["training_command"].startswith("iicats train")
  vnc = load_checkpoint("vnc")[0].config
  assert all(step[2] == 1 for step in vnc.downsample)  # anisotropic: never pools z
  assert vnc.resolution[2] > 5 * vnc.resolution[0]


def test_vnc_model_finds_mitochondria_on_held_out_sections():
  """Sections 12-19 were never trained on (scripts/train_vnc_model.sh uses 0-11)."""
  data = np.load(shared_file("vnc_sstem_stack1.npz"))
  crop = (slice(12, 20), slice(0, 384), slice(0, 384))   # (z, y, x)
  image = np.ascontiguousarray(data["image"][crop].transpose(2, 1, 0))
  truth = data["mitochondria"][crop].transpose(2, 1, 0)
  model, meta = load_checkpoint("vnc")
  assert [v["shape_xyz"][2] for v in meta["training_data"]] == [12]
  probabilities = predict_volume(model, image)
  predicted = probabilities[3 + ORGANELLE_CHANNELS.index("mitochondria")] > 0.5
  dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
  assert dice >= 0.83  # 0.892 with the shipped model
