"""The learned edge scorer: features from the RAG, labels from ground truth, training, and
agglomeration on its probabilities with the constraints still in force."""
import json

import numpy as np
import pytest

from iicats_cv.agglomerate import AgglomerationParams, agglomerate
from iicats_cv.edge_scorer import (FEATURES, apply_edge_scorer, edge_features,
                                   same_neuron_edges, score_edge_pieces, score_edges,
                                   train_edge_scorer)
from iicats_cv.errors import IicatsError
from iicats_cv.metrics import adapted_rand_error
from iicats_cv.rag import (APPEARANCE_FIELDS, block_rag, contract_stitched, merge_rags,
                          stitched_node_table)
from iicats_cv.watershed import fragments
from conftest import blobs, noisy_affinities


def _scene(seed=0, shape=(48, 48, 32)):
  """Blobs whose affinities are so noisy (std 0.35, correlated over 1.5 voxels) that no
  threshold of the mean affinity separates the cells; each cell's image has its own grey
  level, which tells the scorer what the affinities do not. -> (fragments, RAG, labels)."""
  labels, image = blobs(shape, n=10, seed=seed)
  grey = np.random.default_rng(seed).uniform(60, 200, labels.max() + 1)
  image = np.clip(grey[labels] + np.random.default_rng(seed + 1).normal(0, 5, shape), 0, 255
                  ).astype(np.uint8)
  affinities = noisy_affinities(labels, seed=seed, noise=0.35, smooth=1.5)
  organelles = np.zeros((3,) + shape, np.float32)
  frags = fragments(affinities, (10, 10, 10), min_size=10)
  rag = merge_rags([block_rag(frags, affinities, organelles, (0, 0, 0), histogram=True,
                              image=image)])
  return frags, rag, labels


def test_features_are_finite_per_edge_and_need_the_appearance():
  _, rag, _ = _scene()
  x = edge_features(rag)
  assert x.shape == (len(rag["u"]), len(FEATURES)) and x.dtype == np.float32
  assert np.isfinite(x).all()
  assert (x[:, FEATURES.index("q10")] <= x[:, FEATURES.index("q90")]).all()
  without = {k: v for k, v in rag.items() if k != "frag_intensity_sum"}
  with pytest.raises(IicatsError, match="missing: frag_intensity_sum"):
    edge_features(without)


def test_appearance_of_block_rags_adds_up_to_the_whole():
  labels, image = blobs((32, 32, 32), n=6)
  affs = noisy_affinities(labels, seed=1)
  organelles = np.random.default_rng(0).uniform(0, 1, (3,) + labels.shape).astype(np.float32)
  frags = fragments(affs, (10, 10, 10), min_size=10)
  whole = merge_rags([block_rag(frags, affs, organelles, (0, 0, 0), image=image)])
  parts = []
  for x0 in (0, 16):
    ctx = (1 if x0 else 0, 0, 0)
    lo = max(x0 - 1, 0)
    parts.append(block_rag(frags[lo:x0 + 16], affs[:, x0:x0 + 16], organelles[:, lo:x0 + 16],
                           ctx, block_origin=(x0, 0, 0), image=image[x0:x0 + 16]))
  merged = merge_rags(parts)
  for field in APPEARANCE_FIELDS:
    np.testing.assert_allclose(merged[f"frag_{field}"], whole[f"frag_{field}"], rtol=1e-6)
  first = frags == whole["frag_id"][0]
  assert whole["frag_intensity_sum"][0] == pytest.approx(image[first].sum())


def test_block_rag_of_uint8_layers_equals_that_of_their_float_values():
  # the rag task keeps uint8 affinities and organelles as read (a quarter of the memory)
  labels, image = blobs((24, 20, 16), n=5)
  affs = np.round(noisy_affinities(labels, seed=2) * 255).astype(np.uint8)
  organelles = np.random.default_rng(1).integers(0, 256, (3, 25, 20, 16), dtype=np.uint8)
  frags = np.concatenate([fragments(affs, (10, 10, 10), min_size=10)[:1],
                          fragments(affs, (10, 10, 10), min_size=10)])  # 1 voxel of context
  args = dict(block_origin=(8, 0, 0), organelle_threshold=(0.9, 0.5, 0.3), histogram=True,
              image=image)
  from_uint8 = block_rag(frags, affs, organelles, (1, 0, 0), **args)
  from_float = block_rag(frags, affs.astype(np.float32) / 255.0,
                         organelles.astype(np.float32) / 255.0, (1, 0, 0), **args)
  assert from_uint8.keys() == from_float.keys()
  for field, values in from_float.items():
    np.testing.assert_array_equal(from_uint8[field], values, err_msg=field)
  assert from_float["nucleus_pairs"].any() and from_float["synapse_pairs"].any()


def test_same_neuron_edges_follow_the_majority_label():
  frags = np.array([1, 1, 2, 2, 3, 3, 4, 4], np.uint64).reshape(8, 1, 1)
  labels = np.array([7, 7, 7, 9, 9, 9, 0, 0], np.uint32).reshape(8, 1, 1)
  rag = {"frag_id": np.array([1, 2, 3, 4], np.uint64),
         "u": np.array([1, 2, 3], np.uint64), "v": np.array([2, 3, 4], np.uint64)}
  # fragment 2 is half 7, half 9: the first (lowest) label wins the tie
  np.testing.assert_array_equal(same_neuron_edges(frags, labels, rag), [True, False, False])


def test_trained_scorer_agglomerates_unseen_data_better_than_the_mean():
  frags, rag, labels = _scene(seed=0)
  scorer = train_edge_scorer(edge_features(rag), same_neuron_edges(frags, labels, rag),
                             rag["count"], members=3)
  scorer = json.loads(json.dumps(scorer))  # as stored in a checkpoint
  frags, rag, labels = _scene(seed=4)
  probability = score_edges(scorer, edge_features(rag))
  assert ((probability >= 0) & (probability <= 1)).all()
  same = same_neuron_edges(frags, labels, rag)
  assert probability[same].mean() > probability[~same].mean() + 0.3

  def arand(params):
    result = agglomerate(rag, params)
    table = dict(zip(result.fragment_ids.tolist(), result.segment_ids.tolist()))
    segmentation = np.vectorize(table.get)(frags)
    return adapted_rand_error(segmentation, labels)

  plain = min(arand(AgglomerationParams(threshold=t, use_constraints=False))
              for t in (0.3, 0.4, 0.5, 0.6, 0.7))
  learned = arand(AgglomerationParams(threshold=0.5, use_constraints=False, edge_scorer=scorer))
  assert learned < plain / 2  # 0.05 against the mean's best 0.28 when written


def test_scored_agglomeration_keeps_the_constraints_and_refuses_a_quantile():
  frags, rag, labels = _scene(seed=0)
  scorer = train_edge_scorer(edge_features(rag), same_neuron_edges(frags, labels, rag),
                             rag["count"], members=1)
  # a sure merge (probability 1 everywhere) between two nuclear fragments stays blocked
  sure = dict(scorer, members=[[[np.zeros((len(FEATURES), 1)).tolist(), [50.0]]]])
  nuclear = rag["frag_id"][:2]
  rag = dict(rag, frag_nucleus_voxels=np.where(np.isin(rag["frag_id"], nuclear),
                                                rag["frag_size"], 0).astype(float))
  result = agglomerate(rag, AgglomerationParams(threshold=0.5, edge_scorer=sure))
  assert result.segment_ids[0] != result.segment_ids[1]
  baseline = agglomerate(rag, AgglomerationParams(threshold=0.5, edge_scorer=sure,
                                                  use_constraints=False))
  assert len(np.unique(baseline.segment_ids)) < len(np.unique(result.segment_ids))
  scored = apply_edge_scorer(rag, sure)
  np.testing.assert_allclose(scored["aff_sum"], rag["count"])
  assert "aff_hist" not in scored
  with pytest.raises(IicatsError, match="not both"):
    agglomerate(rag, AgglomerationParams(quantile=0.75, edge_scorer=sure))


def test_scorer_of_other_features_or_unlabelled_data_is_refused():
  _, rag, _ = _scene()
  with pytest.raises(IicatsError, match="trained on other features"):
    score_edges({"features": ["mean_affinity"], "members": []}, edge_features(rag))
  with pytest.raises(IicatsError, match="no boundary between two neurons"):
    train_edge_scorer(edge_features(rag), np.ones(len(rag["u"]), bool), rag["count"])


def test_scoring_a_chunk_of_edges_at_a_time_changes_nothing(monkeypatch):
  frags, rag, labels = _scene()
  scorer = train_edge_scorer(edge_features(rag), same_neuron_edges(frags, labels, rag),
                             rag["count"], members=1)
  whole = score_edges(scorer, edge_features(rag)) * rag["count"]
  monkeypatch.setattr("iicats_cv.edge_scorer.SCORING_CHUNK", 7)
  np.testing.assert_allclose(apply_edge_scorer(rag, scorer)["aff_sum"], whole)


def _split_fragment(rag: dict, fragment: int, piece: int) -> dict:
  """The RAG as two blocks would see it when `fragment` crosses their face: its voxels and
  each of its boundaries shared between it and a new id `piece`, with a stitch edge between
  the two (what the rag stage writes)."""
  rag = {"stitch": np.zeros(len(rag["u"])), **rag}
  touching = (rag["u"] == fragment) | (rag["v"] == fragment)
  hist = rag["aff_hist"][touching]
  halves = [hist // 2, hist - hist // 2]
  rows = {key: [rag[key][~touching]] for key in rag if not key.startswith("frag_")}
  for half, name in zip(halves, (fragment, piece)):
    share = half.sum(axis=1) / np.maximum(hist.sum(axis=1), 1)
    u = np.where(rag["u"][touching] == fragment, name, rag["u"][touching])
    v = np.where(rag["v"][touching] == fragment, name, rag["v"][touching])
    rows["u"].append(np.minimum(u, v))
    rows["v"].append(np.maximum(u, v))
    rows["aff_hist"].append(half)
    rows["count"].append(half.sum(axis=1))
    rows["aff_min"].append(rag["aff_min"][touching])
    for key in set(rows) - {"u", "v", "aff_hist", "count", "aff_min"}:
      rows[key].append(rag[key][touching] * share)
  stitch = {"u": fragment, "v": piece, "count": 1, "stitch": 1, "aff_min": 1.0,
            "aff_hist": np.zeros((1, hist.shape[1]), hist.dtype)}
  for key in rows:
    rows[key].append(np.atleast_1d(stitch.get(key, 0.0)))
  out = {key: np.concatenate(value) for key, value in rows.items()}
  out["u"], out["v"] = out["u"].astype(np.uint64), out["v"].astype(np.uint64)
  at = int(np.searchsorted(rag["frag_id"], fragment))
  out["frag_id"] = np.append(rag["frag_id"], np.uint64(piece))
  for key in rag:
    if key.startswith("frag_") and key != "frag_id":
      values = rag[key].astype(np.float64)
      out[key] = np.append(values, values[at] / 2)
      out[key][at] /= 2
  return merge_rags([out])


def test_scoring_the_pieces_of_stitched_fragments_gives_the_whole_scores():
  """Hierarchical agglomeration scores each part's edges on its own: with the stitched
  nodes' totals from the node table, a fragment cut by a task face and its boundaries shared
  between two pieces score as the whole fragment does."""
  frags, rag, labels = _scene()
  scorer = json.loads(json.dumps(train_edge_scorer(
    edge_features(rag), same_neuron_edges(frags, labels, rag), rag["count"], members=2)))
  assert "stitch" not in rag or not rag["stitch"].any()
  busiest = int(np.argmax(np.bincount(np.searchsorted(rag["frag_id"], rag["u"]),
                                      minlength=len(rag["frag_id"]))))
  fragment = int(rag["frag_id"][busiest])
  pieces = _split_fragment(rag, fragment, int(rag["frag_id"].max()) + 1)
  table = stitched_node_table(pieces)
  assert (table["nodes"] == fragment).sum() == 2
  scored = score_edge_pieces(pieces, table, scorer)
  assert "aff_hist" not in scored
  whole, _ = contract_stitched(scored)
  expected = apply_edge_scorer(rag, scorer)
  np.testing.assert_array_equal(whole["u"], expected["u"])
  np.testing.assert_allclose(whole["aff_sum"], expected["aff_sum"], rtol=1e-9)
  # scored piece by piece without the node table, the cut fragment would look half its size
  own = {**table, "frag_size": pieces["frag_size"]}
  naive, _ = contract_stitched(score_edge_pieces(pieces, own, scorer))
  assert not np.allclose(naive["aff_sum"], expected["aff_sum"])
  with pytest.raises(IicatsError, match="node table lacks fragments"):
    score_edge_pieces(pieces, {key: value[1:] for key, value in table.items()}, scorer)
