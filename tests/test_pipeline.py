"""End to end: the synthetic demo through an fq:// queue; contract of the summary; every layer
readable by CloudVolume and by tensorstore; resume skips finished stages."""
import json
import os

import numpy as np
import pytest
import tensorstore as ts
from click.testing import CliRunner
from cloudvolume import CloudVolume

from iicats_cv.cli import cli

LAYERS = ("image", "affinities", "organelles", "supervoxels", "segmentation")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  out = root / "run"
  summary_path = root / "summary.json"
  queue = "fq://" + str(root / "queue")
  result = CliRunner().invoke(cli, [
    "demo", "--dataset", "synthetic", "--out", str(out), "--queue", queue, "-p", "1",
    "--task-shape", "64,64,64", "--json", str(summary_path)])
  assert result.exit_code == 0, result.output
  with open(summary_path) as fh:
    return out, json.load(fh), result.output, queue


def test_summary_contract(demo_run):
  out, summary, output, _ = demo_run
  assert set(LAYERS) <= set(summary["layers"])
  assert summary["neuroglancer_url"].startswith("http")
  for name in ("erl", "berl", "nerl", "arand", "voi_split", "voi_merge"):
    assert isinstance(summary["metrics"][name], float), name
  assert summary["metrics"]["berl"] <= summary["metrics"]["erl"] + 1e-9
  for stage in ("inference", "watershed", "rag", "agglomerate", "remap", "mesh", "skeleton"):
    assert summary["timings"][stage] >= 0
  assert "Neuroglancer:" in output and "done:" in output


def test_link_state_has_every_layer_and_tracked_neurons(demo_run):
  _, summary, _, _ = demo_run
  import neuroglancer
  state = neuroglancer.parse_url(summary["neuroglancer_url"])
  names = [layer.name for layer in state.layers]
  for name in LAYERS:
    assert name in names, names
  tracked = [n["id"] for n in summary["tracked"]]
  assert tracked, "the synthetic volume has nuclei: tracking must find neurons"
  selected = {int(s) for s in state.layers["segmentation"].segments}
  assert set(tracked) <= selected


def test_every_layer_opens_in_cloudvolume_and_tensorstore(demo_run):
  _, summary, _, _ = demo_run
  for name in LAYERS + ("segmentation_baseline",):
    path = summary["layers"][name]
    cv = CloudVolume(path)
    data = cv[cv.bounds]
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": path + "/"}).result()
    np.testing.assert_array_equal(np.asarray(store.read().result()), np.asarray(data))
    assert cv.provenance.processing, f"{name} has no provenance"
  for name in ("image", "segmentation"):
    assert len(CloudVolume(summary["layers"][name]).available_mips) >= 2


def test_tracked_neurons_have_meshes_and_skeletons(demo_run):
  _, summary, _, _ = demo_run
  cv = CloudVolume(summary["layers"]["segmentation"])
  for neuron in summary["tracked"]:
    assert len(cv.mesh.get(neuron["id"]).vertices) > 0
    assert len(cv.skeleton.get(neuron["id"]).vertices) > 0


def test_rerun_resumes_and_skips_finished_stages(demo_run):
  out, summary, _, queue = demo_run
  result = CliRunner().invoke(cli, ["demo", "--dataset", "synthetic", "--out", str(out),
                                    "--queue", queue, "-p", "1", "--task-shape", "64,64,64"])
  assert result.exit_code == 0, result.output
  assert result.output.count("already done in a previous run") >= 7


def test_validate_names_a_missing_skeleton(demo_run):
  from iicats_cv.tasks.igneous_stages import validate_layer
  _, summary, _, _ = demo_run
  seg = summary["layers"]["segmentation"]
  neuron = max(summary["tracked"], key=lambda n: n["voxels"])["id"]
  layer_dir = seg[len("file://"):]
  skel_dir = os.path.join(layer_dir, CloudVolume(seg).info["skeletons"])
  path = next(os.path.join(skel_dir, name) for name in (f"{neuron}", f"{neuron}.gz")
              if os.path.exists(os.path.join(skel_dir, name)))
  with open(path, "rb") as fh:
    kept = fh.read()
  os.remove(path)
  try:
    assert validate_layer(seg)["missing_skeletons"] == [neuron]
    result = CliRunner().invoke(cli, ["validate", seg, "--no-meshes"])
    assert result.exit_code != 0
    assert f"no skeleton: {neuron}" in result.output
  finally:
    with open(path, "wb") as fh:
      fh.write(kept)
  assert CliRunner().invoke(cli, ["validate", seg]).exit_code == 0
