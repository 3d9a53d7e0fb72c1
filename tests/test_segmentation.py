"""Watershed ids, RAG bookkeeping, constraint-aware agglomeration, tracking, idempotency."""
import dataclasses
import os

import numpy as np
import pytest
from cloudvolume import CloudVolume

from iicats_cv.agglomerate import (AgglomerationParams, Constraints, agglomerate,
                                   derive_constraints)
from iicats_cv.errors import IicatsError
from iicats_cv.layers import create_layer
from iicats_cv.rag import block_rag, merge_rags, relabel
from iicats_cv.train import affinities_from_labels
from iicats_cv.watershed import boundary_map, fragments
from conftest import blobs, noisy_affinities


def test_fragments_cover_volume_and_respect_boundaries():
  labels, _ = blobs((40, 40, 30), n=5)
  frags = fragments(noisy_affinities(labels), (10, 10, 10), min_size=20)
  assert frags.dtype == np.uint64 and frags.min() >= 1
  # almost every fragment lies inside one ground-truth cell
  pairs, counts = np.unique(np.stack([frags.ravel(), labels.ravel()]), axis=1,
                            return_counts=True)
  majority = sum(counts[pairs[0] == f].max() for f in np.unique(pairs[0]))
  assert majority / labels.size > 0.9


def test_uint8_affinities_give_the_fragments_of_their_float_values():
  # the watershed task keeps a uint8 layer as read (a quarter of float32's memory)
  labels, _ = blobs((40, 40, 30), n=5)
  quantised = np.round(noisy_affinities(labels) * 255).astype(np.uint8)
  as_float = quantised.astype(np.float32) / 255.0
  unchanged = as_float.copy()
  np.testing.assert_array_equal(boundary_map(quantised), boundary_map(as_float))
  np.testing.assert_array_equal(fragments(quantised, (10, 10, 10), min_size=20),
                                fragments(as_float, (10, 10, 10), min_size=20))
  np.testing.assert_array_equal(as_float, unchanged)


def test_thin_neurite_beside_a_thick_cell_keeps_its_own_fragment():
  # a 4-voxel-wide neurite against a 30-voxel cell: within the seed spacing window the cell's
  # distance values exceed the neurite's everywhere, so the maximum filter leaves it no seed
  labels = np.zeros((40, 40, 20), np.uint64)
  labels[:30] = 1
  labels[31:35, 10:30, 5:15] = 2
  affs, _ = affinities_from_labels(labels)
  frags = fragments(affs * 0.8 + 0.1, (10, 10, 10), seed_distance_nm=80, min_size=1)
  neurite = np.unique(frags[32:34, 12:28, 7:13])
  assert len(neurite) == 1
  assert not np.isin(neurite, frags[:30]).any()
  # the same per section (anisotropic data), in the sections inside the neurite's z range
  sections = fragments(affs * 0.8 + 0.1, (10, 10, 10), seed_distance_nm=80, min_size=1,
                       per_section=True)
  for z in range(6, 14):
    assert not np.isin(sections[32:34, 12:28, z], sections[:30, :, z]).any()


def test_fragments_do_not_depend_on_the_read_window():
  """A block's fragments away from its cut faces are those of the whole volume, whatever
  margin was read. Affinities in steps of 0.1 make wide plateaus of the boundary map: the
  flood breaks ties there by seed distance and global position (flood_order), not by the
  order voxels entered skimage's queue (5e-5 to 0.007 adapted Rand from the whole volume in
  these windows when it did)."""
  from iicats_cv.metrics import adapted_rand_error
  labels, _ = blobs((96, 96, 48), n=12, seed=4)
  affs = np.round(noisy_affinities(labels, seed=2, noise=0.15, smooth=1.0) * 10) / 10
  affs = affs.astype(np.float32)
  whole = fragments(affs, (10, 10, 10))
  margin = 24
  for lo, hi in (((0, 0, 0), (64, 64, 48)), ((14, 6, 0), (96, 96, 48)),
                 ((20, 20, 0), (84, 80, 48))):
    window = fragments(affs[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))],
                       (10, 10, 10), origin=lo)
    inner = tuple(slice(margin if a else 0, (b - a) - (margin if b < n else 0))
                  for a, b, n in zip(lo, hi, labels.shape))
    outer = tuple(slice(a + s.start, a + s.stop) for a, s in zip(lo, inner))
    assert adapted_rand_error(window[inner], whole[outer]) == 0.0


def _neurite_behind_a_faded_cleft():
  """A 4-voxel-wide neurite against a thick cell, the membrane between them faded to 0.55
  over a patch (a dense cleft), and the synapse mask on both sides of that patch.
  -> labels uint64 (40, 40, 20), affinities float32 (3, 40, 40, 20), synapse bool."""
  labels = np.zeros((40, 40, 20), np.uint64)
  labels[:30] = 1
  labels[30:34, 10:30, 5:15] = 2
  affs, _ = affinities_from_labels(labels)
  affs = affs * 0.8 + 0.1
  affs[0, 30, 15:25, 7:13] = 0.55
  synapse = np.zeros(labels.shape, bool)
  synapse[27:33, 13:27, 6:14] = True
  return labels, affs, synapse


def test_synapse_boundary_parts_a_faded_cleft():
  labels, affs, synapse = _neurite_behind_a_faded_cleft()
  plain = fragments(affs, (10, 10, 10), seed_distance_nm=80, min_size=1)
  # without the synapse the cell floods the seedless neurite through the faded patch
  assert np.isin(plain[31:33, 12:28, 7:13], plain[:30]).any()
  parted = fragments(affs, (10, 10, 10), seed_distance_nm=80, min_size=1, synapse=synapse,
                     synapse_boundary=0.2)
  neurite = np.unique(parted[31:33, 12:28, 7:13])
  assert len(neurite) == 1 and not np.isin(neurite, parted[:30]).any()
  # the cytoplasm under the synapse mask (affinity 0.9) stays with its cell
  assert len(np.unique(parted[:30])) == len(np.unique(plain[:30]))


def test_watershed_tasks_read_the_synapse_channel(tmp_path):
  from iicats_cv.tasks.runner import run_tasks
  from iicats_cv.tasks.segmentation import create_watershed_tasks
  labels, affs, synapse = _neurite_behind_a_faded_cleft()
  aff_path, org_path = (f"file://{tmp_path}/{name}" for name in ("aff", "org"))
  layer = dict(layer_type="image", dtype="float32", resolution=(10, 10, 10),
               voxel_offset=(0, 0, 0), volume_size=labels.shape, chunk_size=(40, 40, 20),
               num_channels=3, step="test")
  create_layer(aff_path, **layer)[:, :, :] = np.moveaxis(affs, 0, -1)
  organelles = np.zeros(labels.shape + (3,), np.float32)
  organelles[..., 2] = np.where(synapse, 0.8, 0.3)  # the synapse channel, cut at 0.5
  organelles[..., 0] = 0.9                          # a nucleus channel never read here
  create_layer(org_path, **layer)[:, :, :] = organelles
  kwargs = dict(task_shape=(40, 40, 20), chunk_size=(40, 40, 20), min_size=1)
  with pytest.raises(IicatsError, match="needs the organelles layer"):
    create_watershed_tasks(aff_path, aff_path + "_sv", synapse_boundary=0.2, **kwargs)
  short = f"file://{tmp_path}/short"
  create_layer(short, **{**layer, "volume_size": (40, 40, 10)})
  with pytest.raises(IicatsError, match="differ from the affinities"):
    create_watershed_tasks(aff_path, aff_path + "_sv", organelles_path=short,
                           synapse_boundary=0.2, **kwargs)
  assert not (tmp_path / "aff_sv").exists()
  run_tasks(create_watershed_tasks(aff_path, aff_path + "_sv", organelles_path=org_path,
                                   synapse_boundary=0.2, **kwargs), None, 1)
  written = CloudVolume(aff_path + "_sv")[:, :, :][..., 0]
  expected = fragments(affs, (10, 10, 10), min_size=1, synapse=synapse, synapse_boundary=0.2)
  assert len(np.unique(written)) == len(np.unique(expected))
  assert not np.isin(np.unique(written[31:33, 12:28, 7:13]), written[:30]).any()


def test_block_rags_add_up_to_the_whole():
  labels, _ = blobs((32, 32, 32), n=6)
  frags = fragments(noisy_affinities(labels), (10, 10, 10), min_size=10)
  affs = noisy_affinities(labels, seed=1)
  whole = merge_rags([block_rag(frags, affs, None, (0, 0, 0))])
  parts = []
  for x0 in (0, 16):
    ctx = (1 if x0 else 0, 0, 0)
    sub = frags[max(x0 - 1, 0):x0 + 16]
    parts.append(block_rag(sub, affs[:, x0:x0 + 16], None, ctx, block_origin=(x0, 0, 0)))
  merged = merge_rags(parts)
  np.testing.assert_array_equal(merged["u"], whole["u"])
  np.testing.assert_array_equal(merged["count"], whole["count"])
  np.testing.assert_allclose(merged["aff_sum"], whole["aff_sum"])
  np.testing.assert_array_equal(merged["frag_size"], whole["frag_size"])


def test_block_rag_counts_each_fragments_nuclear_voxels_and_their_centroid():
  """Nucleus statistics of a block with one voxel of context below x, at a global origin:
  a fragment's nuclear voxels and the sums of their centres (voxels, global)."""
  rng = np.random.default_rng(3)
  frags = rng.integers(1, 4, size=(9, 6, 5)).astype(np.uint64)  # 1 context + 8 block in x
  affs = rng.random((3, 8, 6, 5), dtype=np.float32)
  organelles = rng.random((3, 9, 6, 5), dtype=np.float32)
  origin = (40, 10, 20)
  rag = block_rag(frags, affs, organelles, (1, 0, 0), block_origin=origin,
                  organelle_threshold=(0.7, 0.5, 0.5))
  own, nuclear = frags[1:], organelles[0, 1:] > np.float32(0.7)
  centres = np.indices(own.shape) + np.reshape(origin, (3, 1, 1, 1)) + 0.5
  for i, fragment in enumerate(rag["frag_id"]):
    where = (own == fragment) & nuclear
    assert rag["frag_nucleus_voxels"][i] == where.sum()
    for axis, name in enumerate("xyz"):
      assert rag[f"frag_nucleus_sum_{name}"][i] == pytest.approx(centres[axis][where].sum())


def _toy_rag():
  """A chain of 4 fragments 1-2-3-4 with strong edges; fragments 1 and 4 hold nuclei,
  and the 2-3 boundary carries a synapse."""
  return {
    "u": np.array([1, 2, 3], np.uint64), "v": np.array([2, 3, 4], np.uint64),
    "count": np.array([100, 100, 100]), "aff_sum": np.array([95.0, 90.0, 92.0]),
    "aff_min": np.zeros(3), "mito_pairs": np.array([0, 0, 10]),
    "synapse_pairs": np.array([0, 20, 0]),
    "frag_id": np.array([1, 2, 3, 4], np.uint64),
    "frag_size": np.array([1000, 1000, 1000, 1000]),
    "frag_nucleus_voxels": np.array([800, 0, 0, 900]),
    "frag_nucleus_sum_x": np.array([800 * 5.0, 0, 0, 900 * 35.0]),
    "frag_nucleus_sum_y": np.array([800 * 5.0, 0, 0, 900 * 5.0]),
    "frag_nucleus_sum_z": np.array([800 * 5.0, 0, 0, 900 * 5.0]),
  }


TOY = dict(synapse_min_pairs=4, mito_min_pairs=4)


def test_constraints_block_merges_that_baseline_makes():
  rag = _toy_rag()
  baseline = agglomerate(rag, AgglomerationParams(threshold=0.5, use_constraints=False, **TOY))
  assert len(np.unique(baseline.segment_ids)) == 1
  assert baseline.violations["segments_with_several_nuclei"] == 1
  constrained = agglomerate(rag, AgglomerationParams(threshold=0.5, **TOY))
  seg = constrained.segment_ids
  assert seg[0] == seg[1] and seg[2] == seg[3] and seg[1] != seg[2]
  assert constrained.violations["segments_with_several_nuclei"] == 0
  assert constrained.violations["synapse_partners_merged"] == 0


def test_mitochondria_hint_raises_score_but_not_over_cannot_link():
  rag = _toy_rag()
  rag["aff_sum"] = np.array([95.0, 90.0, 45.0])  # 3-4 weak (0.45) but crossed by a mito
  result = agglomerate(rag, AgglomerationParams(threshold=0.5, mito_bonus=0.1, **TOY))
  assert result.segment_ids[2] == result.segment_ids[3]
  no_hint = agglomerate(rag, AgglomerationParams(threshold=0.5, mito_bonus=0.0, **TOY))
  assert no_hint.segment_ids[2] != no_hint.segment_ids[3]


def test_given_constraints_replace_the_rags_evidence():
  """Proofread evidence instead of the organelle channels': one cannot-link 1-2 and no
  nuclei; the violations are counted against it."""
  rag = _toy_rag()
  given = Constraints(nucleus=np.zeros(4, np.int64), cannot_link=np.array([[0, 1]]),
                      mito_edge=np.zeros(3, bool))
  result = agglomerate(rag, AgglomerationParams(threshold=0.5, **TOY), constraints=given)
  seg = result.segment_ids
  assert seg[0] != seg[1] and seg[1] == seg[2] == seg[3]
  assert result.violations["synapse_cannot_links"] == 1
  assert result.violations["synapse_partners_merged"] == 0
  assert result.violations["nucleus_instances"] == 0
  with pytest.raises(IicatsError, match="use_constraints=False"):
    agglomerate(rag, AgglomerationParams(use_constraints=False), constraints=given)


def test_synapse_cannot_link_needs_the_signal_on_a_membrane():
  """A vesicle cloud split by the watershed puts synapse signal on a boundary inside one cell
  (high affinity there): no cannot-link; the same signal on a cleft (low affinity) is one.
  On the constraints benchmark a quarter of such lines inside one neuron lie below 0.71-0.77."""
  rag = _toy_rag()
  for inside in (0.9, 0.7):
    rag["synapse_aff_sum"] = np.array([0.0, 20 * inside, 0.0])
    assert len(derive_constraints(rag, AgglomerationParams(**TOY))[0].cannot_link) == 0
  rag["synapse_aff_sum"] = np.array([0.0, 20 * 0.3, 0.0])
  np.testing.assert_array_equal(
    derive_constraints(rag, AgglomerationParams(**TOY))[0].cannot_link, [[1, 2]])


def test_small_segments_join_their_best_neighbour_where_the_constraints_allow():
  """Below the threshold everywhere but 1-2, fragment 3 (10 voxels) stays alone without the
  cleanup; with it, it joins 2 (the better boundary, 0.4 against 0.3) unconstrained, and 4
  where the synapse on 2-3 forbids that. Segments of 100 voxels or more stay as they are."""
  rag = _toy_rag()
  rag["aff_sum"] = np.array([95.0, 40.0, 30.0])
  rag["mito_pairs"] = np.zeros(3, np.int64)
  rag["frag_size"] = np.array([1000, 1000, 10, 1000])
  plain = agglomerate(rag, AgglomerationParams(threshold=0.5, **TOY)).segment_ids
  assert len(np.unique(plain)) == 3 and plain[2] not in (plain[1], plain[3])
  for use_constraints, partner in ((False, 1), (True, 3)):
    seg = agglomerate(rag, AgglomerationParams(threshold=0.5, use_constraints=use_constraints,
                                               min_segment_voxels=100, **TOY)).segment_ids
    assert seg[2] == seg[partner] and len(np.unique(seg)) == 2


def test_nucleus_instances_join_only_where_the_nucleus_crosses_the_boundary():
  """Fragments 1-2 share nucleus A, 3-4 nucleus B; the somata touch at the 2-3 boundary, where
  no nucleus voxel pairs are: two instances (the fragments' adjacency alone would make one)."""
  rag = _toy_rag()
  rag["frag_nucleus_voxels"] = np.array([800, 600, 900, 700])
  rag["nucleus_pairs"] = np.array([40, 0, 40])
  constraints = derive_constraints(rag, AgglomerationParams(**TOY))[0]
  np.testing.assert_array_equal(constraints.nucleus, [1, 1, 2, 2])
  rag["nucleus_pairs"] = np.array([40, 40, 40])
  np.testing.assert_array_equal(
    derive_constraints(rag, AgglomerationParams(**TOY))[0].nucleus, [1, 1, 1, 1])


def test_nucleus_fraction_finds_nuclei_that_span_mostly_cytoplasmic_fragments():
  """Where the watershed does not cut at the nuclear envelope, each soma fragment is mostly
  cytoplasm (here 20% nucleus): the default cut sees no nucleus, a lower one both, and the
  cannot-link between them then holds."""
  rag = _toy_rag()
  rag["frag_nucleus_voxels"] = np.array([200, 0, 0, 200])
  assert derive_constraints(rag, AgglomerationParams(**TOY))[0].nucleus.max() == 0
  params = AgglomerationParams(threshold=0.5, nucleus_fraction=0.1, constraints=("nucleus",),
                               **TOY)
  np.testing.assert_array_equal(derive_constraints(rag, params)[0].nucleus, [1, 0, 0, 2])
  result = agglomerate(rag, params)
  assert result.segment_ids[0] != result.segment_ids[3]
  assert result.violations["segments_with_several_nuclei"] == 0


def test_block_rag_records_nucleus_pairs_and_synapse_affinity():
  frags = np.zeros((4, 2, 2), np.uint64)
  frags[:2], frags[2:] = 1, 2
  affs = np.full((3, 4, 2, 2), 0.8, np.float32)
  affs[0, 2] = 0.2                       # the x boundary between the fragments
  organelles = np.zeros((3, 4, 2, 2), np.float32)
  organelles[0, 1:3, 0] = 1              # a nucleus across the boundary on row y=0
  organelles[2, 2, :, 0] = 1             # synapse signal beside it on z=0
  rag = block_rag(frags, affs, organelles, (0, 0, 0))
  assert rag["count"][0] == 4
  assert rag["nucleus_pairs"][0] == 2
  assert rag["synapse_pairs"][0] == 2
  assert rag["synapse_aff_sum"][0] == pytest.approx(0.4)


def test_sweep_tables_equal_separate_runs():
  labels, _ = blobs((32, 32, 24), n=8, seed=3)
  frags = fragments(noisy_affinities(labels, noise=0.2), (10, 10, 10), min_size=5)
  rag = merge_rags([block_rag(frags, noisy_affinities(labels, 2, 0.25), None, (0, 0, 0))])
  params = AgglomerationParams(threshold=0.5, use_constraints=False)
  result = agglomerate(rag, params, sweep_thresholds=[0.3, 0.4, 0.6, 0.7])
  for t, table in result.sweep.items():
    alone = agglomerate(rag, AgglomerationParams(threshold=t, use_constraints=False))
    np.testing.assert_array_equal(table, alone.segment_ids)


def test_tracking_grows_seeds_and_never_merges_two():
  rag = _toy_rag()
  rag["frag_nucleus_voxels"] = np.zeros(4)
  rag["synapse_pairs"] = np.zeros(3, int)
  rag["aff_sum"] = np.array([40.0, 35.0, 40.0])   # all below the 0.5 threshold
  params = AgglomerationParams(threshold=0.5, track_threshold=0.3, **TOY)
  result = agglomerate(rag, params, seeds={1: 0, 2: 3})
  seg = result.segment_ids
  assert seg[0] != seg[3]           # two seeds stay apart
  assert seg[1] == seg[0]           # seed 1 grew over the 0.40 edge
  assert len(result.tracked) == 2
  assert {t["seed"] for t in result.tracked} == {1, 2}


def test_seeds_joined_by_strong_edges_stay_apart():
  """Two stained cells whose fragments the agglomeration alone would merge: each seed keeps
  its own neuron; two seeds on one fragment share theirs."""
  rag = _toy_rag()                  # every edge ≥ 0.9: one segment without seeds
  params = AgglomerationParams(threshold=0.5, use_constraints=False, **TOY)
  assert len(np.unique(agglomerate(rag, params).segment_ids)) == 1
  result = agglomerate(rag, params, seeds={1: 1, 2: 2})
  seg = result.segment_ids
  assert seg[1] != seg[2]
  assert {seg[0], seg[3]} == {seg[1], seg[2]}   # the unseeded fragments still join one
  assert sorted(t["id"] for t in result.tracked) == sorted({int(seg[1]), int(seg[2])})
  shared = agglomerate(rag, params, seeds={1: 1, 2: 1}).tracked
  assert shared[0]["id"] == shared[1]["id"]


def run_segmentation_stages(out, aff_path, task_shape, queue=None, parallel=1):
  """Watershed -> RAG -> agglomeration -> remap on a queue, layers under `out`."""
  from functools import partial
  from iicats_cv.tasks.segmentation import create_watershed_tasks, create_rag_tasks, \
    agglomerate_task, create_remap_tasks
  from iicats_cv.tasks.runner import run_tasks
  run_tasks(create_watershed_tasks(aff_path, out + "/supervoxels", task_shape,
                                   chunk_size=(16, 16, 16), min_size=10), queue, parallel)
  run_tasks(create_rag_tasks(out + "/supervoxels", aff_path, "", out + "/rag", task_shape),
            queue, 1)
  run_tasks([partial(agglomerate_task, rag_prefix=out + "/rag",
                     supervoxels_path=out + "/supervoxels", out_prefix=out,
                     params={"threshold": 0.5}, sweep=[], track=False)], queue, 1)
  run_tasks(create_remap_tasks(out + "/supervoxels", out + "/segmentation", out, task_shape,
                               chunk_size=(16, 16, 16)), queue, 1)


def write_affinities(path, labels, noise=0.1, smooth=0.0):
  cv = create_layer(path, layer_type="image", dtype="float32", resolution=(10, 10, 10),
                    voxel_offset=(0, 0, 0), volume_size=labels.shape, chunk_size=(16, 16, 16),
                    num_channels=3, step="test")
  cv[:, :, :] = np.moveaxis(noisy_affinities(labels, seed=5, noise=noise, smooth=smooth), 0, -1)


def _segment_volume(tmp_path, labels, task_shape, name, affinities=None):
  out = "file://" + str(tmp_path / name)
  if affinities is None:
    write_affinities(out + "/affinities", labels)
    affinities = out + "/affinities"
  run_segmentation_stages(out, affinities, task_shape)
  return out


@pytest.fixture(scope="module")
def fib_runs(tmp_path_factory):
  """GT affinities of the FIB crop with smooth noise, segmented as one task and as 64³ tasks."""
  from iicats_cv.datasets import load_fib_crop
  tmp_path = tmp_path_factory.mktemp("fib")
  _, labels, _ = load_fib_crop()
  affinities = "file://" + str(tmp_path / "affinities")
  write_affinities(affinities, labels, noise=0.1, smooth=1.5)
  return {"whole": _segment_volume(tmp_path, labels, (208, 208, 112), "whole", affinities),
          "tiled": _segment_volume(tmp_path, labels, (64, 64, 64), "tiled", affinities)}


def _segmentation(path):
  return CloudVolume(path + "/segmentation")[:, :, :][..., 0]


def test_segmentation_does_not_depend_on_the_task_shape(fib_runs):
  """64³ tasks against one task over the whole FIB crop (GT affinities with smooth noise):
  fragments cut by task faces are stitched where both blocks' watersheds agree, so the
  agglomerated segmentation matches (ARAND 1.8e-5 here; 0.02 without stitching)."""
  from iicats_cv.metrics import adapted_rand_error
  whole, tiled = fib_runs["whole"], fib_runs["tiled"]
  fragments = [len(np.unique(CloudVolume(path + "/supervoxels")[:, :, :]))
               for path in (whole, tiled)]
  assert fragments[1] > fragments[0], "task faces must cut fragments for this test to bite"
  assert adapted_rand_error(_segmentation(tiled), _segmentation(whole)) <= 0.005


def test_hierarchical_agglomeration_keeps_regions_and_holds_fewer_edges(fib_runs):
  from functools import partial
  from iicats_cv.metrics import adapted_rand_error
  from iicats_cv.tasks.common import get_json, get_npz
  from iicats_cv.tasks.runner import run_tasks
  from iicats_cv.tasks.segmentation import (agglomerate_task, create_reduce_tasks,
                                            create_remap_tasks, level_prefix)
  flat = fib_runs["tiled"]
  parts = flat + "/hierarchical/parts"
  edges = {0: get_json(flat, "agglomeration/summary.json")["edges"]}
  for levels in (1, 2):
    tasks = create_reduce_tasks(flat + "/supervoxels", flat + "/rag", parts, (64, 64, 64), 2,
                                threshold=0.5, level=levels)
    # 4 × 4 × 2 blocks: parts of 2 × 2 × 2 blocks, then one part of 2 × 2 × 1 of those
    assert len(tasks) == {1: 4, 2: 1}[levels]
    run_tasks(tasks, None, 1)
    out = flat + f"/hierarchical/{levels}"
    run_tasks([partial(agglomerate_task, rag_prefix=flat + "/rag",
                       supervoxels_path=flat + "/supervoxels", out_prefix=out,
                       params={"threshold": 0.5}, sweep=[], track=False,
                       hierarchy_prefix=level_prefix(parts, levels))], None, 1)
    run_tasks(create_remap_tasks(flat + "/supervoxels", out + "/segmentation", out,
                                 (64, 64, 64), chunk_size=(16, 16, 16)), None, 1)
    edges[levels] = get_json(out, "agglomeration/summary.json")["edges"]
    table = get_npz(out, "agglomeration/table.npz")
    flat_table = get_npz(flat, "agglomeration/table.npz")
    np.testing.assert_array_equal(table["fragment_ids"], flat_table["fragment_ids"])
    # a region of any level always ends inside one segment
    segment = dict(zip(table["fragment_ids"].tolist(), table["segment_ids"].tolist()))
    for name in {1: ("0_0_0", "1_1_0"), 2: ("0_0_0",)}[levels]:
      part = get_npz(level_prefix(parts, levels), f"{name}.npz")
      regions, members = part["regions"], part["fragments"]
      for region in np.unique(regions)[:200]:
        assert len({segment[f] for f in members[regions == region].tolist()}) == 1
    assert adapted_rand_error(_segmentation(out), _segmentation(flat)) <= 0.005
  assert edges[2] < edges[1] < 0.8 * edges[0], edges


def test_hierarchical_agglomeration_with_the_interior_bonus_matches_the_flat_one(fib_runs):
  """The reduce stage scores boundaries with the same interior bonus as the global step, so
  the hierarchical segmentation stays the flat one's (within the seamlessness tolerance)."""
  from functools import partial
  from iicats_cv.metrics import adapted_rand_error
  from iicats_cv.tasks.runner import run_tasks
  from iicats_cv.tasks.segmentation import (agglomerate_task, create_reduce_tasks,
                                            create_remap_tasks, level_prefix)
  tiled = fib_runs["tiled"]
  params = {"threshold": 0.5, "interior_bonus": 0.5}
  outs = {}
  for name, prefix in (("flat", ""), ("parts", tiled + "/bonus/parts")):
    if prefix:
      run_tasks(create_reduce_tasks(tiled + "/supervoxels", tiled + "/rag", prefix, (64, 64, 64),
                                    2, threshold=0.5, interior_bonus=0.5), None, 1)
    out = outs[name] = tiled + f"/bonus/{name}"
    run_tasks([partial(agglomerate_task, rag_prefix=tiled + "/rag",
                       supervoxels_path=tiled + "/supervoxels", out_prefix=out, params=params,
                       sweep=[], track=False,
                       hierarchy_prefix=level_prefix(prefix, 1) if prefix else "")], None, 1)
    run_tasks(create_remap_tasks(tiled + "/supervoxels", out + "/segmentation", out,
                                 (64, 64, 64), chunk_size=(16, 16, 16)), None, 1)
  assert adapted_rand_error(_segmentation(outs["parts"]), _segmentation(outs["flat"])) <= 0.005
  # the bonus merged more than the plain run did
  assert len(np.unique(_segmentation(outs["flat"]))) < len(np.unique(_segmentation(tiled)))


def test_contract_stitched_joins_fragments_and_adds_their_statistics():
  from iicats_cv.rag import contract_stitched
  rag = _toy_rag()                          # fragments 1 and 2 are one watershed region
  rag["u"] = np.array([1, 1, 2, 3], np.uint64)
  rag["v"] = np.array([2, 3, 3, 4], np.uint64)
  rag["stitch"] = np.array([1, 0, 0, 0])
  for field, values in (("count", [100, 10, 100, 100]), ("aff_sum", [95.0, 9.0, 90.0, 92.0]),
                        ("aff_min", [0.1, 0.2, 0.3, 0.4]), ("mito_pairs", [0, 0, 0, 10]),
                        ("synapse_pairs", [0, 5, 20, 0])):
    rag[field] = np.array(values)
  nodes, node_of = contract_stitched(rag)
  np.testing.assert_array_equal(node_of, [1, 1, 3, 4])
  np.testing.assert_array_equal(nodes["frag_id"], [1, 3, 4])
  np.testing.assert_array_equal(nodes["frag_size"], [2000, 1000, 1000])
  np.testing.assert_array_equal(nodes["frag_nucleus_voxels"], [800, 0, 900])
  # the two edges into 3 became one, with summed statistics
  np.testing.assert_array_equal(nodes["u"], [1, 3])
  np.testing.assert_array_equal(nodes["v"], [3, 4])
  np.testing.assert_array_equal(nodes["count"], [110, 100])
  np.testing.assert_allclose(nodes["aff_sum"], [99.0, 92.0])
  np.testing.assert_allclose(nodes["aff_min"], [0.2, 0.4])
  np.testing.assert_array_equal(nodes["synapse_pairs"], [25, 0])


def test_face_agreement_marks_voxel_pairs_one_watershed_joins():
  from iicats_cv.watershed import face_agreement
  labels = np.ones((6, 4, 4), np.uint64)
  labels[3:, :2] = 2                  # beyond the high x face, half the face changes fragment
  faces = face_agreement(labels, (1, 0, 0), (3, 4, 4))
  assert set(faces) == {"x_low", "x_high"}
  assert faces["x_low"].all()
  np.testing.assert_array_equal(faces["x_high"][:, 0], [False, False, True, True])


def test_blockwise_ids_unique_and_segmentation_consistent(tmp_path):
  labels, _ = blobs((48, 48, 32), n=6, seed=7)
  out = _segment_volume(tmp_path, labels, (16, 16, 16), "small")
  sv = CloudVolume(out + "/supervoxels")[:, :, :][..., 0]
  # ids of different blocks never collide
  for x0 in (0, 16, 32):
    for x1 in (0, 16, 32):
      if x0 < x1:
        a = set(np.unique(sv[x0:x0 + 16]).tolist())
        b = set(np.unique(sv[x1:x1 + 16]).tolist())
        assert not (a & b)
  seg = CloudVolume(out + "/segmentation")[:, :, :][..., 0]
  # cross-block edges let agglomeration undo the block cuts: few segments per cell
  assert len(np.unique(seg)) <= 3 * len(np.unique(labels))


def test_rerun_gives_byte_identical_layers(tmp_path):
  labels, _ = blobs((32, 32, 32), n=5, seed=2)
  _segment_volume(tmp_path, labels, (16, 16, 16), "run")
  layer_dir = str(tmp_path / "run" / "segmentation")

  def snapshot():
    files = {}
    for root, _, names in os.walk(layer_dir):
      for name in names:
        if name not in ("provenance", "info"):
          with open(os.path.join(root, name), "rb") as fh:
            files[os.path.relpath(os.path.join(root, name), layer_dir)] = fh.read()
    return files

  first = snapshot()
  _segment_volume(tmp_path, labels, (16, 16, 16), "run")
  assert snapshot() == first and first


def test_nan_and_wrong_channel_affinities_rejected(tmp_path):
  from iicats_cv.tasks.segmentation import create_watershed_tasks
  path = "file://" + str(tmp_path / "aff1")
  create_layer(path, layer_type="image", dtype="float32", resolution=(10, 10, 10),
               voxel_offset=(0, 0, 0), volume_size=(16, 16, 16), chunk_size=(16, 16, 16))
  with pytest.raises(IicatsError, match="1 channel"):
    create_watershed_tasks(path, path + "_sv", (16, 16, 16), chunk_size=(16, 16, 16))
  assert not (tmp_path / "aff1_sv").exists()
  nan_path = "file://" + str(tmp_path / "aff_nan")
  cv = create_layer(nan_path, layer_type="image", dtype="float32", resolution=(10, 10, 10),
                    voxel_offset=(0, 0, 0), volume_size=(16, 16, 16), chunk_size=(16, 16, 16),
                    num_channels=3)
  data = np.full((16, 16, 16, 3), 0.9, np.float32)
  data[3, 3, 3, 0] = np.nan
  cv[:, :, :] = data
  tasks = create_watershed_tasks(nan_path, nan_path + "_sv", (16, 16, 16),
                                 chunk_size=(16, 16, 16))
  with pytest.raises(IicatsError, match="NaN"):
    tasks[0]()
  written = CloudVolume(nan_path + "_sv", fill_missing=True)[:, :, :]
  assert not written.any()


def test_histogram_quantile_reads_bin_counts():
  from iicats_cv.agglomerate import _histogram_quantile
  uniform = np.ones(32)
  assert abs(_histogram_quantile(uniform, 0.5) - 0.5) < 1e-9
  assert abs(_histogram_quantile(uniform, 0.75) - 0.75) < 1e-9
  spike = np.zeros(32)
  spike[28] = 10                       # every affinity in [0.875, 0.906)
  assert 0.875 <= _histogram_quantile(spike, 0.1) < _histogram_quantile(spike, 0.9) <= 0.907


def test_quantile_agglomeration_ignores_a_few_strong_pairs_across_a_membrane():
  """Two cells whose boundary is low except for a bright streak (a missed membrane patch):
  the mean crosses the threshold, the median does not."""
  from iicats_cv.errors import IicatsError
  labels = np.ones((16, 8, 8), np.uint64)
  labels[8:] = 2
  affs = np.full((3, 16, 8, 8), 0.95, np.float32)
  affs[0, 8] = 0.05                    # x-affinities across the face between the cells
  affs[0, 8, :3] = 1.0                 # ... bright over 3 of its 8 rows
  rag = merge_rags([block_rag(labels, affs, None, (0, 0, 0), histogram=True)])
  mean = agglomerate(rag, AgglomerationParams(threshold=0.35, use_constraints=False))
  median = agglomerate(rag, AgglomerationParams(threshold=0.35, use_constraints=False,
                                                quantile=0.5))
  assert len(set(mean.segment_ids.tolist())) == 1      # mean 0.41 merges
  assert len(set(median.segment_ids.tolist())) == 2    # median 0.05 keeps them apart
  without = merge_rags([block_rag(labels, affs, None, (0, 0, 0))])
  with pytest.raises(IicatsError, match="histograms"):
    agglomerate(without, AgglomerationParams(quantile=0.5))


def test_unique_pairs_matches_numpy_unique_over_rows():
  from iicats_cv.rag import unique_pairs
  rng = np.random.default_rng(0)
  u, v = rng.integers(0, 30, 500).astype(np.uint64), rng.integers(0, 30, 500).astype(np.uint64)
  pairs, inverse = np.unique(np.stack([u, v], 1), axis=0, return_inverse=True)
  first, second, mine = unique_pairs(u, v)
  np.testing.assert_array_equal(np.stack([first, second], 1), pairs)
  np.testing.assert_array_equal(mine, inverse.ravel())


def test_interior_agglomeration_gives_the_mitochondria_bonus_and_respects_frozen():
  """A part's interior merges use the global step's mitochondria bonus (else the two would
  merge in different orders) and never touch a frozen fragment or a region reaching one."""
  from iicats_cv.agglomerate import agglomerate_interior
  rag = _toy_rag()
  rag["aff_sum"] = np.array([95.0, 90.0, 47.0])        # 3-4: mean 0.47, crossed by a mito
  free = np.zeros(4, bool)
  without = agglomerate_interior(rag, free, threshold=0.5)
  with_bonus = agglomerate_interior(rag, free, 0.5, mito_edge=np.array([False, False, True]),
                                    mito_bonus=0.05)
  assert without.tolist() == [1, 1, 1, 4] and with_bonus.tolist() == [1, 1, 1, 1]
  # 2 is frozen: 1 and 3 have their best boundary to it, so they stay as they are, and so
  # does 4, whose only boundary leads to 3
  frozen = agglomerate_interior(rag, np.array([False, True, False, False]), 0.5,
                                mito_edge=np.array([False, False, True]), mito_bonus=0.05)
  assert frozen.tolist() == [1, 2, 3, 4]


def test_block_rag_and_relabel_keep_each_fragments_interior_affinities():
  """frag_interior_aff_sum / frag_interior_pairs: the affinities between a fragment's own
  voxels (every axis), summing over blocks; when fragments join, their boundary adds in."""
  rng = np.random.default_rng(0)
  frags = np.ones((6, 4, 4), np.uint64)
  frags[3:] = 2
  affs = rng.uniform(0, 1, (3, 6, 4, 4)).astype(np.float32)
  rag = block_rag(frags, affs, None, (0, 0, 0))
  for i, fid in enumerate((1, 2)):
    pairs, total = 0, 0.0
    for axis in range(3):
      hi = [slice(None)] * 3
      lo = [slice(None)] * 3
      hi[axis], lo[axis] = slice(1, None), slice(None, -1)
      same = (frags[tuple(hi)] == fid) & (frags[tuple(lo)] == fid)
      pairs += same.sum()
      total += affs[axis][tuple(hi)][same].sum()
    assert rag["frag_interior_pairs"][i] == pairs
    assert rag["frag_interior_aff_sum"][i] == pytest.approx(total, rel=1e-6)
  # two blocks along z (the second with its one-voxel context) add up to the whole
  low = block_rag(frags[:, :, :2], affs[:, :, :, :2], None, (0, 0, 0))
  high = block_rag(frags[:, :, 1:], affs[:, :, :, 2:], None, (0, 0, 1), (0, 0, 2))
  merged = merge_rags([low, high])
  np.testing.assert_allclose(merged["frag_interior_aff_sum"], rag["frag_interior_aff_sum"],
                             rtol=1e-6)
  np.testing.assert_array_equal(merged["frag_interior_pairs"], rag["frag_interior_pairs"])
  joined = relabel(rag, rag["frag_id"], np.array([1, 1], np.uint64))
  assert len(joined["u"]) == 0
  assert joined["frag_interior_pairs"][0] == rag["frag_interior_pairs"].sum() + rag["count"][0]
  assert joined["frag_interior_aff_sum"][0] == pytest.approx(
    rag["frag_interior_aff_sum"].sum() + rag["aff_sum"][0])


def test_interior_bonus_lowers_the_bar_only_between_two_noisy_regions():
  """A chain 1-2-3 whose boundaries both score 0.35, below the threshold of 0.4: fragments 1
  and 2 are noisy inside (interior mean affinity 0.5), 3 is clean (1.0). With the bonus 1 and
  2 merge (0.35 + 0.25 × 0.5), 3 stays apart (its clean interior gives the boundary nothing),
  and the bonus never overrides a cannot-link."""
  rag = {"u": np.array([1, 2], np.uint64), "v": np.array([2, 3], np.uint64),
         "count": np.array([100, 100]), "aff_sum": np.array([35.0, 35.0]),
         "aff_min": np.zeros(2), "mito_pairs": np.zeros(2), "synapse_pairs": np.zeros(2),
         "frag_id": np.array([1, 2, 3], np.uint64), "frag_size": np.array([1000] * 3),
         "frag_interior_aff_sum": np.array([500.0, 500.0, 1000.0]),
         "frag_interior_pairs": np.array([1000.0, 1000.0, 1000.0])}
  for field in ("nucleus_voxels", "nucleus_sum_x", "nucleus_sum_y", "nucleus_sum_z"):
    rag[f"frag_{field}"] = np.zeros(3)
  plain = agglomerate(rag, AgglomerationParams(threshold=0.4, use_constraints=False))
  assert len(np.unique(plain.segment_ids)) == 3
  bonus = AgglomerationParams(threshold=0.4, use_constraints=False, interior_bonus=0.25)
  seg = agglomerate(rag, bonus).segment_ids
  assert seg[0] == seg[1] and seg[2] != seg[1]
  # the joined region's interior now holds the weak boundary too: its level is about 0.48,
  # so the bar to fragment 3 stays where 3's clean interior puts it
  apart = Constraints(nucleus=np.zeros(3, np.int64), cannot_link=np.array([[0, 1]]),
                      mito_edge=np.zeros(2, bool))
  seg = agglomerate(rag, dataclasses.replace(bonus, use_constraints=True),
                    constraints=apart).segment_ids
  assert seg[0] != seg[1]
  old = {k: v for k, v in rag.items() if not k.startswith("frag_interior")}
  with pytest.raises(IicatsError, match="run the rag stage again"):
    agglomerate(old, bonus)


def test_black_image_regions_get_no_fragments():
  """Black padding (alignment, unwritten chunks) is no tissue: label 0, no fragments or RAG
  nodes there. A dark spot and one missing 40 nm section stay tissue (the model bridges
  missing sections)."""
  from iicats_cv.watershed import image_background
  image = np.full((60, 60, 12), 150, np.uint8)
  image[:20] = 0              # 200 nm of padding at 10 nm
  image[40:43, 10:13] = 0     # a dark spot of 30 nm
  image[:, :, 6] = 0          # one missing section
  background = image_background(image, (10, 10, 40))
  assert background[:20].all() and not background[20:].any()
  affinities = np.full((3, 60, 60, 12), 0.9, np.float32)
  labels = fragments(affinities, (10, 10, 40), background=background)
  assert (labels[:20] == 0).all() and (labels[20:] > 0).all()
  assert image_background(np.zeros((4, 4, 4), np.uint8), (10, 10, 10)).all()
  assert not image_background(np.full((4, 4, 4), 9, np.uint8), (10, 10, 10)).any()
