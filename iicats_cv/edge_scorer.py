"""A learned merge score for RAG edges: the probability that two fragments belong to one
neuron, from their boundary's affinities and what each fragment looks like.

The mean boundary affinity sees only the membrane between two fragments. Fragments of one
neuron also look alike (intensity, texture, organelles inside them), and the default model's
affinities fail in ways their appearance gives away: the dark glia-like body of the FIB
crop, whose interior affinities average 0.57 even on the training half, is shattered into
hundreds of fragments that mean-affinity agglomeration leaves apart. As in GALA and
NeuroProof, a classifier trained on labelled fragments learns that. Here it is a small ensemble
of multilayer perceptrons (numpy to apply, PyTorch to train), stored in the checkpoint's
operating point as JSON, so a run needs nothing beyond the checkpoint.

Agglomeration then merges by the count-weighted mean of the edge probabilities over a
boundary (apply_edge_scorer), so merged regions keep the mean-agglomeration semantics and the
constraints apply unchanged.
"""
from __future__ import annotations

import fastremap
import numpy as np

from .errors import IicatsError
from .rag import APPEARANCE_FIELDS, EDGE_FIELDS, HIST_BINS, merge_rags, unique_pairs

FEATURES = ("mean_affinity", "q10", "q25", "q50", "q75", "q90", "min_affinity", "log_count",
            "log_size_min", "log_size_max", "nucleus_pair_fraction", "mito_pair_fraction",
            "synapse_pair_fraction", "intensity_min", "intensity_max", "intensity_difference",
            "intensity_std_min", "intensity_std_max", "intensity_std_difference",
            "nucleus_min", "nucleus_max", "mito_min", "mito_max", "synapse_min",
            "synapse_max", "boundary_min", "boundary_max")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
SCORING_CHUNK = 1 << 18  # edges scored at once


def edge_features(rag: dict, edges: slice = slice(None)) -> np.ndarray:
  """float32 (E, len(FEATURES)) for the `edges` (default: all) of a merged RAG
  (rag.merge_rags) built with histograms and appearance statistics (block_rag(...,
  histogram=True, image=...)). Intensities are scaled to [0, 1] (uint8 / 255); sizes and
  counts are in voxels, logged."""
  missing = [f for f in ("aff_hist",) + tuple(f"frag_{a}" for a in APPEARANCE_FIELDS)
             if f not in rag]
  if missing:
    raise IicatsError("the learned edge scorer needs a RAG with affinity histograms and "
                      f"fragment appearance (missing: {', '.join(missing)}): build it with "
                      "the image (the pipeline's rag stage does when the scorer is used)")
  frag = rag["frag_id"]
  u = np.searchsorted(frag, rag["u"][edges])
  v = np.searchsorted(frag, rag["v"][edges])
  count = np.maximum(rag["count"][edges].astype(np.float64), 1)
  size = np.maximum(rag["frag_size"].astype(np.float64), 1)
  hist = rag["aff_hist"][edges].astype(np.float64)
  cdf = np.cumsum(hist, axis=1) / np.maximum(hist.sum(axis=1, keepdims=True), 1)
  quantiles = [(np.argmax(cdf >= q, axis=1) + 0.5) / HIST_BINS for q in QUANTILES]
  mean = {name: rag[f"frag_{name}_sum"] / size
          for name in ("intensity", "nucleus_prob", "mito_prob", "synapse_prob", "boundary")}
  mean["intensity"] = mean["intensity"] / 255.0
  std = np.sqrt(np.maximum(rag["frag_intensity_sq_sum"] / size
                           - (rag["frag_intensity_sum"] / size) ** 2, 0)) / 255.0

  def low_high(x):
    return [np.minimum(x[u], x[v]), np.maximum(x[u], x[v])]

  columns = [rag["aff_sum"][edges] / count, *quantiles,
             np.minimum(rag["aff_min"][edges], 1.0), np.log(count), *np.log(low_high(size)),
             rag["nucleus_pairs"][edges] / count, rag["mito_pairs"][edges] / count,
             rag["synapse_pairs"][edges] / count,
             *low_high(mean["intensity"]), np.abs(mean["intensity"][u] - mean["intensity"][v]),
             *low_high(std), np.abs(std[u] - std[v]),
             *low_high(mean["nucleus_prob"]), *low_high(mean["mito_prob"]),
             *low_high(mean["synapse_prob"]), *low_high(mean["boundary"])]
  return np.stack(columns, axis=1).astype(np.float32)


def majority_labels(fragments: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each fragment's majority ground-truth label (ties: the lowest label).
  fragments, labels: integer (X, Y, Z). Returns (fragment ids uint64 (F,) sorted, their
  majority label uint64 (F,))."""
  keys, counts = fastremap.unique(fragments.astype(np.uint64) * np.uint64(2 ** 32)
                                  + labels.astype(np.uint64), return_counts=True)
  frag_of, label_of = keys // np.uint64(2 ** 32), keys % np.uint64(2 ** 32)
  order = np.lexsort((-counts, frag_of))
  frag_of, label_of = frag_of[order], label_of[order]
  first = np.ones(len(order), dtype=bool)
  first[1:] = frag_of[1:] != frag_of[:-1]
  return frag_of[first], label_of[first]


def same_neuron_edges(fragments: np.ndarray, labels: np.ndarray, rag: dict) -> np.ndarray:
  """bool (E,): whether an edge's two fragments have the same majority ground-truth neuron
  (a fragment whose majority is background 0 never does).
  fragments: uint64 (X, Y, Z) the RAG's fragments; labels: integer (X, Y, Z) ground truth."""
  ids, majority = majority_labels(fragments, labels)
  a, b = (majority[np.searchsorted(ids, rag[end])] for end in ("u", "v"))
  return (a == b) & (a > 0)


def train_edge_scorer(features: np.ndarray, same: np.ndarray, count: np.ndarray,
                      members: int = 5, hidden: int = 32, epochs: int = 150,
                      seed: int = 0) -> dict:
  """An ensemble of `members` two-hidden-layer perceptrons, each from its own seed, trained
  full-batch (Adam, lr 1e-2, weight decay 1e-4) on binary cross-entropy weighted by
  sqrt(boundary voxels): long boundaries matter more, without drowning the many small ones.
  150 epochs: 300 scored worse on held-out data (a 5-member ensemble on the FIB training
  half). features: float32 (E, F); same: bool (E,); count: (E,) boundary voxels.
  Returns the scorer as JSON-ready lists (see score_edges)."""
  import torch
  if len(np.unique(same)) < 2:
    raise IicatsError("cannot train an edge scorer: the labelled fragments have "
                      + ("no boundary inside one neuron" if not same.any()
                         else "no boundary between two neurons"))
  mean = features.mean(axis=0)
  scale = features.std(axis=0) + 1e-6
  x = torch.tensor((features - mean) / scale, dtype=torch.float32)
  y = torch.tensor(same, dtype=torch.float32)
  weight = np.sqrt(np.asarray(count, np.float64))
  w = torch.tensor(weight / weight.mean(), dtype=torch.float32)
  nets = []
  for member in range(members):
    torch.manual_seed(seed + member)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 1))
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
      optimiser.zero_grad()
      loss = (torch.nn.functional.binary_cross_entropy_with_logits(
        net(x)[:, 0], y, reduction="none") * w).mean()
      loss.backward()
      optimiser.step()
    nets.append([[layer.weight.detach().numpy().T.round(5).tolist(),
                  layer.bias.detach().numpy().round(5).tolist()]
                 for layer in net if isinstance(layer, torch.nn.Linear)])
  return {"features": list(FEATURES), "mean": mean.tolist(),
          "scale": scale.tolist(), "members": nets}


def score_edges(scorer: dict, features: np.ndarray) -> np.ndarray:
  """float64 (E,) same-neuron probability per edge: the ensemble's mean.
  scorer: from train_edge_scorer; features: (E, F) from edge_features."""
  if list(scorer.get("features", ())) != list(FEATURES):
    raise IicatsError("edge scorer: it was trained on other features than this version "
                      "computes; calibrate the checkpoint again (iicats calibrate)")
  x = (features.astype(np.float64) - np.asarray(scorer["mean"])) / np.asarray(scorer["scale"])
  total = np.zeros(len(x))
  for layers in scorer["members"]:
    h = x
    for k, (weight, bias) in enumerate(layers):
      h = h @ np.asarray(weight) + np.asarray(bias)
      if k < len(layers) - 1:
        h = np.maximum(h, 0)
    total += 1 / (1 + np.exp(-h[:, 0]))
  return total / len(scorer["members"])


def apply_edge_scorer(rag: dict, scorer: dict) -> dict:
  """The RAG with each edge's affinity sum replaced by probability × boundary voxels, so the
  agglomeration's mean over a boundary becomes its count-weighted mean probability (and the
  sums of merged boundaries stay meaningful). The histograms go: quantiles of raw
  affinities no longer describe the score."""
  probability = np.empty(len(rag["u"]))
  # a chunk of edges at a time: the features of every edge at once would take ~10x the
  # memory of the RAG itself
  for start in range(0, len(probability), SCORING_CHUNK):
    chunk = slice(start, start + SCORING_CHUNK)
    probability[chunk] = score_edges(scorer, edge_features(rag, chunk))
  scored = {key: value for key, value in rag.items() if key != "aff_hist"}
  scored["aff_sum"] = probability * rag["count"]
  return scored


def score_edge_pieces(rag: dict, node_table: dict, scorer: dict) -> dict:
  """apply_edge_scorer for one part of the volume whose stitched fragments (nodes, see
  rag.contract_stitched) may reach beyond it, as in hierarchical agglomeration: each edge is
  scored as the part's share of the boundary between the two nodes, with the nodes' totals
  over the whole volume as their size and appearance, so a node pair whose boundary lies
  inside the part gets the score the flat path gives it.

  rag: the part's merged RAG (rag.merge_rags) over fragment ids, with histograms.
  node_table: {"fragments": uint64 (K,) sorted, "nodes": uint64 (K,) each one's node id, and
    "frag_size", "frag_<FRAGMENT_FIELDS / APPEARANCE_FIELDS>": float64 (K,) its node's
    totals}; it must hold every fragment id of rag, edge ends included.
  Returns the RAG with aff_sum = probability × count on edges between two nodes (edges
  inside one node keep theirs: contraction drops them) and without aff_hist.
  """
  known = node_table["fragments"]

  def node_of(ids):
    at = np.minimum(np.searchsorted(known, ids), max(len(known) - 1, 0))
    if len(ids) and (not len(known) or np.any(known[at] != ids)):
      raise IicatsError("edge scoring: the node table lacks fragments of this part (was it "
                        "written for another RAG?); run the nodes stage again")
    return node_table["nodes"][at]

  nu, nv = node_of(rag["u"]), node_of(rag["v"])
  between = nu != nv
  lo, hi = np.minimum(nu, nv)[between], np.maximum(nu, nv)[between]
  _, _, pair = unique_pairs(lo, hi)
  node_ids, rows = np.unique(node_table["nodes"], return_index=True)
  pieces = {"u": lo, "v": hi, "frag_id": node_ids,
            **{field: rag[field][between] for field in EDGE_FIELDS[2:]
               if field in rag and field != "stitch"},
            **{field: node_table[field][rows] for field in node_table
               if field.startswith("frag_")}}
  nodes = apply_edge_scorer(merge_rags([pieces]), scorer)  # edges in unique_pairs' order
  probability = nodes["aff_sum"] / np.maximum(nodes["count"], 1)
  scored = {key: value for key, value in rag.items() if key != "aff_hist"}
  scored["aff_sum"] = np.asarray(rag["aff_sum"], np.float64).copy()
  scored["aff_sum"][between] = probability[pair] * rag["count"][between]
  return scored
