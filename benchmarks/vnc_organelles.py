"""Mitochondria and synapse voxel Dice of the shipped ssTEM model on held-out VNC sections.

Data: ../shared/data/vnc_sstem_stack1.npz (Drosophila VNC ssTEM, 4.6×4.6×~47 nm, 20 sections
of 896²); the `vnc` model was trained on sections 0-11 only (scripts/train_vnc_model.sh), and
sections 12-19 are scored here: the model's prediction (blended patches, probability above
the checkpoint's calibrated cut, which `iicats calibrate` chose on sections 0-11, since the
class-balanced loss pushes probabilities of rare organelles up; and above 0.5) against the
ground-truth masks, voxel Dice over all eight sections.
Reference, in the same run: the best intensity threshold (dark voxels = organelle, chosen on
sections 0-11, scored on 12-19), the classic baseline for these dark organelles; ratio =
model Dice / threshold Dice.

--tta predicts with test-time augmentation (the mean over the 8 in-plane mirror images).

  python benchmarks/vnc_organelles.py [--checkpoint vnc] [--tta] [--json OUT]
"""
import argparse
import os

import numpy as np
import torch

from iicats_cv.calibrate import organelle_thresholds
from iicats_cv.inference import predict_volume
from iicats_cv.metrics import dice
from iicats_cv.model import ORGANELLE_CHANNELS, load_checkpoint
from bench_report import report

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                    "vnc_sstem_stack1.npz")
HELD_OUT = slice(12, 20)


def best_threshold(image: np.ndarray, truth: np.ndarray) -> int:
  """The intensity threshold t (organelle = image < t) with the best Dice on (image, truth)."""
  return max(range(10, 250, 5), key=lambda t: dice(image < t, truth))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoint", default="vnc")
  parser.add_argument("--data", default=DATA)
  parser.add_argument("--tta", action="store_true", help="test-time augmentation")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model, meta = load_checkpoint(args.checkpoint, device=device)
  data = np.load(args.data)

  def xyz(array):
    return np.ascontiguousarray(np.transpose(array, (2, 1, 0)))

  image = xyz(data["image"])
  probabilities = predict_volume(model, image[..., HELD_OUT], device=device, augment=args.tta)
  out = {"checkpoint": args.checkpoint, "device": device, "test_time_augmentation": args.tta,
         "held_out_sections": [HELD_OUT.start, HELD_OUT.stop - 1],
         "training_command": meta.get("training_command")}
  summary = []
  cuts = organelle_thresholds(meta)
  for name, key in (("mitochondria", "mitochondria"), ("synapse", "synapses")):
    truth = xyz(data[key]).astype(bool)
    c = ORGANELLE_CHANNELS.index(name)
    model_dice = dice(probabilities[3 + c] > cuts[c], truth[..., HELD_OUT])
    half_dice = dice(probabilities[3 + c] > 0.5, truth[..., HELD_OUT])
    threshold = best_threshold(image[..., :12], truth[..., :12])
    reference = dice(image[..., HELD_OUT] < threshold, truth[..., HELD_OUT])
    out[name] = {"dice": model_dice, "probability_cut": cuts[c], "dice_at_0.5": half_dice,
                 "threshold_dice": reference, "intensity_threshold": threshold,
                 "ratio": model_dice / max(reference, 1e-9)}
    summary.append(f"{name} Dice {model_dice:.3f} at p > {cuts[c]:.2f} ({half_dice:.3f} at "
                   f"p > 0.5; intensity threshold {reference:.3f}, ratio "
                   f"{out[name]['ratio']:.2f})")
  report(out, "held-out VNC sections 12-19: " + "; ".join(summary), args.json)


if __name__ == "__main__":
  main()
