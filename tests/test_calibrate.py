"""`iicats calibrate`: a model's operating point chosen on labelled data, kept in its
checkpoint and used by the pipeline wherever the caller leaves a setting out."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from iicats_cv.calibrate import (AGGLOMERATION_THRESHOLDS, CLEANUP_ARAND_TOLERANCE, EVIDENCE,
                                 INTERIOR_BONUSES, MIN_SEGMENT_VOXELS, MUST_LINK_ARAND_MARGIN,
                                 SCORER_THRESHOLDS,
                                 STATISTICS, choose_organelle_thresholds, score_agglomeration,
                                 setting_rank)
from iicats_cv.edge_scorer import FEATURES
from iicats_cv.cli import cli
from iicats_cv.errors import IicatsError
from iicats_cv.model import checkpoint_metadata, load_checkpoint, update_checkpoint_metadata
from iicats_cv.tasks.pipeline import resolve_operating_point
from iicats_cv.train import affinities_from_labels
from iicats_cv.volume_io import import_volume
from conftest import blobs


def test_organelle_cut_with_the_best_dice():
  """Probabilities that over-predict (0.6 on a false rim, 0.8 inside): p > 0.5 takes the rim
  in, the chosen cut (the lowest best one nearest 0.5) leaves it out."""
  mask = np.zeros((20, 20, 10), bool)
  mask[5:15, 5:15] = True
  probability = np.where(mask, 0.8, 0.1).astype(np.float32)
  probability[3:5, 5:15] = 0.6
  organelles = np.stack([np.zeros_like(probability), probability, probability])
  chosen = choose_organelle_thresholds(organelles, {"mitochondria": mask})
  assert list(chosen) == ["mitochondria"]
  assert chosen["mitochondria"]["threshold"] == 0.6
  assert chosen["mitochondria"]["dice"] == 1.0
  assert chosen["mitochondria"]["dice_at_0.5"] == pytest.approx(2 * 100 / (120 + 100))


def test_agglomeration_scores_every_setting_best_first():
  labels, _ = blobs((32, 32, 24), n=5)
  affinities = affinities_from_labels(labels)[0] * 0.8 + 0.1
  organelles = np.zeros((3,) + labels.shape, np.float32)
  rows = score_agglomeration(affinities, organelles, labels, (10, 10, 10))
  assert len(rows) == (len(STATISTICS) * len(EVIDENCE) * len(INTERIOR_BONUSES)
                       * len(AGGLOMERATION_THRESHOLDS))
  assert {r["interior_bonus"] for r in rows} == set(INTERIOR_BONUSES)
  keys = [setting_rank(r) for r in rows]
  assert keys == sorted(keys)
  assert rows[0]["arand"] < 0.05  # the labels' own affinities separate the cells
  # the dust cleanup of the best setting: every size scored, the choice within the ARAND
  # tolerance of none at all and the lowest VOI of those
  cleanup = rows[0]["cleanup"]
  assert [c["min_segment_voxels"] for c in cleanup] == list(MIN_SEGMENT_VOXELS)
  assert cleanup[0]["arand"] == pytest.approx(rows[0]["arand"])
  chosen = next(c for c in cleanup if c["min_segment_voxels"] == rows[0]["min_segment_voxels"])
  assert chosen["arand"] <= rows[0]["arand"] + CLEANUP_ARAND_TOLERANCE
  assert all(chosen["voi_split"] + chosen["voi_merge"] <= c["voi_split"] + c["voi_merge"]
             for c in cleanup if c["arand"] <= rows[0]["arand"] + CLEANUP_ARAND_TOLERANCE)


def test_the_mitochondria_hint_must_win_by_a_margin():
  """A cannot-link wins ties (it only guards against merges); the mitochondria hint adds
  merges, so it is chosen only when it beats the best setting without it by the margin."""
  plain = {"arand": 0.081, "voi_split": 0.7, "voi_merge": 0.4, "constraints": ["nucleus"]}
  hint = {**plain, "constraints": ["nucleus", "mitochondria"]}
  assert sorted([dict(hint, arand=0.0803), plain], key=setting_rank)[0] is plain
  better = dict(hint, arand=0.081 - 2 * MUST_LINK_ARAND_MARGIN)
  assert sorted([plain, better], key=setting_rank)[0] is better
  bare = dict(plain, constraints=[])
  assert sorted([bare, plain], key=setting_rank)[0] is plain
  # the interior bonus adds merges as well: the same margin, once more with the hint
  bonus = dict(plain, interior_bonus=0.25)
  assert sorted([dict(bonus, arand=0.0771), plain], key=setting_rank)[0] is plain
  assert sorted([dict(bonus, arand=0.0759), plain], key=setting_rank)[0]["interior_bonus"]
  both = dict(hint, interior_bonus=0.25, arand=0.081 - 1.5 * MUST_LINK_ARAND_MARGIN)
  assert sorted([both, plain], key=setting_rank)[0] is plain


def _labelled_layers(tmp_path):
  labels, image = blobs((40, 40, 32), n=5)
  paths = {name: "file://" + str(tmp_path / name) for name in ("img", "lab", "mito")}
  import_volume(image, paths["img"], "image", (10, 10, 10))
  import_volume(labels, paths["lab"], "segmentation", (10, 10, 10))
  import_volume((labels == 2).astype(np.uint8), paths["mito"], "segmentation", (10, 10, 10))
  return paths


def test_calibrate_command_records_the_operating_point(tmp_path, tiny_checkpoint, capsys):
  paths = _labelled_layers(tmp_path)
  out = str(tmp_path / "calibrated.safetensors")
  result = CliRunner().invoke(cli, ["calibrate", "--checkpoint", tiny_checkpoint,
                                    "--image", paths["img"], "--labels", paths["lab"],
                                    "--mitochondria", paths["mito"], "--out", out])
  assert result.exit_code == 0, result.output
  assert "calibrated in" in result.output
  point = checkpoint_metadata(out)["operating_point"]
  classic = point["classic_agglomeration"]
  assert classic["threshold"] in AGGLOMERATION_THRESHOLDS
  assert classic["quantile"] in STATISTICS.values()
  assert tuple(classic["constraints"]) in EVIDENCE
  # the learned edge scorer, its setting chosen on the halves, is the operating point only
  # where it beat the best statistic there
  scorer = point["edge_scorer"]
  assert scorer["features"] == list(FEATURES) and len(scorer["members"]) == 5
  assert scorer["setting"]["threshold"] in SCORER_THRESHOLDS
  assert scorer["setting"]["constraints"] == classic["constraints"]
  better = ((scorer["setting"]["arand"], scorer["setting"]["voi_split"]
             + scorer["setting"]["voi_merge"])
            < (scorer["classic_on_halves"]["arand"], scorer["classic_on_halves"]["voi_split"]
               + scorer["classic_on_halves"]["voi_merge"]))
  assert scorer["used"] == better
  chosen = point["agglomeration"]
  assert chosen == (scorer["setting"] if better else classic)
  assert set(point["organelle_thresholds"]) == {"mitochondria"}
  assert "iicats calibrate" in point["calibration"]["command"]
  # the source's metadata is kept and its weights are copied unchanged
  assert checkpoint_metadata(out)["note"] == checkpoint_metadata(tiny_checkpoint)["note"]
  before, after = load_checkpoint(tiny_checkpoint)[0], load_checkpoint(out)[0]
  for name, weights in before.state_dict().items():
    torch.testing.assert_close(after.state_dict()[name], weights, rtol=0, atol=0)
  # the pipeline takes what the caller leaves out from the checkpoint
  threshold, quantile, constraints, min_voxels, cuts, used, bonus = resolve_operating_point(
    out, None, None, None)
  assert (threshold, quantile, list(constraints), min_voxels, bonus) == (
    chosen["threshold"], chosen["quantile"], chosen["constraints"],
    chosen["min_segment_voxels"], chosen.get("interior_bonus", 0.0))
  assert (used is not None) == better
  assert cuts == [0.5, point["organelle_thresholds"]["mitochondria"], 0.5]
  assert resolve_operating_point(out, 0.3, "mean", ("nucleus",), min_segment_voxels=7
                                 )[:4] == (0.3, None, ("nucleus",), 7)
  capsys.readouterr()
  resolve_operating_point(out, None, None, None, augment=True)
  assert "calibrated with test-time augmentation off; this run has it on" in \
    capsys.readouterr().out


def test_calibrating_one_part_keeps_the_other(tmp_path, tiny_checkpoint):
  """The default model's organelle cuts come from synthetic masks and its agglomeration from
  FIB neurons (scripts/train_default_model.sh): a run that chooses one part keeps what an
  earlier run chose for the other, and the agglomeration's evidence uses the recorded cuts."""
  paths = _labelled_layers(tmp_path)
  organelles, both = (str(tmp_path / f"{name}.safetensors") for name in ("organelles", "both"))

  def calibrate(source, out, *layers):
    result = CliRunner().invoke(cli, ["calibrate", "--checkpoint", source, "--image",
                                      paths["img"], *layers, "--no-edge-scorer", "--out", out])
    assert result.exit_code == 0, result.output
    return checkpoint_metadata(out)["operating_point"]

  first = calibrate(tiny_checkpoint, organelles, "--mitochondria", paths["mito"])
  assert "agglomeration" not in first
  assert first["organelle_calibration"] == first["calibration"]
  second = calibrate(organelles, both, "--labels", paths["lab"])
  assert second["organelle_thresholds"] == first["organelle_thresholds"]
  assert second["organelle_calibration"] == first["organelle_calibration"]
  assert second["agglomeration_calibration"] == second["calibration"]
  assert second["agglomeration_calibration"]["organelle_cuts"] == {
    "nucleus": 0.5, "mitochondria": first["organelle_thresholds"]["mitochondria"],
    "synapse": 0.5}
  third = calibrate(both, both, "--mitochondria", paths["mito"])
  assert third["agglomeration"] == second["agglomeration"]
  assert third["agglomeration_calibration"] == second["agglomeration_calibration"]
  assert "--mitochondria" in third["calibration"]["command"]


def _with_operating_point(tmp_path, source, learned: bool):
  """A checkpoint whose operating point holds a (made-up) learned scorer setting at t=0.65
  and a classic one (0.75-quantile at t=0.45, 250-voxel cleanup); `learned` picks which."""
  classic = {"threshold": 0.45, "quantile": 0.75, "constraints": ["nucleus"],
             "min_segment_voxels": 250}
  setting = {"threshold": 0.65, "quantile": None, "constraints": ["nucleus", "mitochondria"],
             "min_segment_voxels": 1000, "learned": True}
  scorer = {"features": list(FEATURES), "mean": [0.0] * len(FEATURES),
            "scale": [1.0] * len(FEATURES), "members": [], "setting": setting}
  out = str(tmp_path / f"point-{learned}.safetensors")
  update_checkpoint_metadata(source, out, {"operating_point": {
    "agglomeration": setting if learned else classic, "classic_agglomeration": classic,
    "edge_scorer": scorer}})
  return out


def test_operating_point_picks_the_scorer_or_the_statistic(tmp_path, tiny_checkpoint):
  learned = _with_operating_point(tmp_path, tiny_checkpoint, True)
  threshold, quantile, constraints, cleanup, _, scorer, _ = resolve_operating_point(
    learned, None, None, None)
  assert (threshold, quantile, constraints, cleanup) == (
    0.65, None, ("nucleus", "mitochondria"), 1000)
  assert scorer["features"] == list(FEATURES)
  # another statistic takes the classic setting's threshold and cleanup, not the scorer's
  assert resolve_operating_point(learned, None, "mean", None) == (
    0.45, None, ("nucleus",), 250, [0.5, 0.5, 0.5], None, 0.0)
  # where the statistic won, the scorer is still there when asked for
  classic = _with_operating_point(tmp_path, tiny_checkpoint, False)
  assert resolve_operating_point(classic, None, None, None)[:4] == (
    0.45, 0.75, ("nucleus",), 250)
  assert resolve_operating_point(classic, None, "learned", None)[:4] == (
    0.65, None, ("nucleus", "mitochondria"), 1000)
  with pytest.raises(IicatsError, match="has no learned edge scorer"):
    resolve_operating_point(tiny_checkpoint, None, "learned", None)


def test_uncalibrated_checkpoint_keeps_the_defaults(tiny_checkpoint):
  assert resolve_operating_point(tiny_checkpoint, None, None, None) == (
    0.5, None, ("nucleus", "synapse", "mitochondria"), 0, [0.5, 0.5, 0.5], None, 0.0)
  assert resolve_operating_point(tiny_checkpoint, None, None, None, interior_bonus=0.25)[-1] \
    == 0.25


def test_calibrate_needs_labels_and_a_readable_checkpoint(tmp_path, tiny_checkpoint):
  paths = _labelled_layers(tmp_path)
  result = CliRunner().invoke(cli, ["calibrate", "--checkpoint", tiny_checkpoint, "--image",
                                    paths["img"], "--out", str(tmp_path / "x.safetensors")])
  assert result.exit_code != 0 and "give --labels" in result.output
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr("iicats_cv.cli.CALIBRATION_MAX_VOXELS", 1000)
    big = CliRunner().invoke(cli, ["calibrate", "--checkpoint", tiny_checkpoint, "--image",
                                   paths["img"], "--labels", paths["lab"], "--out",
                                   str(tmp_path / "x.safetensors")])
  assert big.exit_code != 0 and "with --bounds" in big.output
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"not a checkpoint")
  with pytest.raises(IicatsError, match="not a readable safetensors checkpoint"):
    checkpoint_metadata(str(garbage))
  with pytest.raises(IicatsError, match="file not found"):
    update_checkpoint_metadata(str(tmp_path / "missing.safetensors"),
                               str(tmp_path / "y.safetensors"), {})


def test_shipped_models_carry_their_operating_points():
  """The default model's organelle cuts were calibrated on the synthetic training volume and
  its agglomeration, with those cuts, on the FIB training half (the mean affinity beat its
  learned edge scorer there, which stays available); the vnc model's organelle cuts on VNC
  sections 0-11 (scripts/train_*_model.sh)."""
  default = checkpoint_metadata("default")["operating_point"]
  assert default["agglomeration"]["quantile"] is None
  assert not default["agglomeration"].get("learned") and not default["edge_scorer"]["used"]
  assert default["edge_scorer"]["setting"]["learned"]
  assert default["classic_agglomeration"] == default["agglomeration"]
  assert "fib" in default["calibration"]["image"]
  assert default["agglomeration_calibration"] == default["calibration"]
  assert set(default["organelle_thresholds"]) == {"nucleus", "mitochondria", "synapse"}
  assert "synthetic" in default["organelle_calibration"]["image"]
  assert default["agglomeration_calibration"]["organelle_cuts"] == \
    default["organelle_thresholds"]
  vnc = checkpoint_metadata("vnc")["operating_point"]
  assert set(vnc["organelle_thresholds"]) == {"mitochondria", "synapse"}
