"""SWC reading/writing and validation, nuclei/synapse CSV readers, kimimaro skeletons of label
volumes, precomputed skeleton layers."""

import numpy as np
import pytest

from iicats_cv.errors import IicatsError
from iicats_cv.metrics import Skeleton
from iicats_cv.skeletons import (load_skeletons, read_nuclei_csv, read_skeleton_layer, read_swc,
                                 read_swc_dir, read_synapses_csv, skeletons_from_labels,
                                 write_swc)

GOOD_SWC = """# a soma and two branches
1 1 0 0 0 5 -1
2 3 10 0 0 1 1
3 3 20 0 0 1 2

4 3 0 10 0 1 1
"""


def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_read_swc(tmp_path):
  sk = read_swc(write(tmp_path, "42.swc", GOOD_SWC))
  assert sk.id == 42
  assert sk.vertices_nm.tolist() == [[0, 0, 0], [10, 0, 0], [20, 0, 0], [0, 10, 0]]
  assert sorted(map(tuple, sk.edges.tolist())) == [(1, 0), (2, 1), (3, 0)]
  assert sk.soma.tolist() == [0]
  assert sk.radii.tolist() == [5, 1, 1, 1]


def test_swc_round_trip(tmp_path):
  vertices = np.array([[1.5, 2, 3], [4, 5, 6.25], [7, 8, 9], [10, 11, 12], [0, 0, 1e6]])
  # node 2 is the soma, in the middle; the forest has two trees (0-1-2-3 and 4 alone)
  sk = Skeleton(7, vertices, [[0, 1], [2, 1], [3, 2]], soma=[2])
  path = write_swc(sk, str(tmp_path / "out" / "7.swc"))
  back = read_swc(path)
  assert back.id == 7
  np.testing.assert_array_equal(back.vertices_nm, vertices)
  assert {tuple(sorted(e)) for e in back.edges.tolist()} == {(0, 1), (1, 2), (2, 3)}
  assert back.soma.tolist() == [2]
  # dicts are accepted too (as made by other modules)
  write_swc({"id": 3, "vertices_nm": vertices[:2], "edges": [[0, 1]]}, str(tmp_path / "3.swc"))
  assert read_swc(str(tmp_path / "3.swc")).vertices_nm.shape == (2, 3)


def test_write_swc_refuses_cycles(tmp_path):
  sk = Skeleton(1, np.zeros((3, 3)), [[0, 1], [1, 2], [2, 0]])
  with pytest.raises(IicatsError, match="not a forest"):
    write_swc(sk, str(tmp_path / "1.swc"))


@pytest.mark.parametrize("text, message", [
  ("1 1 0 0 0 1 -1\n2 3 1 0 0 1\n", r"bad\.swc:2: expected 7 fields"),
  ("1 1 0 0 0 1 -1\n2 3 1 zero 0 1 1\n", r"bad\.swc:2: field 'y' is not a number: 'zero'"),
  ("1 1 0 0 0 1 -1\n2.5 3 1 0 0 1 1\n", r"bad\.swc:2: field 'id' is not an integer"),
  ("1 1 0 0 0 1 -1\n2 3 1 nan 0 1 1\n", r"bad\.swc:2: field 'y' is not finite"),
  ("1 1 0 0 0 1 -1\n2 3 1 0 0 1 1\n# c\n2 3 2 0 0 1 1\n",
   r"bad\.swc:4: node id 2 appears twice \(first on line 2\)"),
  ("1 1 0 0 0 1 -1\n2 3 1 0 0 1 9\n", r"bad\.swc:2: parent 9 of node 2 is not in the file"),
  ("1 1 0 0 0 1 -1\n2 3 1 0 0 1 3\n3 3 1 0 0 1 4\n4 3 1 0 0 1 2\n",
   r"bad\.swc:2: parent links form a cycle"),
  ("1 1 0 0 0 1 -1\n2 3 1 0 0 1 2\n", r"bad\.swc:2: parent links form a cycle \(2 -> 2\)"),
  ("# only comments\n\n", r"bad\.swc: no nodes"),
  ("", r"bad\.swc: no nodes"),
])
def test_malformed_swc(tmp_path, text, message):
  with pytest.raises(IicatsError, match=message):
    read_swc(write(tmp_path, "bad.swc", text))


def test_binary_and_missing_swc(tmp_path):
  path = tmp_path / "bin.swc"
  path.write_bytes(b"\xff\xfe\x00\x01")
  with pytest.raises(IicatsError, match="bin.swc: not a text SWC file"):
    read_swc(str(path))
  with pytest.raises(IicatsError, match="no such SWC file"):
    read_swc(str(tmp_path / "none.swc"))


def test_read_swc_dir(tmp_path):
  write(tmp_path, "5.swc", GOOD_SWC)
  write(tmp_path, "b_neuron.swc", GOOD_SWC)
  write(tmp_path, "a_neuron.SWC", GOOD_SWC)
  write(tmp_path, "notes.txt", "not a skeleton")
  skeletons = read_swc_dir(str(tmp_path))
  # numbered files keep their id; others follow the largest, in name order
  assert [(s.id, s.name) for s in skeletons] == [(5, "5.swc"), (6, "a_neuron.SWC"),
                                                 (7, "b_neuron.swc")]
  assert [s.id for s in load_skeletons("file://" + str(tmp_path))] == [5, 6, 7]


def test_read_swc_dir_errors(tmp_path):
  with pytest.raises(IicatsError, match="no .swc files there"):
    read_swc_dir(str(tmp_path))
  with pytest.raises(IicatsError, match="not a directory"):
    read_swc_dir(str(tmp_path / "missing"))
  write(tmp_path, "1.swc", GOOD_SWC)
  write(tmp_path, "2.swc", "1 1 0 0 0 1 -1\n2 3 x 0 0 1 1\n")
  with pytest.raises(IicatsError, match=r"2\.swc:2: field 'x'"):
    read_swc_dir(str(tmp_path))
  with pytest.raises(IicatsError, match="no such SWC directory"):
    load_skeletons(str(tmp_path / "missing"))


# --------------------------------------------------------------------------------------------
# CSV


def test_nuclei_and_synapse_csv(tmp_path):
  nuclei = read_nuclei_csv(write(tmp_path, "n.csv", "x, y ,Z,id\n1,2,3,a\n\n4.5,5,6,b\n"))
  assert nuclei.tolist() == [[1, 2, 3], [4.5, 5, 6]]
  syn = read_synapses_csv(write(
    tmp_path, "s.csv", "pre_x,pre_y,pre_z,post_x,post_y,post_z\n1,2,3,4,5,6\n"))
  assert syn.shape == (1, 2, 3)
  assert syn[0, 1].tolist() == [4, 5, 6]
  assert read_nuclei_csv(write(tmp_path, "e.csv", "x,y,z\n")).shape == (0, 3)


@pytest.mark.parametrize("reader, text, message", [
  ("nuclei", "a,b,c\n1,2,3\n", r"n\.csv:1: expected columns x,y,z \(nm\), found a,b,c"),
  ("nuclei", "x,y\n1,2\n", r"n\.csv:1: .*missing z"),
  ("nuclei", "x,y,z\n1,2,3\n1,two,3\n", r"n\.csv:3: column 'y' is not a number: 'two'"),
  ("nuclei", "x,y,z\n1,2\n", r"n\.csv:2: expected 3 fields, got 2"),
  ("nuclei", "x,y,z\n1,inf,2\n", r"n\.csv:2: column 'y' is not finite"),
  ("nuclei", "", r"n\.csv: empty"),
  ("synapses", "x,y,z\n1,2,3\n", r"n\.csv:1: expected columns pre_x,pre_y,pre_z,post_x"),
])
def test_csv_errors(tmp_path, reader, text, message):
  read = read_nuclei_csv if reader == "nuclei" else read_synapses_csv
  with pytest.raises(IicatsError, match=message):
    read(write(tmp_path, "n.csv", text))
  with pytest.raises(IicatsError, match="no such nuclei file"):
    read_nuclei_csv(str(tmp_path / "missing.csv"))


# --------------------------------------------------------------------------------------------
# kimimaro and precomputed skeleton layers


def test_skeletons_from_labels_positions_in_layer_frame():
  labels = np.zeros((48, 16, 8), np.uint32)
  labels[4:44, 5:11, 2:6] = 3        # a rod along x
  labels[20:26, 11:16, 2:6] = 0
  labels[5:9, 0:4, 1:7] = 9          # small blob, kept (dust_threshold below it)
  resolution = np.array([4.0, 4.6, 40.0])
  offset = np.array([10, 20, 3])
  skeletons = skeletons_from_labels(labels, resolution, offset_vx=offset, dust_threshold=10)
  assert [s.id for s in skeletons] == [3, 9]
  rod = skeletons[0]
  voxels = np.floor(rod.vertices_nm / resolution).astype(int) - offset
  assert np.all(labels[tuple(voxels.T)] == 3)  # every node lies in its own label
  assert len(rod.edges) >= 1
  extent = rod.vertices_nm[:, 0].max() - rod.vertices_nm[:, 0].min()
  assert extent > 30 * resolution[0]  # spans most of the rod
  with pytest.raises(IicatsError, match="3D integer"):
    skeletons_from_labels(np.zeros((4, 4)), resolution)


def test_shipped_fib_skeletons_are_kimimaros_of_the_crop():
  """The demo reads its ground-truth skeletons from the package instead of skeletonising the
  crop on every run: they must be what skeletons_from_labels gives today (rerun
  datasets.write_fib_crop_skeletons() when it changes). Three labels, each recomputed alone:
  kimimaro skeletonises each label on its own, so the others are zeroed to keep this quick."""
  from iicats_cv.datasets import load_fib_crop, load_fib_crop_skeletons
  _, neurons, resolution = load_fib_crop()
  shipped = {s.id: s for s in load_fib_crop_skeletons()}
  ids, counts = np.unique(neurons[neurons > 0], return_counts=True)
  assert set(shipped) <= set(ids.tolist()) and len(shipped) >= 60
  chosen = [i for i in ids[np.argsort(counts)].tolist() if i in shipped][:3]  # smallest
  subset = np.where(np.isin(neurons, chosen), neurons, 0).astype(neurons.dtype)
  recomputed = skeletons_from_labels(subset, resolution)
  assert [s.id for s in recomputed] == sorted(chosen)
  for skeleton in recomputed:
    expected = shipped[skeleton.id]
    assert np.array_equal(skeleton.vertices_nm, expected.vertices_nm)
    assert np.array_equal(skeleton.edges, expected.edges)
    assert np.array_equal(skeleton.radii, expected.radii)


def make_skeleton_layer(path, skeletons):
  from cloudvolume import CloudVolume, Skeleton as CvSkeleton
  info = CloudVolume.create_new_info(1, "segmentation", "uint64", "raw", [4, 4, 40], [0, 0, 0],
                                     [64, 64, 8], chunk_size=[64, 64, 8], skeletons="skeletons")
  cv = CloudVolume(path, info=info, progress=False)
  cv.commit_info()
  cv.skeleton.meta.commit_info()
  for segid, vertices, edges, types in skeletons:
    cv.skeleton.upload(CvSkeleton(vertices, edges, segid=segid, vertex_types=types,
                                  radii=np.ones(len(vertices))))


def test_read_skeleton_layer(tmp_path):
  path = "file://" + str(tmp_path / "seg")
  make_skeleton_layer(path, [
    (7, [[100, 100, 200], [140, 100, 200], [180, 100, 240]], [[0, 1], [1, 2]], [1, 0, 0]),
    (12, [[0, 0, 0], [8, 0, 0]], [[0, 1]], [3, 3]),
  ])
  skeletons = read_skeleton_layer(path)
  assert [s.id for s in skeletons] == [7, 12]
  assert skeletons[0].vertices_nm[2].tolist() == [180, 100, 240]
  assert skeletons[0].soma.tolist() == [0]
  assert skeletons[1].soma.tolist() == []
  assert [s.id for s in read_skeleton_layer(path, ids=[12])] == [12]
  assert [s.id for s in load_skeletons(str(tmp_path / "seg"))] == [7, 12]
  with pytest.raises(IicatsError, match=r"no skeleton 99 \(it has 2: 7, 12\)"):
    read_skeleton_layer(path, ids=[99])


def test_sharded_skeleton_layer_and_chosen_ids(tmp_path):
  """Igneous writes sharded skeletons by default: their ids come from the shard indices.
  Ground truth often holds only some proofread neurons: --skeleton-ids picks them."""
  from click.testing import CliRunner
  from cloudvolume import CloudVolume
  from iicats_cv.cli import cli
  from iicats_cv.evaluate import evaluate_command
  labels = np.zeros((64, 32, 16), np.uint32)
  labels[2:62, 2:10, 4:12] = 5
  labels[2:62, 14:22, 4:12] = 8
  labels[2:62, 24:30, 4:12] = 11
  path = "file://" + str(tmp_path / "gt")
  info = CloudVolume.create_new_info(1, "segmentation", "uint32", "compressed_segmentation",
                                     [8, 8, 8], [0, 0, 0], list(labels.shape),
                                     chunk_size=[32, 32, 16])
  cv = CloudVolume(path, info=info, progress=False)
  cv.commit_info()
  cv[:, :, :] = labels
  result = CliRunner().invoke(cli, ["skeleton", path, "-p", "1", "--task-shape", "64,64,64"])
  assert result.exit_code == 0, result.output
  assert CloudVolume(path).skeleton.meta.is_sharded()
  assert [s.id for s in read_skeleton_layer(path)] == [5, 8, 11]
  assert [s.id for s in load_skeletons(path, ids=[11, 5])] == [5, 11]
  ids = tmp_path / "proofread.txt"
  ids.write_text("5\n11\n")
  result = CliRunner().invoke(evaluate_command, [path, "--skeletons", path,
                                                 "--skeleton-ids", str(ids)])
  assert result.exit_code == 0, result.output
  assert "over 2 skeletons" in result.output
  result = CliRunner().invoke(evaluate_command, [path, "--skeletons", path,
                                                 "--skeleton-ids", "5,6"])
  assert result.exit_code == 1 and "no skeleton 6 (it has 3: 5, 8, 11)" in result.output


def test_chosen_ids_of_an_swc_directory(tmp_path):
  for number in (3, 4):
    write_swc(Skeleton(id=number, vertices_nm=np.array([[0.0, 0, 0], [10, 0, 0]]),
                       edges=np.array([[0, 1]])), str(tmp_path / f"{number}.swc"))
  assert [s.id for s in load_skeletons(str(tmp_path), ids=[4])] == [4]
  with pytest.raises(IicatsError, match=r"no skeleton 9 \(ids there: 3, 4\)"):
    load_skeletons(str(tmp_path), ids=[9])


def test_read_skeleton_layer_without_skeletons(tmp_path):
  from cloudvolume import CloudVolume
  info = CloudVolume.create_new_info(1, "segmentation", "uint64", "raw", [4, 4, 40], [0, 0, 0],
                                     [8, 8, 8])
  path = "file://" + str(tmp_path / "plain")
  CloudVolume(path, info=info).commit_info()
  with pytest.raises(IicatsError, match="names no 'skeletons' source"):
    read_skeleton_layer(path)
