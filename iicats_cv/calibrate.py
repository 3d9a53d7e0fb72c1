"""A model's operating point, chosen on labelled data it trained on (never the evaluation's).

The settings that turn a model's probabilities into a segmentation are properties of the model:
a retrained network moves the agglomeration threshold at which its mean boundary affinity
splits and merges best (from 0.45 to 0.4 between two training stages of the shipped default
model), and the class-balanced loss pushes rare organelles' probabilities
up, so p > 0.5 over-predicts them. `iicats calibrate` scores every candidate on a labelled
volume and records the best in the checkpoint's metadata as

  "operating_point": {"agglomeration": {"threshold", "quantile", "constraints", "arand",
                                         "voi_split", "voi_merge"},
                      "organelle_thresholds": {"nucleus", "mitochondria", "synapse"},
                      "organelle_dice": {...}, "calibration": {"command", "image",
                                                               "voxels", ...},
                      "organelle_calibration": {...}, "agglomeration_calibration": {...}}

("calibration" is the latest run; each part keeps the run that chose it, since a later run
that calibrates only one part leaves the other as it was) which `iicats pipeline` then uses
wherever its own options leave a setting out.
"""
from __future__ import annotations

import fastremap
import numpy as np
from tqdm import tqdm

from .agglomerate import AgglomerationParams, agglomerate
from .edge_scorer import edge_features, same_neuron_edges, train_edge_scorer
from .errors import IicatsError
from .metrics import adapted_rand_error, dice, voi
from .model import ORGANELLE_CHANNELS
from .rag import block_rag, merge_rags
from .watershed import fragments

AGGLOMERATION_THRESHOLDS = tuple(round(0.3 + 0.05 * k, 2) for k in range(9))  # 0.3 ... 0.7
STATISTICS = {"mean": None, "q50": 0.5, "q75": 0.75}
EVIDENCE = ((), ("nucleus",), ("nucleus", "mitochondria"),
            ("nucleus", "synapse", "mitochondria"))
ORGANELLE_CUTS = tuple(round(0.3 + 0.05 * k, 2) for k in range(14))  # 0.3 ... 0.95
DEFAULT_AGGLOMERATION = {"threshold": 0.5, "quantile": None,
                         "constraints": ["nucleus", "synapse", "mitochondria"],
                         "min_segment_voxels": 0, "learned": False, "interior_bonus": 0.0}
MIN_SEGMENT_VOXELS = (0, 250, 500, 1000, 2000, 4000)
# AgglomerationParams.interior_bonus candidates. On the FIB training half 0.25 beat the best
# setting without it by 0.0027 ARAND, under the margin below (docs/MEASUREMENTS.md)
INTERIOR_BONUSES = (0.0, 0.25, 0.5)
# a learned edge probability: 0.5 is its natural cut, and merges above 0.8 are near certain
SCORER_THRESHOLDS = tuple(round(0.3 + 0.05 * k, 2) for k in range(11))  # 0.3 ... 0.8
# a dust cleanup may cost at most this much ARAND: it is there for the split VOI of many tiny
# segments, not to trade merges for splits
CLEANUP_ARAND_TOLERANCE = 0.005
# the mitochondria hint raises merge scores: unlike a cannot-link it adds merges, so a setting
# that uses it must beat the best without it by this much ARAND on the labelled volume. On the
# FIB training half the hint won by 0.0007 (within the noise of one volume) and, on the
# held-out half, joined two neurons through glia (docs/MEASUREMENTS.md). The interior bonus
# raises merge scores too, and must clear the same margin (each counts once)
MUST_LINK_ARAND_MARGIN = 0.005


def score_agglomeration(affinities: np.ndarray, organelles: np.ndarray, labels: np.ndarray,
                        resolution, thresholds=AGGLOMERATION_THRESHOLDS,
                        organelle_cuts=(0.5, 0.5, 0.5), progress: bool = False) -> list[dict]:
  """ARAND and VOI of every agglomeration setting over a threshold sweep, best first.

  affinities: float32 (3, X, Y, Z) x, y, z affinities in [0, 1]; organelles: float32
  (3, X, Y, Z) nucleus, mitochondria, synapse probabilities; labels: integer (X, Y, Z) ground
  truth (0 ignored); resolution: nm (x, y, z); organelle_cuts: the nucleus, mitochondria,
  synapse probability cuts the RAG's evidence uses; progress: a tqdm bar. Fragments, RAG and
  agglomeration are the pipeline's own functions on the whole volume (one block). Each row:
  {"quantile" (None = mean), "constraints" (list), "interior_bonus", "threshold", "arand",
  "voi_split", "voi_merge"}; sorted by setting_rank. The best
  row then also gets "min_segment_voxels": of MIN_SEGMENT_VOXELS, the dust cleanup with the
  lowest VOI among those within CLEANUP_ARAND_TOLERANCE of its ARAND, and "cleanup": the
  scores of each ({"min_segment_voxels", "arand", "voi_split", "voi_merge"}).
  """
  frags = fragments(affinities, resolution)
  # one RAG for every setting: mean agglomeration ignores the histograms quantiles need
  rag = merge_rags([block_rag(frags, affinities, organelles, (0, 0, 0), histogram=True,
                              organelle_threshold=list(organelle_cuts))])
  rows = []
  settings = [(q, e, b) for q in STATISTICS.values() for e in EVIDENCE for b in INTERIOR_BONUSES]
  for quantile, evidence, bonus in tqdm(settings, desc="agglomeration settings",
                                        disable=not progress):
    result = agglomerate(rag, _setting(evidence, min(thresholds), quantile=quantile,
                                       interior_bonus=bonus),
                         sweep_thresholds=thresholds)
    for threshold, table in result.sweep.items():
      rows.append({"quantile": quantile, "constraints": list(evidence),
                   "interior_bonus": bonus, "threshold": threshold,
                   **_table_scores(frags, labels, result.fragment_ids, table)})
  # on a tie, more evidence: a constraint that costs nothing on the labelled data still
  # guards against the merges it exists for (two nuclei, two synapse partners)
  rows.sort(key=setting_rank)
  best = rows[0]
  cleanups = []
  for size in MIN_SEGMENT_VOXELS:
    result = agglomerate(rag, _setting(best["constraints"], best["threshold"],
                                       quantile=best["quantile"], min_segment_voxels=size,
                                       interior_bonus=best["interior_bonus"]))
    cleanups.append({"min_segment_voxels": size,
                     **_table_scores(frags, labels, result.fragment_ids, result.segment_ids)})
  best["min_segment_voxels"] = _choose_cleanup(best["arand"], cleanups)
  best["cleanup"] = cleanups
  return rows


def setting_rank(row: dict) -> tuple:
  """Sort key of a scored setting, best first: ARAND (plus MUST_LINK_ARAND_MARGIN for each of
  the mitochondria hint and an interior bonus it uses), then VOI split + merge, then the most
  evidence."""
  raises = ("mitochondria" in row["constraints"]) + bool(row.get("interior_bonus"))
  return (row["arand"] + MUST_LINK_ARAND_MARGIN * raises,
          row["voi_split"] + row["voi_merge"], -len(row["constraints"]))


def _setting(evidence, threshold, quantile=None, min_segment_voxels=0, edge_scorer=None,
             interior_bonus=0.0):
  """AgglomerationParams of a calibration candidate: no evidence means no constraints."""
  return AgglomerationParams(threshold=threshold, quantile=quantile,
                             use_constraints=bool(evidence),
                             constraints=tuple(evidence) or DEFAULT_AGGLOMERATION["constraints"],
                             min_segment_voxels=min_segment_voxels, edge_scorer=edge_scorer,
                             interior_bonus=interior_bonus)


def _table_scores(frags, labels, fragment_ids, table) -> dict:
  seg = fastremap.remap(frags, dict(zip(fragment_ids.tolist(), table.tolist())))
  split, merge = voi(seg, labels)
  return {"arand": adapted_rand_error(seg, labels), "voi_split": split, "voi_merge": merge}


def _choose_cleanup(arand: float, cleanups: list) -> int:
  """Of the scored dust cleanups ({"min_segment_voxels", "arand", "voi_split", "voi_merge"}),
  the size with the lowest VOI among those within CLEANUP_ARAND_TOLERANCE of `arand`."""
  allowed = [c for c in cleanups if c["arand"] <= arand + CLEANUP_ARAND_TOLERANCE]
  return min(allowed, key=lambda c: c["voi_split"] + c["voi_merge"])["min_segment_voxels"]


def _halves(*arrays):
  """Each (…, X, Y, Z) array cut in two along z: [(first halves), (second halves)]."""
  middle = arrays[0].shape[-1] // 2
  return [tuple(a[..., :middle] for a in arrays), tuple(a[..., middle:] for a in arrays)]


def _scorer_rag(image, affinities, organelles, resolution, organelle_cuts):
  frags = fragments(affinities, resolution)
  rag = merge_rags([block_rag(frags, affinities, organelles, (0, 0, 0), histogram=True,
                              organelle_threshold=list(organelle_cuts), image=image)])
  return frags, rag


def _mean_scores(rows: list) -> dict:
  return {key: float(np.mean([r[key] for r in rows])) for key in ("arand", "voi_split",
                                                                  "voi_merge")}


def calibrate_edge_scorer(image: np.ndarray, affinities: np.ndarray, organelles: np.ndarray,
                          labels: np.ndarray, resolution, classic: dict,
                          thresholds=SCORER_THRESHOLDS, organelle_cuts=(0.5, 0.5, 0.5),
                          progress: bool = False) -> dict:
  """Train a learned edge scorer (edge_scorer) on a labelled volume and choose its threshold
  without scoring it on the edges it learnt from: the volume is cut in two along z, a scorer
  trained on each half agglomerates the other, and the threshold (then the dust cleanup, as
  score_agglomeration chooses it) with the lowest ARAND (then VOI) over both halves wins. The
  `classic` setting (score_agglomeration's best row) is scored on the same halves, and the
  scorer is `used` only where it beats it there. The returned scorer is trained on the whole
  volume.

  image: uint8 (X, Y, Z); affinities, organelles: float32 (3, X, Y, Z); labels: integer
  (X, Y, Z) ground truth. Returns {"scorer", "used", "setting": {"threshold",
  "constraints", "min_segment_voxels", "arand", "voi_split", "voi_merge"} (means over the
  halves), "classic_on_halves": {...}}.
  """
  if image.shape[-1] < 2:
    raise IicatsError(f"calibration region {image.shape}: the learned edge scorer needs at "
                      "least 2 sections to cut it in two along z (--no-edge-scorer skips it)")
  constraints = classic["constraints"]
  halves = []
  for part in tqdm(_halves(image, affinities, organelles, labels), desc="edge scorer halves",
                   disable=not progress):
    frags, rag = _scorer_rag(*part[:3], resolution, organelle_cuts)
    halves.append((frags, rag, part[3]))
  per_threshold = {t: [] for t in thresholds}
  scorers, classic_rows = [], []
  for k, (frags, rag, truth) in enumerate(halves):
    other_frags, other_rag, other_truth = halves[1 - k]
    scorers.append(train_edge_scorer(edge_features(other_rag),
                                     same_neuron_edges(other_frags, other_truth, other_rag),
                                     other_rag["count"]))
    result = agglomerate(rag, _setting(constraints, min(thresholds), edge_scorer=scorers[k]),
                         sweep_thresholds=thresholds)
    for t, table in result.sweep.items():
      per_threshold[t].append(_table_scores(frags, truth, result.fragment_ids, table))
    result = agglomerate(rag, _setting(constraints, classic["threshold"],
                                       quantile=classic.get("quantile"),
                                       min_segment_voxels=classic.get("min_segment_voxels", 0),
                                       interior_bonus=classic.get("interior_bonus", 0.0)))
    classic_rows.append(_table_scores(frags, truth, result.fragment_ids, result.segment_ids))
  best, threshold = min(((_mean_scores(rows), t) for t, rows in per_threshold.items()),
                        key=lambda r: (r[0]["arand"], r[0]["voi_split"] + r[0]["voi_merge"]))
  cleanups = []
  for size in MIN_SEGMENT_VOXELS:
    rows = []
    for (frags, rag, truth), scorer in zip(halves, scorers):
      result = agglomerate(rag, _setting(constraints, threshold, min_segment_voxels=size,
                                         edge_scorer=scorer))
      rows.append(_table_scores(frags, truth, result.fragment_ids, result.segment_ids))
    cleanups.append({"min_segment_voxels": size, **_mean_scores(rows)})
  size = _choose_cleanup(best["arand"], cleanups)
  chosen = {"threshold": threshold, "quantile": None, "constraints": list(constraints),
            "learned": True, **next(c for c in cleanups if c["min_segment_voxels"] == size)}
  classic_mean = _mean_scores(classic_rows)
  frags, rag = _scorer_rag(image, affinities, organelles, resolution, organelle_cuts)
  final = train_edge_scorer(edge_features(rag), same_neuron_edges(frags, labels, rag),
                            rag["count"])
  return {"scorer": final, "setting": chosen, "classic_on_halves": classic_mean,
          "used": (chosen["arand"], chosen["voi_split"] + chosen["voi_merge"])
          < (classic_mean["arand"], classic_mean["voi_split"] + classic_mean["voi_merge"])}


def choose_organelle_thresholds(organelles: np.ndarray, masks: dict,
                                cuts=ORGANELLE_CUTS) -> dict:
  """The probability cut with the best voxel Dice, per organelle that has a mask.

  organelles: float32 (3, X, Y, Z) nucleus, mitochondria, synapse probabilities; masks:
  {channel name (ORGANELLE_CHANNELS): bool (X, Y, Z)}. Returns {name: {"threshold", "dice",
  "dice_at_0.5"}}; ties go to the cut nearest 0.5.
  """
  chosen = {}
  for name, mask in masks.items():
    probability = organelles[ORGANELLE_CHANNELS.index(name)]
    mask = np.asarray(mask, bool)
    scores = {cut: dice(probability > cut, mask) for cut in cuts}
    best = max(scores, key=lambda cut: (scores[cut], -abs(cut - 0.5)))
    chosen[name] = {"threshold": best, "dice": scores[best],
                    "dice_at_0.5": dice(probability > 0.5, mask)}
  return chosen


def setting_text(setting: dict) -> str:
  """An agglomeration setting ({"quantile", "constraints", "threshold"}, and optionally
  "nucleus_fraction", "min_segment_voxels", "learned", "edge_scorer" or "baseline_threshold")
  in words."""
  quantile = setting.get("quantile")
  if setting.get("learned") or setting.get("edge_scorer"):
    statistic = "learned edge probability"
  else:
    statistic = "mean affinity" if quantile is None else f"{quantile:g}-quantile affinity"
  evidence = ",".join(setting["constraints"]) or "no evidence"
  fraction = setting.get("nucleus_fraction", AgglomerationParams.nucleus_fraction)
  if "nucleus" in setting["constraints"] and fraction != AgglomerationParams.nucleus_fraction:
    evidence += f" (nuclear fragments ≥ {fraction:.0%} nucleus)"
  cleanup = setting.get("min_segment_voxels") or 0
  dust = f", segments < {cleanup} voxels joined to a neighbour" if cleanup else ""
  bonus = setting.get("interior_bonus") or 0
  relative = f", interior bonus {bonus:g}" if bonus else ""
  baseline = setting.get("baseline_threshold")
  own = ("" if baseline is None or baseline == setting["threshold"]
         else f" (the unconstrained baseline at t={baseline:.2f})")
  return f"{statistic} + {evidence} at t={setting['threshold']:.2f}{relative}{dust}{own}"


def agglomeration_settings(metadata: dict) -> dict:
  """{"threshold", "quantile", "constraints", "min_segment_voxels", "learned",
  "interior_bonus"} of a checkpoint's operating point, or the uncalibrated defaults (mean
  affinity at 0.5, every kind of evidence, no dust cleanup, no learned edge scorer, no
  interior bonus)."""
  chosen = (metadata.get("operating_point") or {}).get("agglomeration") or {}
  return {key: chosen.get(key, default) for key, default in DEFAULT_AGGLOMERATION.items()}


def organelle_thresholds(metadata: dict) -> list[float]:
  """Probability cuts (nucleus, mitochondria, synapse) of a checkpoint's operating point;
  0.5 for any organelle it was not calibrated on."""
  chosen = (metadata.get("operating_point") or {}).get("organelle_thresholds") or {}
  return [float(chosen.get(name, 0.5)) for name in ORGANELLE_CHANNELS]
