"""Watershed + agglomeration of this project vs waterz on the same affinities.

"ours" is the unconstrained mean-affinity agglomeration (the same algorithm family as waterz);
its ARAND is also given with the II-CATS evidence (nucleus + mitochondria) and, unconstrained,
on the 75th percentile of boundary affinities instead of the mean. Best thresholds are
chosen on the same crop, for both methods alike.
The affinities are the model's prediction on the held-out FIB crop shipped with the package
(z >= 150 of the FlyEM medulla cube). Both methods run in this process on the same machine;
the ratio is this project's voxels/s over waterz's at each method's best threshold.
The affinities themselves are scored too: average precision against the affinities derived
from the ground-truth neurons (affinity_ap; boundary_ap ranks the rare boundaries).
The fragment oracle gives each of this project's fragments its majority ground-truth neuron:
the best any agglomeration of these fragments can score (oracle_*). Where the checkpoint has
a learned edge scorer (`iicats calibrate`), its agglomeration is scored too (learned_*): at
the best threshold on the crop, as the others, and at its calibrated one (chosen on the
training half, without the dust cleanup).

  python benchmarks/segmentation.py [--checkpoint CKPT] [--json OUT]
"""
import argparse
import time

import fastremap
import numpy as np
import torch

from iicats_cv.agglomerate import AgglomerationParams, agglomerate
from iicats_cv.calibrate import organelle_thresholds
from iicats_cv.datasets import load_fib_crop
from iicats_cv.edge_scorer import majority_labels
from iicats_cv.inference import predict_volume
from iicats_cv.metrics import adapted_rand_error, affinity_average_precision, voi
from iicats_cv.model import checkpoint_metadata, load_checkpoint
from iicats_cv.rag import block_rag, merge_rags
from iicats_cv.train import affinities_from_labels
from iicats_cv.watershed import fragments
from bench_report import report

THRESHOLDS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def predict(checkpoint):
  image, labels, resolution = load_fib_crop()
  probs = predict_volume(load_checkpoint(checkpoint)[0], image)
  return image, probs[:3], probs[3:], labels, resolution


def learned(image, affs, organelles, resolution, scorer, cuts):
  """{threshold: segmentation} of the scorer's agglomeration with its calibrated evidence,
  over THRESHOLDS and its calibrated threshold."""
  setting = scorer["setting"]
  frags = fragments(affs, resolution)
  rag = merge_rags([block_rag(frags, affs, organelles, (0, 0, 0), histogram=True, image=image,
                              organelle_threshold=cuts)])
  thresholds = sorted(set(THRESHOLDS) | {setting["threshold"]})
  result = agglomerate(rag, AgglomerationParams(
    threshold=min(thresholds), use_constraints=bool(setting["constraints"]),
    constraints=tuple(setting["constraints"]) or AgglomerationParams.constraints,
    edge_scorer=scorer), sweep_thresholds=thresholds)
  return {t: fastremap.remap(frags, dict(zip(result.fragment_ids.tolist(), table.tolist())))
          for t, table in result.sweep.items()}


def ours(affs, organelles, resolution, params, cuts=(0.5, 0.5, 0.5)):
  started = time.perf_counter()
  frags = fragments(affs, resolution)
  rag = merge_rags([block_rag(frags, affs, organelles, (0, 0, 0),
                              histogram=params.quantile is not None,
                              organelle_threshold=list(cuts))])
  result = agglomerate(rag, params, sweep_thresholds=THRESHOLDS)
  seconds = time.perf_counter() - started
  segs = {t: fastremap.remap(frags, dict(zip(result.fragment_ids.tolist(), table.tolist())))
          for t, table in result.sweep.items()}
  return seconds, segs


def waterz_run(affs):
  import waterz
  # waterz wants (3, z, y, x) with channel 0 = z: reverse channels and axes
  affs_zyx = np.ascontiguousarray(affs[::-1].transpose(0, 3, 2, 1)).astype(np.float32)
  started = time.perf_counter()
  segs = {t: seg.copy() for t, seg in zip(THRESHOLDS, waterz.agglomerate(affs_zyx, THRESHOLDS))}
  seconds = time.perf_counter() - started
  return seconds, {t: s.transpose(2, 1, 0) for t, s in segs.items()}


def fragment_oracle(frags: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """uint64 (X, Y, Z): each fragment relabelled with the ground-truth neuron holding most of
  its voxels (ties: the lowest id)."""
  ids, majority = majority_labels(frags, labels)
  return fastremap.remap(frags.astype(np.uint64), dict(zip(ids.tolist(), majority.tolist())))


def best(segs, labels):
  scored = {t: adapted_rand_error(seg, labels) for t, seg in segs.items()}
  t = min(scored, key=scored.get)
  split, merge = voi(segs[t], labels)
  return t, scored[t], split, merge


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoint", default=None)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  torch.set_num_threads(2)
  image, affs, organelles, labels, resolution = predict(args.checkpoint)
  voxels = labels.size
  precision = affinity_average_precision(affs, *affinities_from_labels(labels))
  ours_s, ours_segs = ours(affs, None, resolution,
                           AgglomerationParams(threshold=0.5, use_constraints=False))
  # II-CATS evidence as the fib demo uses it (the model's synapses are synthetic-only), at
  # the checkpoint's calibrated organelle cuts as the pipeline takes them
  metadata = checkpoint_metadata(args.checkpoint)
  cuts = organelle_thresholds(metadata)
  _, constrained_segs = ours(affs, organelles, resolution, AgglomerationParams(
    threshold=0.5, constraints=("nucleus", "mitochondria")), cuts)
  t_c, arand_c, split_c, merge_c = best(constrained_segs, labels)
  _, quantile_segs = ours(affs, None, resolution, AgglomerationParams(
    threshold=0.5, use_constraints=False, quantile=0.75))
  t_q, arand_q, split_q, merge_q = best(quantile_segs, labels)
  waterz_s, waterz_segs = waterz_run(affs)
  t_ours, arand, split, merge = best(ours_segs, labels)
  t_w, arand_w, split_w, merge_w = best(waterz_segs, labels)
  oracle = fragment_oracle(fragments(affs, resolution), labels)
  split_o, merge_o = voi(oracle, labels)
  out = {
    "voxels": int(voxels), "thresholds": THRESHOLDS, **precision,
    "ours_seconds": round(ours_s, 3), "waterz_seconds": round(waterz_s, 3),
    "ours_vx_per_s": voxels / ours_s, "waterz_vx_per_s": voxels / waterz_s,
    "ratio_vs_waterz": waterz_s / ours_s,
    "arand": arand, "voi_split": split, "voi_merge": merge, "threshold": t_ours,
    "arand_waterz": arand_w, "voi_split_waterz": split_w, "voi_merge_waterz": merge_w,
    "threshold_waterz": t_w,
    "arand_constrained": arand_c, "voi_split_constrained": split_c,
    "voi_merge_constrained": merge_c, "threshold_constrained": t_c,
    "arand_quantile75": arand_q, "voi_split_quantile75": split_q,
    "voi_merge_quantile75": merge_q, "threshold_quantile75": t_q,
    "oracle_arand": adapted_rand_error(oracle, labels), "oracle_voi_split": split_o,
    "oracle_voi_merge": merge_o,
  }
  scorer = (metadata.get("operating_point") or {}).get("edge_scorer")
  learned_text = ""
  if scorer:
    learned_segs = learned(image, affs, organelles, resolution, scorer, cuts)
    t_l, arand_l, split_l, merge_l = best(learned_segs, labels)
    calibrated = scorer["setting"]["threshold"]
    split_cal, merge_cal = voi(learned_segs[calibrated], labels)
    out.update({"arand_learned": arand_l, "voi_split_learned": split_l,
                "voi_merge_learned": merge_l, "threshold_learned": t_l,
                "threshold_learned_calibrated": calibrated,
                "arand_learned_calibrated": adapted_rand_error(learned_segs[calibrated], labels),
                "voi_split_learned_calibrated": split_cal,
                "voi_merge_learned_calibrated": merge_cal})
    learned_text = (f"; learned edge scorer best ARAND {arand_l:.4f}, at its calibrated "
                    f"t={calibrated} {out['arand_learned_calibrated']:.4f} (VOI "
                    f"{split_cal:.3f} / {merge_cal:.3f})")
  report(out, f"ours {voxels / ours_s / 1e6:.2f} Mvx/s vs waterz {voxels / waterz_s / 1e6:.2f} Mvx/s: "
              f"ratio {out['ratio_vs_waterz']:.2f}; best ARAND {arand:.4f} (with nucleus+mito evidence "
              f"{arand_c:.4f}) vs waterz {arand_w:.4f}; affinity AP {precision['affinity_ap']:.4f}, "
              f"boundary AP {precision['boundary_ap']:.4f}; fragment oracle ARAND "
              f"{out['oracle_arand']:.4f}, VOI {split_o:.3f} / {merge_o:.3f}" + learned_text,
              args.json)


if __name__ == "__main__":
  main()
