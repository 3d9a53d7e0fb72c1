"""The blockwise stages against a real S3 server (SeaweedFS on loopback)."""
import pytest

from conftest import blobs
from s3_server import SeaweedS3


@pytest.fixture(scope="module")
def s3(tmp_path_factory, monkeypatch_module):
  server = SeaweedS3(str(tmp_path_factory.mktemp("weed")))
  for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                     ("AWS_SESSION_TOKEN", ""), ("AWS_DEFAULT_REGION", "us-east-1")):
    monkeypatch_module.setenv(key, value)
  try:
    server.wait_ready("iicats")
    yield server
  finally:
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
  mp = pytest.MonkeyPatch()
  yield mp
  mp.undo()


def test_segmentation_stages_on_s3(s3, tmp_path):
  from iicats_cv.layers import open_layer
  from iicats_cv.tasks.common import get_json
  from test_segmentation import run_segmentation_stages, write_affinities
  out = f"s3://{s3.endpoint}/iicats/run"
  labels, _ = blobs((32, 32, 32), n=5, seed=4)
  write_affinities(out + "/affinities", labels)
  run_segmentation_stages(out, out + "/affinities", (16, 16, 16),
                          queue="fq://" + str(tmp_path / "queue"), parallel=2)
  seg = open_layer(out + "/segmentation")[:, :, :][..., 0]
  assert seg.shape == (32, 32, 32) and seg.all()
  assert get_json(out, "agglomeration/summary.json")["segments"] >= 2
  # the objects really are in the bucket
  keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="iicats",
                                                        Prefix="run/segmentation/")["Contents"]]
  assert "run/segmentation/info" in keys and len(keys) > 8
  assert open_layer(out + "/segmentation").provenance.processing[-1]["method"]["task"] == "remap"
