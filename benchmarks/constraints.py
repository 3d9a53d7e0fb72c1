"""II-CATS constraints vs unconstrained agglomeration on synthetic tissue dense in nuclei and
synapses: bERL, nERL and the violations left, both of the cannot-links derived from the
organelle channels and of the ground truth (segments holding two nuclei, synapses with both
partners in one segment).

The input isolates the agglomeration from the network: affinities are the ground truth's,
scaled to [0.1, 0.9], plus Gaussian noise correlated over 1.5 voxels (std --noise) that opens
gaps in membranes as a network's errors do; the organelle channels are the ground-truth
nucleus, mitochondria and synapse masks. Both agglomerations run on the same fragments and RAG
over the same thresholds and are scored against the generator's skeletons, nuclei and synapses.
The reference is the unconstrained baseline of the same run: ratio = constrained bERL /
baseline bERL, each at its best threshold.

A fragment counts as nuclear from --nucleus-fraction (default 0.1, the synthetic demo's
setting: these nuclei span several fragments) on; the pipeline's default for FIB (0.5) keeps
the FIB model's false nucleus blobs out and finds few of these nuclei.

The watershed uses the synapse channel as the pipeline does when synapse evidence is on:
--synapse-boundary (default watershed.SYNAPSE_BOUNDARY) is added to the boundary map on the
synapse voxels, so that faded clefts still part the fragments. Both agglomerations run on
those fragments; the unconstrained agglomeration is also run on the fragments of the plain
watershed (no organelle evidence anywhere), reported as baseline_plain_watershed and
ratio_vs_plain_watershed.

With --oracle-fragments all the watershed fragments are cut along the ground-truth neurons, so
no fragment holds two cells: what is left is the agglomeration's own effect. With
--oracle-fragments synapse only the fragments that hold both partners of a ground-truth synapse
are cut: the bound for a watershed that keeps every faded cleft apart.

With --skeleton-fraction F only a seeded random F of the cells keep their skeleton, as in real
ground truth, where skeletons trace a subset of the cells while nuclei and synapses are
annotated for all: merges with unskeletonised cells are then invisible to ERL, and only bERL's
nucleus and synapse rules see them.

With --bounds the same fragments are also agglomerated with ground-truth evidence, each at its
best threshold, as ratios to the same baseline: cannot-links from the ground-truth nuclei and
synapse partners only (the one-nucleus and partner rules with perfect detection; the
derived evidence also keeps a bouton apart from its other neighbours), cannot-links between
every two cells, and a perfect agglomeration (each fragment given its majority ground-truth
neuron, scored as it is).

With --evidence KIND,... the constrained agglomeration uses only those kinds of evidence
(nucleus, synapse, mitochondria): what each contributes. Violations are still judged with
every kind.

  python benchmarks/constraints.py [--seed 0] [--noise 0.2] [--cells 40] [--nucleus-fraction 0.1]
                                   [--evidence nucleus,synapse,mitochondria]
                                   [--oracle-fragments {all,synapse}]
                                   [--skeleton-fraction 1.0] [--synapse-boundary 0.2]
                                   [--bounds] [--json OUT]
  python benchmarks/constraints.py --seeds 0-11 [-p 2] [...]   (per seed, then the means)
"""
import argparse
import dataclasses
import multiprocessing
import os
import tempfile
from functools import partial

import cc3d
import fastremap
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from iicats_cv.agglomerate import (AgglomerationParams, Constraints, agglomerate,
                                   count_violations, derive_constraints)
from iicats_cv.cli import DEMO_AGGLOMERATION
from iicats_cv.datasets import write_ground_truth_files
from iicats_cv.edge_scorer import majority_labels
from iicats_cv.evaluate import evaluate_tables, lookup_segments
from iicats_cv.metrics import concatenate_skeletons, merging_segments, synapse_violations
from iicats_cv.rag import block_rag, merge_rags
from iicats_cv.synthetic import make_synthetic_volume
from iicats_cv.train import affinities_from_labels
from iicats_cv.volume_io import import_volume
from iicats_cv.watershed import SYNAPSE_BOUNDARY, fragments
from bench_report import report

# bERL moves by up to 25% between neighbouring thresholds here, so a coarser grid lets the
# luck of where it falls decide the ratio
THRESHOLDS = [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]
SYNTHETIC_NUCLEUS_FRACTION = DEMO_AGGLOMERATION["synthetic"]["nucleus_fraction"]


def degraded_affinities(vol, noise, seed, gap_radius=3, gap_affinity=0.8) -> np.ndarray:
  """float32 (3, X, Y, Z): GT affinities in [0.1, 0.9] plus smooth noise of std `noise`, and
  the membrane between synaptic partners faded to `gap_affinity` within gap_radius voxels of
  each synapse (a dark, dense cleft is where networks merge partner neurons)."""
  affs, _ = affinities_from_labels(vol.neurons)
  affs = affs * 0.8 + 0.1
  res = np.asarray(vol.resolution)
  grid = np.indices((2 * gap_radius + 1,) * 3).reshape(3, -1).T - gap_radius
  ball = grid[(grid ** 2).sum(1) <= gap_radius ** 2]
  for pre, post in vol.synapses_nm:
    centre = np.floor((pre + post) / 2 / res).astype(int)
    voxels = centre + ball
    voxels = voxels[((voxels >= 0) & (voxels < vol.shape)).all(1)]
    affs[(slice(None),) + tuple(voxels.T)] = np.maximum(
      affs[(slice(None),) + tuple(voxels.T)], gap_affinity)
  error = ndimage.gaussian_filter(np.random.default_rng(seed).normal(0, 1, affs.shape),
                                  (0, 1.5, 1.5, 1.5))
  return np.clip(affs + error * noise / error.std(), 0, 1).astype(np.float32)


def score(rag, frag_ids, supervoxels, gt, params, evidence, constraints=None):
  """{threshold: {erl, berl, nerl, violations}} over THRESHOLDS for one parameter set (and
  `constraints` instead of the RAG's, when given); the violations are judged with `evidence`
  (parameters using every kind of evidence)."""
  result = agglomerate(rag, params, sweep_thresholds=THRESHOLDS, constraints=constraints)
  rows = evaluate_tables(supervoxels, {t: (frag_ids, table) for t, table in result.sweep.items()},
                         gt["gt_skeletons"], gt["nuclei"], gt["synapses"])
  for row in rows:
    row["violations"] = count_violations(rag, result.sweep[row["threshold"]], evidence)
  return {row["threshold"]: row for row in rows}


def best_row(rows: dict) -> dict:
  return max(rows.values(), key=lambda r: r["berl"])


def ground_truth_constraints(frags: np.ndarray, rag: dict, vol, majority: tuple) -> dict:
  """Constraints from the ground truth, over the RAG's fragments (uint64 (X, Y, Z) `frags`):
  'organelles': each fragment holding nucleus voxels gets the nucleus with most of them, and
  the fragments holding the pre- and post-synaptic point of a synapse cannot link; 'cells':
  every fragment gets its majority neuron (`majority`: majority_labels(frags, vol.neurons)),
  so no two cells can merge."""
  frag_ids = rag["frag_id"]
  no_mito = np.zeros(len(rag["u"]), bool)
  nuclear_ids, nucleus = majority_labels(frags[vol.nuclei > 0], vol.nuclei[vol.nuclei > 0])
  nuclei = np.zeros(len(frag_ids), np.int64)
  nuclei[np.searchsorted(frag_ids, nuclear_ids)] = nucleus.astype(np.int64)
  partners = np.searchsorted(frag_ids, synapse_partner_fragments(frags, vol)).astype(np.int64)
  cannot = partners[partners[:, 0] != partners[:, 1]]
  ids, neuron = majority
  cells = np.zeros(len(frag_ids), np.int64)
  cells[np.searchsorted(frag_ids, ids)] = neuron.astype(np.int64)
  return {"organelles": Constraints(nuclei, cannot, no_mito),
          "cells": Constraints(cells, np.zeros((0, 2), np.int64), no_mito)}


def bounds(frags, rag, supervoxels, gt, vol, evidence, baseline_berl) -> dict:
  """{name: {berl, threshold, ratio}}: the ground-truth constraints' agglomerations at their
  best threshold, and the perfect agglomeration ('oracle'), against `baseline_berl`."""
  out = {}
  ids, neuron = majority_labels(frags, vol.neurons)
  for name, constraints in ground_truth_constraints(frags, rag, vol, (ids, neuron)).items():
    row = best_row(score(rag, rag["frag_id"], supervoxels, gt, evidence, evidence, constraints))
    out[name] = {"berl": row["berl"], "threshold": row["threshold"]}
  # fragments outside every neuron keep their own id
  table = np.where(neuron > 0, neuron, ids + np.uint64(neuron.max()) + np.uint64(1))
  row = evaluate_tables(supervoxels, {0: (ids, table)}, gt["gt_skeletons"], gt["nuclei"],
                        gt["synapses"])[0]
  out["oracle"] = {"berl": row["berl"], "threshold": None}
  for row in out.values():
    row["ratio"] = row["berl"] / baseline_berl
  return out


def fragment_errors(supervoxels, vol) -> dict:
  """Errors already in the fragments, which no agglomeration can undo: fragments holding
  nodes of two skeletons, and synapses whose two partners lie in one fragment."""
  flat = concatenate_skeletons(vol.skeletons)
  nodes = lookup_segments(supervoxels, flat.vertices_nm).astype(np.uint64)
  partners = lookup_segments(supervoxels, vol.synapses_nm.reshape(-1, 3)).astype(np.uint64)
  _, _, per_fragment = synapse_violations(partners.reshape(-1, 2))
  return {"merging_fragments": int(len(merging_segments(nodes, flat.node_skeleton)[0])),
          "synapses_within_one_fragment": int(per_fragment.sum()),
          "synapses": int(len(vol.synapses_nm))}


def split_by_ground_truth(frags: np.ndarray, neurons: np.ndarray,
                          only: np.ndarray | None = None) -> np.ndarray:
  """uint64 (X, Y, Z): each fragment (each of the ids `only`, when given) cut into its
  connected pieces within each GT neuron."""
  key = neurons.astype(np.uint64)
  if only is not None:
    key = np.where(np.isin(frags, only), key, np.uint64(0))
  pairs = frags.astype(np.uint64) * np.uint64(int(neurons.max()) + 1) + key
  pieces = cc3d.connected_components(pairs, connectivity=6, out_dtype=np.uint64)
  return fastremap.renumber(pieces, preserve_zero=True)[0].astype(np.uint64)


def synapse_partner_fragments(frags: np.ndarray, vol) -> np.ndarray:
  """uint64 (S, 2): the fragments holding each synapse's pre- and post-synaptic site."""
  voxels = np.floor(vol.synapses_nm.reshape(-1, 3) / np.asarray(vol.resolution)).astype(int)
  return frags[tuple(voxels.T)].reshape(-1, 2)


def fragments_holding_synapses(frags: np.ndarray, vol) -> np.ndarray:
  """Ids of the fragments that hold both the pre- and the post-synaptic site of a synapse."""
  partners = synapse_partner_fragments(frags, vol)
  return np.unique(partners[(partners[:, 0] == partners[:, 1]) & (partners[:, 0] > 0), 0])


def scored_skeletons(skeletons: list, fraction: float, seed: int) -> list:
  """A seeded random `fraction` of `skeletons` (at least one), in their original order."""
  keep = max(1, round(fraction * len(skeletons)))
  chosen = np.random.default_rng(seed).choice(len(skeletons), keep, replace=False)
  return [skeletons[i] for i in sorted(chosen)]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--seeds", default=None,
                      help="FIRST-LAST: one run per seed, then the means (replaces --seed)")
  parser.add_argument("-p", "--processes", type=int, default=2,
                      help="seeds run at once with --seeds")
  parser.add_argument("--noise", type=float, default=0.2)
  parser.add_argument("--gap-affinity", type=float, default=0.55,
                      help="affinity across the membrane at synapses")
  parser.add_argument("--shape", default="192,192,96")
  parser.add_argument("--cells", type=int, default=40,
                      help="nucleated neurons (40 packs the 192×192×96 volume with somata)")
  parser.add_argument("--synapses", type=int, default=600,
                      help="synapses to place (the generator stops when contacts run out)")
  parser.add_argument("--oracle-fragments", choices=("all", "synapse"), default=None,
                      help="cut the fragments along the ground-truth neurons: all of them, or "
                           "only those that hold both partners of a synapse")
  parser.add_argument("--nucleus-fraction", type=float, default=SYNTHETIC_NUCLEUS_FRACTION,
                      help="nucleus share that makes a fragment nuclear; the default is the "
                           "synthetic demo's (nuclei here span several fragments, and it finds "
                           "38-40 of the 40); the pipeline's FIB default "
                           f"({AgglomerationParams.nucleus_fraction}, set to ignore the FIB "
                           "model's false nuclei) finds 3-15")
  parser.add_argument("--evidence", default=",".join(AgglomerationParams.constraints),
                      help="kinds of evidence the constrained agglomeration uses")
  parser.add_argument("--skeleton-fraction", type=float, default=1.0,
                      help="share of the cells whose skeleton is scored (nuclei and synapses "
                           "stay annotated for all cells)")
  parser.add_argument("--synapse-boundary", type=float, default=SYNAPSE_BOUNDARY,
                      help="added to the watershed's boundary map on synapse voxels (0: off)")
  parser.add_argument("--bounds", action="store_true",
                      help="also agglomerate with ground-truth constraints, and score a "
                           "perfect agglomeration of the fragments")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  if set(args.evidence.split(",")) - set(AgglomerationParams.constraints):
    parser.error(f"--evidence must name some of {','.join(AgglomerationParams.constraints)}, "
                 f"got {args.evidence!r}")
  if not 0 < args.skeleton_fraction <= 1:
    parser.error(f"--skeleton-fraction must be in (0, 1], got {args.skeleton_fraction}")
  if args.seeds is None:
    out, summary = run_seed(args, args.seed)
    report(out, summary, args.json)
    return
  try:
    first, _, last = args.seeds.partition("-")
    seeds = list(range(int(first), int(last or first) + 1))
  except ValueError:
    parser.error(f"--seeds must be FIRST-LAST, got {args.seeds!r}")
  runs = {}
  with multiprocessing.Pool(args.processes) as pool:
    for seed, (out, summary) in tqdm(zip(seeds, pool.imap(partial(run_seed, args), seeds)),
                                     total=len(seeds), desc="seeds"):
      runs[seed] = out
      tqdm.write(f"seed {seed}: {summary}")
  report(*summarise_seeds(runs), args.json)


def summarise_seeds(runs: dict) -> tuple[dict, str]:
  """({"seeds": runs, "mean": {...}}, one line) over the runs of several seeds."""
  def mean(key, row=None):
    return float(np.mean([out[row][key] if row else out[key] for out in runs.values()]))
  means = {"ratio": mean("ratio"), "nerl_ratio": mean("nerl_ratio"),
           "berl_constrained": mean("berl", "best_constrained"),
           "berl_baseline": mean("berl", "best_baseline"),
           "merged_synapses": mean("n_merged_synapses", "best_constrained"),
           "merged_synapses_baseline": mean("n_merged_synapses", "best_baseline")}
  ratios = " ".join(f"{out['ratio']:.2f}" for out in runs.values())
  line = (f"{len(runs)} seeds: bERL ratio mean {means['ratio']:.2f} ({ratios}; "
          f"{sum(out['ratio'] >= 1.2 for out in runs.values())} at >= 1.20), nERL ratio mean "
          f"{means['nerl_ratio']:.2f}; merged GT synapses mean {means['merged_synapses']:.1f} "
          f"(baseline {means['merged_synapses_baseline']:.1f})")
  if all("ratio_vs_plain_watershed" in out for out in runs.values()):
    means["ratio_vs_plain_watershed"] = mean("ratio_vs_plain_watershed")
    means["merged_synapses_plain_watershed"] = float(np.mean(
      [out["baseline_plain_watershed"]["n_merged_synapses"] for out in runs.values()]))
    ratios = " ".join(f"{out['ratio_vs_plain_watershed']:.2f}" for out in runs.values())
    line += (f"; against the plain watershed's unconstrained baseline: ratio mean "
             f"{means['ratio_vs_plain_watershed']:.2f} ({ratios}), merged GT synapses mean "
             f"{means['merged_synapses_plain_watershed']:.1f}")
  return {"seeds": runs, "mean": means}, line


def run_seed(args, seed: int) -> tuple[dict, str]:
  """The benchmark on the volume of one seed: (result, one-line summary)."""
  with tempfile.TemporaryDirectory(prefix="iicats-constraints-bench-") as root:
    return _run_seed_in(args, seed, root)


def _run_seed_in(args, seed: int, root: str) -> tuple[dict, str]:
  """run_seed with its layers and ground-truth files under root."""
  shape = tuple(int(v) for v in args.shape.split(","))
  vol = make_synthetic_volume(shape=shape, seed=seed, n_cells=args.cells,
                              n_synapses=args.synapses)
  affs = degraded_affinities(vol, args.noise, seed, gap_affinity=args.gap_affinity)
  organelles = np.stack([vol.nuclei > 0, vol.mitochondria > 0, vol.synapse_mask > 0]
                        ).astype(np.float32)
  frags = fragments(affs, vol.resolution, synapse=organelles[2] > 0,
                    synapse_boundary=args.synapse_boundary)
  if args.oracle_fragments:
    only = fragments_holding_synapses(frags, vol) if args.oracle_fragments == "synapse" else None
    frags = split_by_ground_truth(frags, vol.neurons, only)
  rag = merge_rags([block_rag(frags, affs, organelles, (0, 0, 0))])
  supervoxels = import_volume(frags, f"file://{root}/supervoxels", "segmentation",
                              vol.resolution, source="benchmarks/constraints.py")
  gt = write_ground_truth_files(os.path.join(root, "gt"),
                                scored_skeletons(vol.skeletons, args.skeleton_fraction, seed),
                                vol.nucleus_points_nm, vol.synapses_nm)
  evidence = AgglomerationParams(nucleus_fraction=args.nucleus_fraction)
  used = dataclasses.replace(evidence, constraints=tuple(args.evidence.split(",")))
  constrained = score(rag, rag["frag_id"], supervoxels, gt, used, evidence)
  baseline = score(rag, rag["frag_id"], supervoxels, gt,
                   AgglomerationParams(use_constraints=False), evidence)
  best_c, best_b = best_row(constrained), best_row(baseline)
  plain = {}
  if args.synapse_boundary > 0 and not args.oracle_fragments:
    plain_frags = fragments(affs, vol.resolution)
    plain_rag = merge_rags([block_rag(plain_frags, affs, organelles, (0, 0, 0))])
    plain_sv = import_volume(plain_frags, f"file://{root}/supervoxels_plain", "segmentation",
                             vol.resolution, source="benchmarks/constraints.py")
    row = best_row(score(plain_rag, plain_rag["frag_id"], plain_sv, gt,
                         AgglomerationParams(use_constraints=False), evidence))
    plain = {"baseline_plain_watershed": row,
             "plain_fragment_errors": fragment_errors(plain_sv, vol),
             "ratio_vs_plain_watershed": best_c["berl"] / row["berl"]}
  out = {
    "volume": vol.summary(), "noise": args.noise, "oracle_fragments": args.oracle_fragments,
    "skeleton_fraction": args.skeleton_fraction, "evidence": args.evidence,
    "fragments": int(len(rag["frag_id"])),
    "nucleus_instances": int(derive_constraints(rag, evidence)[0].nucleus.max()),
    "fragment_errors": fragment_errors(supervoxels, vol),
    "constrained": constrained, "baseline": baseline,
    "best_constrained": best_c, "best_baseline": best_b,
    "ratio": best_c["berl"] / best_b["berl"],
    "nerl_ratio": best_c["nerl"] / max(best_b["nerl"], 1e-9),
    "synapse_boundary": args.synapse_boundary, **plain,
  }
  bounded = ""
  if args.bounds:
    out["bounds"] = bounds(frags, rag, supervoxels, gt, vol, evidence, best_b["berl"])
    bounded = ("; bounds (bERL ratio): ground-truth nuclei and synapse partners "
               f"{out['bounds']['organelles']['ratio']:.2f}, every two cells apart "
               f"{out['bounds']['cells']['ratio']:.2f}, perfect agglomeration "
               f"{out['bounds']['oracle']['ratio']:.2f}")
  if plain:
    row, errors = plain["baseline_plain_watershed"], plain["plain_fragment_errors"]
    bounded = (f"; against the plain watershed's unconstrained {row['berl']:.0f} nm "
               f"(t={row['threshold']}): ratio {plain['ratio_vs_plain_watershed']:.2f}, "
               f"{row['n_merged_synapses']} merged synapses, "
               f"{errors['synapses_within_one_fragment']} within one fragment, "
               f"{errors['merging_fragments']} fragments hold two skeletons" + bounded)
  left = best_c["violations"]
  return out, (f"bERL constrained {best_c['berl']:.0f} nm (t={best_c['threshold']}) vs "
              f"unconstrained {best_b['berl']:.0f} nm (t={best_b['threshold']}): ratio "
              f"{out['ratio']:.2f} ({out['nucleus_instances']} nucleus instances); "
              f"nERL {best_c['nerl']:.0f} vs {best_b['nerl']:.0f} nm; "
              f"violations of the predicted constraints left: "
              f"{left['segments_with_several_nuclei']} multi-nucleus, "
              f"{left['synapse_partners_merged']} synapse (baseline "
              f"{best_b['violations']['segments_with_several_nuclei']}, "
              f"{best_b['violations']['synapse_partners_merged']}); of the ground truth: "
              f"{best_c['n_nucleus_violating_segments']} segments with several nuclei, "
              f"{best_c['n_merged_synapses']} merged synapses (baseline "
              f"{best_b['n_nucleus_violating_segments']}, {best_b['n_merged_synapses']}); "
              f"in the fragments already: "
              f"{out['fragment_errors']['merging_fragments']} of {out['fragments']} hold two "
              f"skeletons, {out['fragment_errors']['synapses_within_one_fragment']} of "
              f"{out['fragment_errors']['synapses']} synapses lie within one{bounded}")


if __name__ == "__main__":
  main()
