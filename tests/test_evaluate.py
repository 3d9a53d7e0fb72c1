"""Segment lookup on a precomputed layer (anisotropic, voxel offset, several chunks), the
evaluate() results on a hand-worked case, the HTML report and the `evaluate` command."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from cloudvolume import CloudVolume

from iicats_cv.errors import IicatsError
from iicats_cv.evaluate import (evaluate, evaluate_command, evaluate_tables, lookup_segments,
                                metric_rows, position_linker, summary_line, write_report)
from iicats_cv.metrics import Skeleton, adapted_rand_error, voi
from iicats_cv.skeletons import write_swc

RES = np.array([4.0, 4.0, 40.0])
OFFSET = np.array([10, 20, 3])
SHAPE = (64, 48, 12)


def labels():
  """(x, y, z) local voxels: y < 24: x < 32 -> 1, x >= 32 -> 2 (z < 8) or 4 (z >= 8);
  y >= 24 -> 3."""
  seg = np.zeros(SHAPE, np.uint64)
  seg[:32, :24] = 1
  seg[32:, :24, :8] = 2
  seg[32:, :24, 8:] = 4
  seg[:, 24:] = 3
  return seg


def write_layer(path, array, chunk=(16, 16, 4)):
  info = CloudVolume.create_new_info(1, "segmentation", "uint64", "compressed_segmentation",
                                     RES.tolist(), OFFSET.tolist(), list(SHAPE), chunk_size=chunk)
  cv = CloudVolume(path, info=info, progress=False, compress=False)
  cv.commit_info()
  cv[:, :, :] = array
  return path


@pytest.fixture
def seg_layer(tmp_path):
  return write_layer("file://" + str(tmp_path / "seg"), labels())


def nm(*local_voxels):
  """Voxel centres (local voxel coordinates) -> nm in the layer frame."""
  return (np.array(local_voxels, float) + OFFSET + 0.5) * RES


def test_lookup_anisotropic_offset_and_outside(seg_layer):
  points = np.concatenate([
    nm((5, 5, 2), (40, 5, 2), (40, 5, 9), (5, 30, 11), (63, 47, 11)),
    [OFFSET * RES,                       # first voxel's corner: inside, segment 1
     OFFSET * RES - [0.01, 0, 0],        # just below the offset in x: outside
     (OFFSET + SHAPE) * RES,             # one past the end: outside
     [1e12, 0, 0], [np.nan, 0, 0]],      # far away, not a number: outside
  ])
  ids, inside = lookup_segments(seg_layer, points, return_inside=True)
  assert ids.dtype == np.uint64
  assert ids.tolist() == [1, 2, 4, 3, 3, 1, 0, 0, 0, 0]
  assert inside.tolist() == [True] * 6 + [False] * 4
  # z at 40 nm: z = 3 * 40 nm is local 0, 3 * 40 + 39.9 still local 0, 160 nm local 1
  z_points = np.array([[11 * 4.0, 21 * 4.0, 3 * 40 + 39.9], [44.0, 84.0, 160.0]])
  assert lookup_segments(seg_layer, z_points).tolist() == [1, 1]
  assert lookup_segments(seg_layer, np.zeros((0, 3))).tolist() == []


def test_lookup_reads_only_needed_chunks(seg_layer):
  cv = CloudVolume(seg_layer, progress=False)
  calls = []
  download = cv.download

  def counting(bbox, mip=None, **kw):
    calls.append((tuple(bbox.minpt), tuple(bbox.maxpt)))
    return download(bbox, mip=mip, **kw)
  cv.download = counting
  # 100 points in one chunk, 1 in another: two chunk-sized reads
  points = np.concatenate([nm(*[(1 + k % 10, 2 + k // 10, 1) for k in range(100)]),
                           nm((50, 40, 10))])
  ids = lookup_segments(cv, points)
  assert ids.tolist() == [1] * 100 + [3]
  assert sorted(calls) == [((10, 20, 3), (26, 36, 7)), ((58, 52, 11), (74, 68, 15))]


def test_lookup_errors(tmp_path, seg_layer):
  with pytest.raises(IicatsError, match="no precomputed 'info'"):
    lookup_segments("file://" + str(tmp_path / "none"), np.zeros((1, 3)))
  with pytest.raises(IicatsError, match="has no mip 3"):
    lookup_segments(seg_layer, np.zeros((1, 3)), mip=3)


def ground_truth(tmp_path):
  """Three skeletons (SWC), nuclei and synapse CSVs on the `labels()` layer.

  skeleton 1: x = 5, 15, 25, 35, 45 at y 5, z 2 -> segments 1 1 1 2 2; edges of 10 voxels =
    40 nm: L = 160, runs 80 (segment 1) and 40 (segment 2).
  skeleton 2 (nucleus node 0): x = 5, 15, 25 at y 30, z 2, then z 6 at x 25 -> all segment 3;
    L = 2 * 40 + 4 * 40 (z edge, 40 nm voxels) = 240: one run of 240.
  skeleton 3: x = 60 (segment 4) and x = 70 (outside the layer -> 0) at y 5, z 9: L = 40,
    no correct edge.
  L = 440; ERL = (80^2 + 40^2 + 240^2) / 440 = 65600 / 440.
  """
  sk = [Skeleton(1, nm(*[(x, 5, 2) for x in (5, 15, 25, 35, 45)]),
                 [[0, 1], [1, 2], [2, 3], [3, 4]]),
        Skeleton(2, nm((5, 30, 2), (15, 30, 2), (25, 30, 2), (25, 30, 6)),
                 [[0, 1], [1, 2], [2, 3]], soma=[0]),
        Skeleton(3, nm((60, 5, 9), (70, 5, 9)), [[0, 1]])]
  swc_dir = tmp_path / "swc"
  for s in sk:
    write_swc(s, str(swc_dir / f"{s.id}.swc"))
  nuclei = tmp_path / "nuclei.csv"
  # skeleton 2's nucleus, and the nucleus of an unskeletonised cell also in segment 3
  rows = "\n".join(",".join(f"{v:.3f}" for v in p) for p in nm((5, 30, 2), (60, 40, 5)))
  nuclei.write_text("x,y,z\n" + rows + "\n")
  synapses = tmp_path / "synapses.csv"
  pre_post = np.concatenate([nm((10, 5, 2)), nm((20, 5, 2))], axis=1)  # both in segment 1
  synapses.write_text("pre_x,pre_y,pre_z,post_x,post_y,post_z\n"
                      + ",".join(f"{v:.3f}" for v in pre_post[0]) + "\n")
  return sk, str(swc_dir), str(nuclei), str(synapses)


def test_points_in_another_frame_are_named(tmp_path, seg_layer, capsys):
  """Ground truth in µm (or of another volume) lies outside the layer: every node outside is
  refused (ERL would be 0), most nuclei outside noted."""
  sk, _, _, _ = ground_truth(tmp_path)
  in_um = [Skeleton(s.id, s.vertices_nm / 1000, s.edges) for s in sk]
  with pytest.raises(IicatsError, match="11 of the 11 skeleton nodes lie outside"):
    evaluate(seg_layer, skeletons=in_um)
  far_nuclei = np.concatenate([nm((5, 30, 2)), nm((5, 30, 2)) + 1e6, nm((5, 30, 2)) + 1e6])
  r = evaluate(seg_layer, skeletons=sk, nuclei=far_nuclei)
  assert r["n_nuclei_outside"] == 2
  assert "2 of the 3 nuclei lie outside the segmentation" in capsys.readouterr().out
  evaluate(seg_layer, skeletons=sk)  # one node of eleven outside: no note
  assert "outside" not in capsys.readouterr().out


def test_skeletons_cropped_to_the_layer(tmp_path, seg_layer, capsys):
  """--crop-skeletons (and pipeline --bounds): skeleton 3's node beyond the layer and its
  edge are left out instead of counting as a split: L = 400, ERL = 65600 / 400."""
  sk, swc_dir, _, _ = ground_truth(tmp_path)
  r = evaluate(seg_layer, skeletons=swc_dir, crop_skeletons=True)
  assert r["total_length"] == pytest.approx(400) and r["erl"] == pytest.approx(65600 / 400)
  assert r["n_nodes_outside"] == 0 and r["skeletons_cropped"]
  assert "1 of their 11 nodes lie outside it and are left out" in capsys.readouterr().out
  result = CliRunner().invoke(evaluate_command, [seg_layer, "--skeletons", swc_dir,
                                                 "--crop-skeletons"])
  assert result.exit_code == 0 and "left out" in result.output
  far = [Skeleton(s.id, s.vertices_nm + 1e6, s.edges) for s in sk]
  with pytest.raises(IicatsError, match="none of the 11 skeleton nodes lies in the segment"):
    evaluate(seg_layer, skeletons=far, crop_skeletons=True)


def test_evaluate_hand_case(tmp_path, seg_layer):
  sk, swc_dir, nuclei, synapses = ground_truth(tmp_path)
  r = evaluate(seg_layer, skeletons=swc_dir)
  assert r["total_length"] == pytest.approx(440)
  assert r["erl"] == pytest.approx(65600 / 440)
  assert r["berl"] == pytest.approx(65600 / 440)  # no nuclei or synapses given
  assert r["nerl"] == pytest.approx(240)          # skeleton 2 traced whole from its nucleus
  assert r["n_nodes_outside"] == 1
  assert r["n_split_edges"] == 1
  split = r["splits"][0]
  assert split["skeleton"] == 1 and split["segments"] == [1, 2]
  np.testing.assert_allclose(split["position"], nm((30, 5, 2))[0])
  assert r["resolution_nm"] == RES.tolist()
  json.dumps(r)  # JSON-able

  # + nuclei: segment 3 holds two nuclei -> skeleton 2's run is incorrect for bERL/nERL
  # bERL = (80^2 + 40^2) / 440 = 8000 / 440; nERL = 0
  r = evaluate(seg_layer, skeletons=swc_dir, nuclei=nuclei)
  assert r["erl"] == pytest.approx(65600 / 440)
  assert r["berl"] == pytest.approx(8000 / 440)
  assert r["nerl"] == 0.0
  assert r["skeletons"][1]["nucleus_fraction"] == 0.0
  (v,) = r["violations"]
  assert (v["segment"], v["kind"], v["count"]) == (3, "nuclei", 2)
  np.testing.assert_allclose(v["position"], nm((5, 30, 2))[0], atol=1e-3)

  # + synapse with pre and post in segment 1: bERL = 40^2 / 440
  r = evaluate(seg_layer, skeletons=sk, nuclei=nuclei, synapses=synapses)
  assert r["berl"] == pytest.approx(1600 / 440)
  assert {(v["segment"], v["kind"]) for v in r["violations"]} == {(3, "nuclei"),
                                                                  (1, "synapse")}
  assert r["berl"] <= r["erl"]
  rows = dict(metric_rows(r))
  assert rows["segments with two or more GT nuclei"] == "1"
  assert rows["GT synapses with both partners in one segment"] == "1"
  assert "2 violating (1 merged synapse(s))" in summary_line(r)
  # without ground-truth synapses there is nothing to count
  r = evaluate(seg_layer, skeletons=sk, nuclei=nuclei)
  assert "GT synapses with both partners in one segment" not in dict(metric_rows(r))
  assert "segments with two or more GT nuclei" in dict(metric_rows(r))
  assert "merged synapse" not in summary_line(r)


def test_evaluate_tables_match_evaluate_and_count_violations(tmp_path, seg_layer):
  # the layer as supervoxels; table 0.5 keeps each segment, table 0.3 also merges 2 into 1
  sk, swc_dir, nuclei, synapses = ground_truth(tmp_path)
  ids = np.array([1, 2, 3, 4], np.uint64)
  tables = {0.5: (ids, ids), 0.3: (ids, np.array([1, 1, 3, 4], np.uint64))}
  low, high = evaluate_tables(seg_layer, tables, swc_dir, nuclei, synapses)
  whole = evaluate(seg_layer, skeletons=sk, nuclei=nuclei, synapses=synapses)
  assert high["threshold"] == 0.5
  for key in ("erl", "berl", "nerl"):
    assert high[key] == pytest.approx(whole[key])
  # segment 3 holds two nuclei, segment 1 both partners of the synapse, in both tables
  for row in (low, high):
    assert (row["n_nucleus_violating_segments"], row["n_merged_synapses"]) == (1, 1)
  # without nuclei or synapses there is nothing to count
  (row,) = evaluate_tables(seg_layer, {0.5: (ids, ids)}, swc_dir)
  assert "n_nucleus_violating_segments" not in row and "n_merged_synapses" not in row
  # merging 2 into 1 joins skeleton 1's runs into one, but in the violating segment 1: ERL
  # gains, and bERL loses the 40 nm run that lay in segment 2 (its only correct run)
  assert low["erl"] > high["erl"]
  assert (high["berl"], low["berl"]) == (pytest.approx(1600 / 440), 0.0)


def test_evaluate_merge_and_pooled(tmp_path, seg_layer):
  # skeleton 1 in segment 1 at x 5, 15; skeleton 2 at x 25 (segment 1), 35, 45 (segment 2):
  # segment 1 merges skeletons 1 and 2; the merge location is skeleton 2's node in it.
  sk = [Skeleton(1, nm((5, 5, 2), (15, 5, 2)), [[0, 1]]),
        Skeleton(2, nm((25, 10, 2), (35, 10, 2), (45, 10, 2)), [[0, 1], [1, 2]])]
  # L = 40 + 80; correct: skeleton 2's 35-45 (segment 2) only: ERL = 40^2 / 120
  r = evaluate(seg_layer, skeletons=sk)
  assert r["merging_segments"] == [1]
  assert r["erl"] == pytest.approx(1600 / 120)
  (v,) = r["violations"]
  assert v["kind"] == "merge" and v["skeletons"] == [1, 2]
  np.testing.assert_allclose(v["position"], nm((25, 10, 2))[0])
  # pooled: one skeleton in segment 1 twice, apart: x 5-15 (1), 40 (2), 20-25 (1)
  sk = [Skeleton(1, nm((5, 5, 2), (15, 5, 2), (40, 5, 2), (20, 6, 2), (25, 6, 2)),
                 [[0, 1], [1, 2], [2, 3], [3, 4]])]
  # edges: 40 nm (1-1), split, split, 20 nm (1-1); L = 40 + 100 + ~80 + 20.
  # connected runs 40 and 20; pooled: 60 nm in segment 1
  cc = evaluate(seg_layer, skeletons=sk)
  pooled = evaluate(seg_layer, skeletons=sk, pooled=True)
  length = cc["total_length"]
  assert cc["erl"] == pytest.approx((40 ** 2 + 20 ** 2) / length)
  assert pooled["erl"] == pytest.approx(60 ** 2 / length)
  assert pooled["pooled"] is True


def test_evaluate_dense_labels(tmp_path, seg_layer):
  gt = labels()
  gt[:, :24, 8:] = 1             # GT: segments 1 and 4 are one cell (a false split)
  gt[:, 36:] = 5                 # GT: segment 3 is two cells (a false merge)
  gt[:, :, 0] = 0                # unlabelled slice
  gt_path = write_layer("file://" + str(tmp_path / "gt"), gt)
  r = evaluate(seg_layer, gt_labels=gt_path)
  split, merge = voi(labels(), gt)
  assert r["voi_split"] == pytest.approx(split)
  assert r["voi_merge"] == pytest.approx(merge)
  assert r["arand"] == pytest.approx(adapted_rand_error(labels(), gt))
  assert r["voi_split"] > 0 and r["voi_merge"] > 0
  assert r["erl"] is None and r["total_length"] is None
  assert dict(metric_rows(r))["merging segments"] == "–"  # not measured, not 0


def test_evaluate_dense_labels_at_the_scale_of_the_segmentations_resolution(tmp_path,
                                                                            seg_layer):
  """Ground truth at 2×2×40 nm with a 4×4×40 nm mip (as `iicats downsample` makes it) scores a
  segmentation made at that mip (`--mip 1`) on the matching scale."""
  gt = labels()
  gt[:, 36:] = 5
  fine = CloudVolume.create_new_info(1, "segmentation", "uint64", "compressed_segmentation",
                                     [2, 2, 40], (OFFSET * [2, 2, 1]).tolist(),
                                     [SHAPE[0] * 2, SHAPE[1] * 2, SHAPE[2]], chunk_size=[16, 16, 4])
  path = "file://" + str(tmp_path / "gt")
  cv = CloudVolume(path, info=fine, progress=False, compress=False)
  cv.add_scale([2, 2, 1], chunk_size=[16, 16, 4])
  cv.commit_info()
  CloudVolume(path, mip=1, progress=False, compress=False)[:, :, :] = gt
  r = evaluate(seg_layer, gt_labels=path)
  assert r["arand"] == pytest.approx(adapted_rand_error(labels(), gt)) and r["arand"] > 0
  assert r["dense_bbox_vx"] == [OFFSET.tolist(), (OFFSET + SHAPE).tolist()]


def test_evaluate_boundary_tolerance(tmp_path, seg_layer):
  gt = labels()
  gt[32] = gt[31]                # GT draws the x interface one voxel (4 nm) further
  gt_path = write_layer("file://" + str(tmp_path / "gt"), gt)
  r = evaluate(seg_layer, gt_labels=gt_path, boundary_tolerance_nm=4)
  assert r["voi_split"] > 0 and r["voi_merge"] > 0 and r["arand"] > 0
  assert r["voi_split_tolerant"] == r["voi_merge_tolerant"] == r["arand_tolerant"] == 0.0
  assert r["boundary_tolerance_nm"] == 4.0 and 0.8 < r["tolerant_voxel_fraction"] < 1
  assert "left out (9" in summary_line(r) and "of the voxels scored): VOI 0.0000 / 0.0000" \
    in summary_line(r)
  assert ("VOI split, tolerant", "0.0000") in metric_rows(r)
  assert "voi_split_tolerant" not in evaluate(seg_layer, gt_labels=gt_path)
  with pytest.raises(IicatsError, match="needs ground-truth labels"):
    evaluate(seg_layer, skeletons=[], boundary_tolerance_nm=4)
  with pytest.raises(IicatsError, match="at least one voxel"):
    evaluate(seg_layer, gt_labels=gt_path, boundary_tolerance_nm=3)
  out = tmp_path / "m.json"
  result = CliRunner().invoke(evaluate_command, [seg_layer, "--gt-labels", gt_path,
                                                 "--boundary-tolerance-nm", "8",
                                                 "--json", str(out)])
  assert result.exit_code == 0, result.output
  assert json.loads(out.read_text())["arand_tolerant"] == 0.0
  assert "say little" not in result.output
  # 200 nm masks all but a few voxels of this layer: said so
  result = CliRunner().invoke(evaluate_command, [seg_layer, "--gt-labels", gt_path,
                                                 "--boundary-tolerance-nm", "200"])
  assert result.exit_code == 0 and "the *_tolerant scores say little" in result.output


def test_evaluate_input_errors(tmp_path, seg_layer):
  with pytest.raises(IicatsError, match="nothing to evaluate"):
    evaluate(seg_layer)
  bad = tmp_path / "bad.csv"
  bad.write_text("a,b,c\n1,2,3\n")
  with pytest.raises(IicatsError, match=r"bad\.csv:1: expected columns x,y,z"):
    evaluate(seg_layer, skeletons=[], nuclei=str(bad))
  with pytest.raises(IicatsError, match="rows of 6 coordinates"):
    evaluate(seg_layer, skeletons=[], synapses=np.zeros((2, 5)))
  other = CloudVolume.create_new_info(1, "segmentation", "uint64", "raw", [8, 8, 40],
                                      [0, 0, 0], [8, 8, 8])
  CloudVolume("file://" + str(tmp_path / "other"), info=other).commit_info()
  with pytest.raises(IicatsError, match=r"no scale at the segmentation.s \(mip 0\) resolution "
                                        r"4×4×40 nm \(its scales: 8×8×40 nm\)"):
    evaluate(seg_layer, gt_labels="file://" + str(tmp_path / "other"))
  # a damaged compressed_segmentation chunk of the ground truth: named, not a crash
  gt_path = write_layer("file://" + str(tmp_path / "gt"), labels())
  chunk = next((tmp_path / "gt").glob("*/10-26_20-36_3-7"))
  chunk.write_bytes(b"\x07" * 100)
  with pytest.raises(IicatsError, match=rf"ground-truth labels {gt_path}: chunk "
                                        r"\S+/10-26_20-36_3-7 is corrupt"):
    evaluate(seg_layer, gt_labels=gt_path)


def test_report(tmp_path, seg_layer):
  _, swc_dir, nuclei, synapses = ground_truth(tmp_path)
  r = evaluate(seg_layer, skeletons=swc_dir, nuclei=nuclei, synapses=synapses)
  sweep = [{"threshold": t, "erl": 100 * t, "berl": 90 * t, "nerl": 50 * t}
           for t in (0.3, 0.5, 0.7)]
  baseline = [{"threshold": t, "erl": 80 * t, "berl": 70 * t, "nerl": 40 * t}
              for t in (0.3, 0.5, 0.7)]
  path = write_report(r, str(tmp_path / "report"), sweep=sweep, baseline_sweep=baseline,
                      link_for_position=lambda p: f"https://ng.example/#pos={p[0]:.0f}")
  page = open(path).read()
  assert page.count("data:image/png;base64,") == 3
  # the baseline's sweep beside the constrained one: 0.5 × 70 nm = 0.035 µm
  assert "<th>baseline bERL</th>" in page and "<td>0.035 µm</td>" in page
  for name in ("run_lengths.png", "nucleus_completeness.png", "threshold_sweep.png"):
    assert os.path.getsize(tmp_path / "report" / name) > 1000
  assert "https://ng.example/#pos=" in page
  assert "holds 2 nuclei" in page and "synapse" in page
  # without a link function: plain coordinates
  page = open(write_report(r, str(tmp_path / "plain"))).read()
  assert "<a href" not in page and ") nm" in page


def test_position_linker():
  import neuroglancer
  state = neuroglancer.ViewerState()
  state.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm",
                                                  scales=[4, 4, 40])
  url = neuroglancer.to_url(state, prefix="https://ng.example/")
  link = position_linker(url)
  moved = neuroglancer.parse_url(link([40, 80, 400]))
  assert list(moved.position) == pytest.approx([10, 20, 10])
  assert position_linker("https://ng.example/") is None
  assert position_linker(None) is None


def test_evaluate_command(tmp_path, seg_layer):
  _, swc_dir, nuclei, synapses = ground_truth(tmp_path)
  out = tmp_path / "out" / "metrics.json"
  result = CliRunner().invoke(evaluate_command, [
    seg_layer, "--skeletons", swc_dir, "--nuclei", nuclei, "--synapses", synapses,
    "--json", str(out), "--report", str(tmp_path / "report")])
  assert result.exit_code == 0, result.output
  data = json.loads(out.read_text())
  assert data["erl"] == pytest.approx(65600 / 440)
  assert "bERL" in result.output and "ERL 0.149 µm" in result.output
  assert (tmp_path / "report" / "index.html").exists()
  printed_only = CliRunner().invoke(evaluate_command, [seg_layer, "--skeletons", swc_dir])
  assert printed_only.exit_code == 0 and "ERL 0.149 µm" in printed_only.output
  help_text = CliRunner().invoke(evaluate_command, ["--help"]).output
  assert "Example:" in help_text and "--gt-labels" in help_text


def test_evaluate_command_errors(tmp_path, seg_layer):
  runner = CliRunner()
  result = runner.invoke(evaluate_command, [seg_layer, "--skeletons", str(tmp_path),
                                            "--json", str(tmp_path / "m.json")])
  assert result.exit_code == 1 and "no .swc files there" in result.output
  assert not (tmp_path / "m.json").exists()
  result = runner.invoke(evaluate_command, [seg_layer, "--json", str(tmp_path / "m.json")])
  assert result.exit_code == 1 and "--skeletons and/or --gt-labels" in result.output


def test_ground_truth_covering_part_of_the_segmentation_is_said(tmp_path, seg_layer, capsys):
  half = (SHAPE[0] // 2,) + tuple(SHAPE[1:])
  info = CloudVolume.create_new_info(1, "segmentation", "uint64", "compressed_segmentation",
                                     RES.tolist(), OFFSET.tolist(), list(half),
                                     chunk_size=(16, 16, 4))
  path = "file://" + str(tmp_path / "half")
  cv = CloudVolume(path, info=info, progress=False, compress=False)
  cv.commit_info()
  cv[:, :, :] = labels()[:half[0]]
  r = evaluate(seg_layer, gt_labels=path)
  assert r["dense_voxels"] == int(np.prod(half))
  assert "cover 50% of the segmentation" in capsys.readouterr().out
  evaluate(seg_layer, gt_labels=seg_layer)
  assert "cover" not in capsys.readouterr().out
