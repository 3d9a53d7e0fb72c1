"""End to end: the synthetic demo through an fq:// queue; contract of the summary; every layer
readable by CloudVolume and by tensorstore; resume skips finished stages."""
import json
import os

import neuroglancer
import numpy as np
import pytest
import tensorstore as ts
from click.testing import CliRunner
from cloudvolume import CloudVolume
from cloudvolume.exceptions import MeshMissingError

from iicats_cv.cli import cli

LAYERS = ("image", "affinities", "organelles", "supervoxels", "segmentation")


def test_summary_contract(synthetic_demo):
  out, summary, output, _ = synthetic_demo
  assert set(LAYERS) <= set(summary["layers"])
  assert summary["neuroglancer_url"].startswith("http")
  for name in ("erl", "berl", "nerl", "arand", "voi_split", "voi_merge"):
    assert isinstance(summary["metrics"][name], float), name
  assert summary["metrics"]["berl"] <= summary["metrics"]["erl"] + 1e-9
  # the demo also scores without the voxels next to the ground truth's interfaces
  assert summary["metrics"]["boundary_tolerance_nm"] == 10.0
  for name in ("voi_split_tolerant", "voi_merge_tolerant", "arand_tolerant"):
    assert isinstance(summary["metrics"][name], float), name
    assert isinstance(summary["metrics"]["baseline_" + name], float), name
  assert "voi_split ±10nm" in output
  # the checkpoint's operating point has no interior bonus, and the run records that
  assert summary["agglomeration"]["params"]["interior_bonus"] == 0.0
  # ground-truth violations, for the result, the baseline and each threshold of the sweep
  for name in ("n_nucleus_violating_segments", "n_merged_synapses"):
    for value in [summary["metrics"][name], summary["metrics"]["baseline_" + name]] + [
        row[name] for row in summary["metrics"]["sweep"]]:
      assert isinstance(value, int) and value >= 0, name
  assert "GT syn. merged" in output
  # the baseline is scored at its own threshold, and both sweeps pass through both thresholds
  params = summary["agglomeration"]["params"]
  assert params["baseline_threshold"] != params["threshold"]
  sweeps = {key: {row["threshold"]: row for row in summary["metrics"][key]}
            for key in ("sweep", "baseline_sweep")}
  assert set(sweeps["sweep"]) == set(sweeps["baseline_sweep"]) >= {
    params["threshold"], params["baseline_threshold"]}
  for key, prefix, t in (("sweep", "", params["threshold"]),
                         ("baseline_sweep", "baseline_", params["baseline_threshold"])):
    for name in ("erl", "berl", "nerl", "n_merged_synapses"):
      assert sweeps[key][t][name] == pytest.approx(summary["metrics"][prefix + name]), name
  assert f"(the unconstrained baseline at t={params['baseline_threshold']:.2f})" in output
  for stage in ("inference", "watershed", "rag", "agglomerate", "remap", "mesh", "skeleton"):
    assert summary["timings"][stage] >= 0
  assert "Neuroglancer:" in output and "done:" in output
  # before the first stage: what each worker needs for this task shape
  assert "memory: give each worker about" in output.split("[inference]")[0]


def test_synapse_evidence_raises_the_watersheds_boundary_on_synapses(synthetic_demo):
  """The synthetic demo uses synapse evidence, so its watershed read the organelles layer's
  synapse channel (at the run's synapse cut) and says so in the supervoxels' provenance."""
  from iicats_cv.tasks.common import get_json
  out, summary, _, _ = synthetic_demo
  assert get_json(f"file://{out}/pipeline", "run.json")["synapse_boundary"] == 0.2
  params = CloudVolume(summary["layers"]["supervoxels"]).provenance.processing[-1]["method"]
  assert params["task"] == "watershed" and params["synapse_boundary"] == 0.2
  assert params["organelles"] == summary["layers"]["organelles"]


def test_segmentation_does_not_depend_on_the_task_shape(synthetic_demo, tmp_path):
  """The issue's check on the model's own prediction: the demo's 64³ tasks against one task
  over the whole volume, same settings. Its affinities have wide plateaus (uint8 levels), where
  a queue-order flood gave 0.010 apart; the watershed's strict local flood order and lattice
  seeds make it exact."""
  from iicats_cv.cli import DEMO_AGGLOMERATION
  from iicats_cv.metrics import adapted_rand_error
  from iicats_cv.tasks.pipeline import run_pipeline
  _, summary, _, _ = synthetic_demo
  whole = run_pipeline(summary["layers"]["image"], "file://" + str(tmp_path / "whole"),
                       parallel=1, task_shape=(512, 512, 512), meshes=False, report=False,
                       num_mips=0, **DEMO_AGGLOMERATION["synthetic"])
  segmentations = [np.asarray(CloudVolume(s["layers"]["segmentation"])[:, :, :])[..., 0]
                   for s in (summary, whole)]
  assert adapted_rand_error(*segmentations) <= 0.005


def test_link_state_has_every_layer_and_tracked_neurons(synthetic_demo):
  _, summary, _, _ = synthetic_demo
  import neuroglancer
  state = neuroglancer.parse_url(summary["neuroglancer_url"])
  names = [layer.name for layer in state.layers]
  for name in LAYERS:
    assert name in names, names
  tracked = [n["id"] for n in summary["tracked"]]
  assert tracked, "the synthetic volume has nuclei: tracking must find neurons"
  selected = {int(s) for s in state.layers["segmentation"].segments}
  assert set(tracked) <= selected


def test_every_layer_opens_in_cloudvolume_and_tensorstore(synthetic_demo):
  _, summary, _, _ = synthetic_demo
  for name in LAYERS + ("segmentation_baseline",):
    path = summary["layers"][name]
    cv = CloudVolume(path)
    data = cv[cv.bounds]
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": path + "/"}).result()
    np.testing.assert_array_equal(np.asarray(store.read().result()), np.asarray(data))
    assert cv.provenance.processing, f"{name} has no provenance"
  for name in ("image", "affinities", "organelles", "segmentation"):
    assert len(CloudVolume(summary["layers"][name]).available_mips) >= 2, name
  # the segmentations say how they were agglomerated, for whoever opens the bucket later
  ran = summary["agglomeration"]["params"]
  for name, constraints in (("segmentation", ran["constraints"]),
                            ("segmentation_baseline", [])):
    remap = next(p["method"] for p in CloudVolume(summary["layers"][name]).provenance.processing
                 if p["method"]["task"] == "remap")
    assert remap["agglomeration"]["constraints"] == constraints
  assert ran["constraints"], "the demo's run uses its evidence"


def test_tracked_neurons_have_sharded_multilod_meshes_and_skeletons(synthetic_demo):
  _, summary, _, _ = synthetic_demo
  cv = CloudVolume(summary["layers"]["segmentation"])
  assert cv.mesh.meta.info["@type"] == "neuroglancer_multilod_draco"
  assert cv.mesh.meta.info["sharding"] and cv.skeleton.meta.info["sharding"]
  most_lods = 0
  for neuron in summary["tracked"]:
    assert len(cv.mesh.get(neuron["id"])[neuron["id"]].vertices) > 0
    assert len(cv.skeleton.get(neuron["id"]).vertices) > 0
    manifest = cv.mesh.get_manifest(neuron["id"])
    most_lods = max(most_lods, manifest.num_lods)
  assert most_lods >= 2, "the biggest neurons must get a coarser level of detail"


def test_skeletons_do_not_depend_on_the_processs_string_hashing(synthetic_demo, tmp_path):
  """Igneous' sharded skeleton merge joined a label's fragments in the order of a set of file
  names, which Python's string hashing orders differently in every process: the same
  fragments gave shards of other bytes. Skeletonised again by a process with another hash
  seed, the demo's segmentation gets the same skeleton shards, byte for byte."""
  import shutil
  import subprocess
  import sys
  _, summary, _, _ = synthetic_demo
  layer = summary["layers"]["segmentation"].removeprefix("file://")
  skeleton_dir = CloudVolume(summary["layers"]["segmentation"]).skeleton.meta.skeleton_path
  copy = tmp_path / "segmentation"
  shutil.copytree(layer, copy)
  shutil.rmtree(copy / skeleton_dir)
  shards = os.path.join(layer, skeleton_dir)
  assert sum(n.endswith(".frags") for n in os.listdir(shards)) > 2, "fragments of several tasks"
  for seed in ("1", "2"):
    subprocess.run([sys.executable, "-m", "iicats_cv.cli", "skeleton", "file://" + str(copy),
                    "-p", "1", "--task-shape", "64,64,64"], check=True, capture_output=True,
                   env={**os.environ, "PYTHONHASHSEED": seed})
    for name in (n for n in os.listdir(shards) if n.endswith(".shard")):
      with open(os.path.join(shards, name), "rb") as a, open(copy / skeleton_dir / name,
                                                             "rb") as b:
        assert a.read() == b.read(), f"{name} (hash seed {seed})"


def test_rerun_resumes_and_skips_finished_stages(synthetic_demo):
  out, summary, _, queue = synthetic_demo
  result = CliRunner().invoke(cli, ["demo", "--dataset", "synthetic", "--out", str(out),
                                    "--queue", queue, "-p", "1", "--task-shape", "64,64,64"])
  assert result.exit_code == 0, result.output
  assert result.output.count("already done in a previous run") >= 7


def test_changed_settings_in_a_finished_run_are_refused_before_anything_is_written(
    synthetic_demo, tmp_path):
  import shutil
  out, summary, _, _ = synthetic_demo
  copy = tmp_path / "moved"  # a run folder moved elsewhere is still the same run
  shutil.copytree(out, copy)
  table = (copy / "agglomeration" / "table.npz").read_bytes()
  run_json = (copy / "pipeline" / "run.json").read_text()
  result = CliRunner().invoke(cli, ["demo", "--dataset", "synthetic", "--out", str(copy),
                                    "--task-shape", "64,64,64", "--threshold", "0.5"])
  assert result.exit_code == 1
  threshold = summary["agglomeration"]["params"]["threshold"]
  assert f"its agglomerate stage ran with threshold {threshold} (now 0.5)" in result.output
  assert "--rerun-from agglomerate" in result.output
  assert (copy / "agglomeration" / "table.npz").read_bytes() == table
  assert (copy / "pipeline" / "run.json").read_text() == run_json
  # another demo dataset in the folder is refused too, not reported as this one
  result = CliRunner().invoke(cli, ["demo", "--out", str(copy)])
  assert result.exit_code == 1
  assert "holds the demo of the synthetic dataset (seed 0), not of the fib dataset" in (
    result.output)
  # a folder with a run's layer names but no run record is not written into
  stray = tmp_path / "stray"
  shutil.copytree(out / "affinities", stray / "affinities")
  chunks = sorted(p.name for p in (stray / "affinities").rglob("*"))
  result = CliRunner().invoke(cli, ["pipeline", "--image", "file://" + str(out / "image"),
                                    "--out", str(stray), "-p", "1"])
  assert result.exit_code == 1 and "holds affinities layer(s) but no run record" in (
    result.output)
  assert sorted(p.name for p in (stray / "affinities").rglob("*")) == chunks


def test_rerun_from_redoes_that_stage_and_the_later_ones(synthetic_demo, tmp_path):
  import shutil
  out, summary, _, _ = synthetic_demo
  copy = tmp_path / "run"
  shutil.copytree(out, copy)
  result = CliRunner().invoke(cli, [
    "demo", "--dataset", "synthetic", "--out", str(copy), "-p", "1", "--threshold", "0.5",
    "--baseline-threshold", "0.5", "--task-shape", "64,64,64", "--rerun-from", "agglomerate",
    "--json", str(tmp_path / "summary.json")])
  assert result.exit_code == 0, result.output
  for stage in ("inference", "watershed", "rag", "downsample-image-1",
                "downsample-affinities-1"):
    assert f"[{stage}] already done in a previous run" in result.output, stage
  for stage in ("agglomerate", "remap", "mesh", "skeleton", "downsample-segmentation-1"):
    assert f"[{stage}] done in" in result.output, stage
  rerun = json.loads((tmp_path / "summary.json").read_text())
  assert rerun["agglomeration"]["params"]["threshold"] == 0.5
  assert rerun["metrics"]["berl"] != summary["metrics"]["berl"]
  assert json.loads((copy / "pipeline" / "run.json").read_text())["threshold"] == 0.5


def test_a_checkpoint_without_trained_affinities_is_refused_before_anything_is_written(
    tmp_path):
  from conftest import blobs
  from iicats_cv.errors import IicatsError
  from iicats_cv.model import checkpoint_metadata, trained_outputs
  from iicats_cv.tasks.pipeline import run_pipeline
  from iicats_cv.volume_io import import_volume
  assert trained_outputs(checkpoint_metadata("default")) == {
    "affinities", "nucleus", "mitochondria", "synapse"}
  _, image = blobs(shape=(64, 64, 16), n=4, seed=1)
  image_path = import_volume(image, "file://" + str(tmp_path / "em"), "image", (4.6, 4.6, 47))
  with pytest.raises(IicatsError, match="checkpoint vnc: its affinity channels were never "
                                        r"trained \(it learnt mitochondria, synapse\)"):
    run_pipeline(image_path, "file://" + str(tmp_path / "run"), checkpoint="vnc")
  assert not (tmp_path / "run").exists()


def test_an_uncalibrated_checkpoint_says_which_defaults_it_runs_with(tiny_checkpoint, capsys):
  from iicats_cv.tasks.pipeline import resolve_operating_point
  threshold, quantile, constraints, *_ = resolve_operating_point(tiny_checkpoint, None, None,
                                                                 None)
  assert (threshold, quantile) == (0.5, None) and len(constraints) == 3
  assert "has no calibrated operating point" in capsys.readouterr().out
  resolve_operating_point(tiny_checkpoint, 0.4, None, ("nucleus",))  # the user chose them
  resolve_operating_point("default", None, None, None)
  assert "operating point" not in capsys.readouterr().out


def test_a_resumed_run_does_not_wait_for_the_leases_of_an_interrupted_one(tmp_path):
  """Ctrl-C leaves the run's own queue with tasks leased by a worker that is gone: the next
  run stalled until their leases (10 minutes) expired."""
  from functools import partial
  from taskqueue import queueable
  from iicats_cv.tasks.pipeline import Pipeline
  from iicats_cv.tasks.runner import open_queue

  @queueable
  def interrupted_task():
    pass

  out = "file://" + str(tmp_path / "run")
  queue = open_queue(Pipeline(out, None, None).queue)
  queue.insert([partial(interrupted_task) for _ in range(3)])
  queue.lease(seconds=600)
  assert queue.enqueued == 3
  assert open_queue(Pipeline(out, None, None).queue).enqueued == 0


def test_rerun_from_clears_the_task_objects_a_new_task_grid_would_not_overwrite(tmp_path):
  from iicats_cv.errors import IicatsError
  from iicats_cv.tasks.pipeline import Pipeline
  out = "file://" + str(tmp_path / "run")
  settings = {"image": out + "/image", "task_shape": [64, 64, 64], "threshold": 0.4}
  run = Pipeline(out, None, None)
  run.reconcile(settings, None, {})
  stale = {"pipeline/stages/inference.json", "pipeline/stages/watershed.json",
           "pipeline/stages/downsample-affinities-1.json",
           "pipeline/stages/downsample-segmentation-1.json", "pipeline/done/rag/0_0_0",
           "supervoxels/faces/64_0_0.npz", "rag/64_0_0.npz", "other/keep.npz"}
  for key in stale:
    (tmp_path / "run" / key).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / key).write_text("{}")
  outputs = {1: [out + "/supervoxels/faces"], 2: [out + "/rag"]}
  with pytest.raises(IicatsError, match="--rerun-from watershed"):
    run.reconcile({**settings, "task_shape": [128, 128, 128]}, None, outputs)
  with pytest.raises(IicatsError, match="--rerun-from watershed"):  # rag is not early enough
    run.reconcile({**settings, "task_shape": [128, 128, 128]}, "rag", outputs)
  with pytest.raises(IicatsError,
                     match="holds a run of image .*, not of image file:///elsewhere/im"):
    run.reconcile({**settings, "image": "file:///elsewhere/image"}, "inference", outputs)
  run.reconcile({**settings, "task_shape": [128, 128, 128]}, "watershed", outputs)
  left = {str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*")
          if p.is_file() and "queue" not in p.parts}
  assert left == {"pipeline/run.json", "pipeline/stages/inference.json",
                  "pipeline/stages/downsample-affinities-1.json", "other/keep.npz"}


def test_validate_names_labels_of_a_missing_skeleton_shard(synthetic_demo):
  from iicats_cv.tasks.igneous_stages import validate_layer
  _, summary, _, _ = synthetic_demo
  seg = summary["layers"]["segmentation"]
  neuron = max(summary["tracked"], key=lambda n: n["voxels"])["id"]
  cv = CloudVolume(seg)
  shard = cv.skeleton.reader.get_filename(neuron)
  path = os.path.join(seg[len("file://"):], cv.info["skeletons"], shard)
  moved = path + ".away"
  os.rename(path, moved)
  try:
    missing = validate_layer(seg)["missing_skeletons"]
    assert neuron in missing
    result = CliRunner().invoke(cli, ["validate", seg, "--no-meshes"])
    assert result.exit_code != 0
    # a shard holds many labels: the message counts them and names the first
    assert f"{len(missing)} of" in result.output and "have no skeleton:" in result.output
    assert f"skeleton: {missing[0]}" in result.output
  finally:
    os.rename(moved, path)
  assert CliRunner().invoke(cli, ["validate", seg]).exit_code == 0


def test_track_from_nuclei_and_from_seed_points(synthetic_demo, tmp_path):
  out, summary, _, _ = synthetic_demo
  task = ["-p", "1", "--task-shape", "64,64,64"]
  for name in ("rag", "agglomeration", "annotations", "tracked.json", "", "../out", "a/b"):
    result = CliRunner().invoke(cli, ["track", str(out), "--name", name, *task])
    assert result.exit_code != 0 and "--name" in result.output, result.output
  result = CliRunner().invoke(cli, ["track", str(out), "--name", "from_nuclei", *task])
  assert result.exit_code == 0, result.output
  with open(out / "from_nuclei.json") as fh:
    from_nuclei = json.load(fh)
  assert sorted(n["id"] for n in from_nuclei) == sorted(n["id"] for n in summary["tracked"])

  stained = summary["tracked"][:2] + summary["tracked"][:1]  # the first cell stained twice
  seeds = tmp_path / "stained.csv"
  seeds.write_text("x,y,z\n" + "".join(
    ",".join(f"{v:.1f}" for v in n["seed_nm"]) + "\n" for n in stained) + "1e9,0,0\n")
  result = CliRunner().invoke(cli, ["track", str(out), "--seeds", str(seeds),
                                    "--name", "stained", *task])
  assert result.exit_code == 0, result.output
  assert "1 of 4 point(s) lie outside the volume" in result.output  # and are skipped
  assert "2 neuron(s) from 3 seeds tracked" in result.output
  assert "seeds 1, 3 lie on one fragment" in result.output
  with open(out / "stained.json") as fh:
    neurons = json.load(fh)
  assert neurons[0]["id"] == neurons[2]["id"] != neurons[1]["id"]
  layer = CloudVolume("file://" + str(out / "stained"))
  labels = np.asarray(layer[:, :, :])[..., 0]
  ids, counts = np.unique(labels[labels > 0], return_counts=True)
  assert sorted(ids.tolist()) == sorted({n["id"] for n in neurons})
  assert dict(zip(ids.tolist(), counts.tolist())) == {n["id"]: n["voxels"] for n in neurons}
  resolution = np.asarray(layer.resolution)
  for neuron in neurons:
    voxel = np.floor(np.asarray(neuron["seed_nm"]) / resolution).astype(int)
    assert labels[tuple(voxel)] == neuron["id"], "a seed lies inside its own neuron"
  track = next(p["method"] for p in layer.provenance.processing
               if p["method"]["task"] == "track")
  assert track["seeds"] == str(seeds) and len(track["seed_points_nm"]) == 3
  assert {n["id"] for n in track["neurons"]} == set(ids.tolist())
  assert "validated: 2 label(s)" in result.output  # meshes and skeletons of both neurons
  url = next(line for line in result.output.splitlines() if line.startswith("Neuroglancer: "))
  shown = neuroglancer.parse_url(url.split(" ", 1)[1]).layers
  assert sorted(int(s) for s in shown["stained"].segments) == sorted(ids.tolist())
  assert shown["segmentation"].visible is False

  # again under the same name with one seed, in other tasks (whose mesh fragment files do
  # not replace the first run's): the other neuron's meshes are gone
  seeds.write_text("x,y,z\n" + ",".join(f"{v:.1f}" for v in stained[0]["seed_nm"]) + "\n")
  result = CliRunner().invoke(cli, ["track", str(out), "--seeds", str(seeds), "--name",
                                    "stained", "-p", "1", "--task-shape", "128,128,128"])
  assert result.exit_code == 0, result.output
  assert [n["id"] for n in json.loads((out / "stained.json").read_text())] == [neurons[0]["id"]]
  layer = CloudVolume("file://" + str(out / "stained"))
  assert layer.mesh.get(neurons[0]["id"])
  with pytest.raises(MeshMissingError):
    layer.mesh.get(neurons[1]["id"])


def test_track_names_seeds_outside_the_volume(synthetic_demo, tmp_path):
  out, _, _, _ = synthetic_demo
  seeds = tmp_path / "far.csv"
  seeds.write_text("x,y,z\n1e9,1e9,1e9\n")
  result = CliRunner().invoke(cli, ["track", str(out), "--seeds", str(seeds), "-p", "1",
                                    "--task-shape", "96,96,96"])
  assert result.exit_code != 0
  assert "task shape (96, 96, 96) is not a multiple of the chunk size" in result.output
  result = CliRunner().invoke(cli, ["track", str(out), "--seeds", str(seeds), "-p", "1",
                                    "--task-shape", "64,64,64"])
  assert result.exit_code != 0
  assert "none of the 1 point(s) lies in the volume (x, y, z extent 0-" in result.output
  assert "[track]" not in result.output  # refused before any task


def test_baseline_threshold_above_a_hierarchys_threshold_is_refused(synthetic_demo, tmp_path):
  """The hierarchy's parts are merged down to --threshold before the global step, so a
  baseline that stops above it cannot be had: refused before anything is written."""
  from iicats_cv.errors import IicatsError
  from iicats_cv.tasks.pipeline import run_pipeline
  _, summary, _, _ = synthetic_demo
  with pytest.raises(IicatsError, match="baseline threshold 0.4 > threshold 0.3 with --hier"):
    run_pipeline(summary["layers"]["image"], "file://" + str(tmp_path / "run"), hierarchy=1,
                 threshold=0.3, baseline_threshold=0.4)
  assert not (tmp_path / "run").exists()


def test_pipeline_hierarchical_quantile_run(tmp_path, tiny_checkpoint, capsys):
  """--hierarchy (two levels) and a quantile through every stage to the segmentation (tiny
  network), on a local image outside the run's folder (in the link at `iicats view`'s
  /_image). The quantile, evidence and organelle cuts come from the checkpoint's calibrated
  operating point, and so does the dust cleanup, which leaves no segment below its size
  across the hierarchy's parts; the nucleus fraction reaches the agglomeration."""
  from conftest import blobs
  from iicats_cv.model import update_checkpoint_metadata
  from iicats_cv.tasks.common import get_json, get_npz
  from iicats_cv.tasks.pipeline import run_pipeline
  from iicats_cv.volume_io import import_volume
  _, image = blobs(shape=(128, 128, 64), n=12, seed=4)
  image_path = import_volume(image, "file://" + str(tmp_path / "em"), "image", (8, 8, 8))
  calibrated = str(tmp_path / "calibrated.safetensors")
  update_checkpoint_metadata(tiny_checkpoint, calibrated, {"operating_point": {
    "agglomeration": {"threshold": 0.5, "quantile": 0.75, "constraints": ["nucleus"],
                      "min_segment_voxels": 300},
    "organelle_thresholds": {"mitochondria": 0.7}}})
  out = "file://" + str(tmp_path / "run")
  summary = run_pipeline(image_path, out, task_shape=(64, 64, 64), checkpoint=calibrated,
                         meshes=False, report=False, hierarchy=1, levels=2,
                         nucleus_fraction=0.2)
  assert summary["agglomeration"]["params"]["constraints"] == ["nucleus"]
  assert summary["agglomeration"]["params"]["nucleus_fraction"] == 0.2
  assert get_json(out + "/pipeline", "run.json")["nucleus_fraction"] == 0.2
  assert summary["agglomeration"]["params"]["min_segment_voxels"] == 300
  assert get_json(out + "/pipeline", "run.json")["organelle_thresholds"] == [0.5, 0.7, 0.5]
  assert get_json(out + "/pipeline", "run.json")["synapse_boundary"] == 0.0  # nucleus only
  assert "reduce" in summary["timings"] and "reduce-2" in summary["timings"]
  for level in ("level1", "level2"):  # parts of 1 block, then of 1 part
    parts = sorted(os.listdir(tmp_path / "run" / "hierarchy" / "1" / level))
    assert parts == ["0_0_0.npz", "0_1_0.npz", "1_0_0.npz", "1_1_0.npz"]
  assert summary["agglomeration"]["hierarchy_prefix"].endswith("hierarchy/1/level2")
  assert "aff_hist" in get_npz(out + "/rag", "0_0_0.npz")
  assert summary["agglomeration"]["params"]["quantile"] == 0.75
  assert max(summary["agglomeration"]["sweep"]) <= 0.5   # the sweep stops at the threshold
  segmentation = np.asarray(CloudVolume(out + "/segmentation")[:, :, :])
  assert segmentation.shape[:3] == (128, 128, 64) and segmentation.all()
  assert np.unique(segmentation, return_counts=True)[1].min() >= 300  # the dust joined others
  import neuroglancer
  layers = neuroglancer.parse_url(summary["neuroglancer_url"]).layers
  assert "segmentation" in [layer.name for layer in layers]
  assert layers["image"].source[0].url.endswith("/_image")  # where `iicats view` serves it
  assert "outside" not in capsys.readouterr().out


def test_pipeline_over_a_box_of_the_image(tmp_path, tiny_checkpoint):
  """--bounds: every output layer covers just the box, ground truth is scored there, the link
  is centred on it, and another box at the same --out is refused before anything is written.
  Ground truth without a scale at the run's resolution is refused first."""
  from conftest import blobs
  from iicats_cv.errors import IicatsError
  from iicats_cv.tasks.common import get_json
  from iicats_cv.tasks.pipeline import run_pipeline
  from iicats_cv.volume_io import import_volume
  labels, image = blobs(shape=(128, 96, 64), n=10, seed=2)
  image_path = import_volume(image, "file://" + str(tmp_path / "em"), "image", (8, 8, 8))
  gt_path = import_volume(labels, "file://" + str(tmp_path / "gt"), "segmentation", (8, 8, 8))
  coarse_gt = import_volume(labels, "file://" + str(tmp_path / "gt16"), "segmentation",
                            (16, 16, 16))
  out = "file://" + str(tmp_path / "run")
  with pytest.raises(IicatsError, match=r"gt16: has no scale at the run's resolution 8×8×8 nm"):
    run_pipeline(image_path, out, checkpoint=tiny_checkpoint, gt_labels=coarse_gt)
  from iicats_cv.metrics import Skeleton
  from iicats_cv.skeletons import write_swc
  write_swc(Skeleton(1, [[0.1, 0.1, 0.1], [0.4, 0.1, 0.1]], [[0, 1]]),  # µm
            str(tmp_path / "swc_um" / "1.swc"))
  with pytest.raises(IicatsError, match=r"swc_um: none of their 2 nodes lies in the run's "
                                        r"region \(\[128.0, 64.0, 0.0\]-"
                                        r"\[896.0, 720.0, 384.0\] nm"):
    run_pipeline(image_path, out, checkpoint=tiny_checkpoint, bounds="16,8,0,112,90,48",
                 gt_skeletons=str(tmp_path / "swc_um"))
  assert not (tmp_path / "run").exists()
  summary = run_pipeline(image_path, out, task_shape=(64, 64, 64), checkpoint=tiny_checkpoint,
                         meshes=False, report=False, num_mips=0, gt_labels=gt_path,
                         bounds="16,8,0,112,90,48")
  for name in ("affinities", "organelles", "supervoxels", "segmentation"):
    bounds = CloudVolume(summary["layers"][name]).bounds
    assert (bounds.minpt.tolist(), bounds.maxpt.tolist()) == ([16, 8, 0], [112, 90, 48]), name
  details = summary["metrics"]["details"]
  assert details["dense_bbox_vx"] == [[16, 8, 0], [112, 90, 48]]
  assert 0 <= summary["metrics"]["arand"] <= 1
  assert summary["neuroglancer_state"]["position"] == [64.0, 49.0, 24.0]
  run_json = get_json(out + "/pipeline", "run.json")
  assert run_json["region"] == [0, 16, 8, 0, 112, 90, 48]
  with pytest.raises(IicatsError, match=r"holds a run of image .*em \(mip 0, voxels \[16, 8, 0\]"
                                        r"-\[112, 90, 48\]\), not of image .*em: give another"):
    run_pipeline(image_path, out, task_shape=(64, 64, 64), checkpoint=tiny_checkpoint)
  assert get_json(out + "/pipeline", "run.json") == run_json


def test_pipeline_agglomerates_with_the_checkpoints_learned_edge_scorer(tmp_path,
                                                                         tiny_checkpoint):
  """A checkpoint whose operating point is a learned edge scorer: the rag stage reads the
  image for the fragments' appearance, the scorer goes to the bucket beside the tables (the
  task message names it), and the global step's tables are those of agglomerate() with it."""
  from conftest import blobs
  from test_edge_scorer import _scene
  from iicats_cv.agglomerate import AgglomerationParams, agglomerate
  from iicats_cv.edge_scorer import edge_features, same_neuron_edges, train_edge_scorer
  from iicats_cv.model import update_checkpoint_metadata
  from iicats_cv.tasks.common import get_json, get_npz
  from iicats_cv.tasks.pipeline import run_pipeline
  from iicats_cv.errors import IicatsError
  from iicats_cv.metrics import adapted_rand_error
  from iicats_cv.tasks.segmentation import EDGE_SCORER_OBJECT, _stitched_rag, agglomerate_task
  from iicats_cv.volume_io import import_volume
  frags, rag, labels = _scene()
  scorer = train_edge_scorer(edge_features(rag), same_neuron_edges(frags, labels, rag),
                             rag["count"], members=2)
  setting = {"threshold": 0.6, "quantile": None, "constraints": ["nucleus"],
             "min_segment_voxels": 0, "learned": True}
  calibrated = str(tmp_path / "learned.safetensors")
  update_checkpoint_metadata(tiny_checkpoint, calibrated, {"operating_point": {
    "agglomeration": setting, "edge_scorer": {**scorer, "setting": setting, "used": True}}})
  _, image = blobs(shape=(128, 64, 64), n=8, seed=2)
  image_path = import_volume(image, "file://" + str(tmp_path / "em"), "image", (10, 10, 10))
  out = "file://" + str(tmp_path / "run")
  summary = run_pipeline(image_path, out, task_shape=(64, 64, 64), checkpoint=calibrated,
                         meshes=False, report=False)
  assert get_json(out + "/pipeline", "run.json")["edge_scorer"] is True
  params = summary["agglomeration"]["params"]
  assert params["edge_scorer"] == EDGE_SCORER_OBJECT and params["threshold"] == 0.6
  stored = get_json(out, EDGE_SCORER_OBJECT)
  assert stored["members"] == json.loads(json.dumps(scorer))["members"]
  block = get_npz(out + "/rag", "64_0_0.npz")
  assert "aff_hist" in block and "frag_intensity_sum" in block
  fragment_ids, node_of, node_rag, _ = _stitched_rag(out + "/rag")
  expected = agglomerate(node_rag, AgglomerationParams(
    threshold=0.6, constraints=("nucleus",), edge_scorer=stored))
  table = get_npz(out, "agglomeration/table.npz")
  np.testing.assert_array_equal(
    table["segment_ids"],
    expected.segment_ids[np.searchsorted(expected.fragment_ids, node_of)])
  # hierarchically (parts of one block, two levels): a nodes stage gives each part its
  # fragments' whole-volume totals, level 1 scores every edge, and the global step merges
  # those probabilities as they are
  hierarchical = "file://" + str(tmp_path / "hierarchical")
  summary = run_pipeline(image_path, hierarchical, task_shape=(64, 64, 64),
                         checkpoint=calibrated, meshes=False, report=False, hierarchy=1,
                         levels=2)
  assert "nodes" in summary["timings"]
  shard = get_npz(hierarchical + "/hierarchy/1/nodes", "64_0_0.npz")
  assert set(block["frag_id"]) <= set(shard["fragments"])
  for level in ("level1", "level2"):
    part = get_npz(hierarchical + f"/hierarchy/1/{level}", "0_0_0.npz")
    assert part["edge_scored"] and "aff_hist" not in part
  flat = np.asarray(CloudVolume(out + "/segmentation")[:, :, :])[..., 0]
  by_parts = np.asarray(CloudVolume(hierarchical + "/segmentation")[:, :, :])[..., 0]
  assert adapted_rand_error(by_parts, flat) < 0.01
  with pytest.raises(IicatsError, match="reduced with a learned edge scorer and this run's "
                                        "parameters name none"):
    agglomerate_task(hierarchical + "/rag", hierarchical + "/supervoxels", hierarchical,
                     {**params, "edge_scorer": None}, [],
                     hierarchy_prefix=summary["agglomeration"]["hierarchy_prefix"])
