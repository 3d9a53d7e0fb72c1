"""The blockwise stages against a real S3 server (SeaweedFS on loopback)."""
from functools import partial

import numpy as np
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
  from iicats_cv.layers import create_layer, open_layer
  from iicats_cv.tasks.runner import run_tasks
  from iicats_cv.tasks.segmentation import create_watershed_tasks, create_rag_tasks, \
    agglomerate_task, create_remap_tasks
  from iicats_cv.tasks.common import get_json
  from test_segmentation import noisy_affinities
  out = f"s3://{s3.endpoint}/iicats/run"
  labels, _ = blobs((32, 32, 32), n=5, seed=4)
  aff = create_layer(out + "/affinities", layer_type="image", dtype="float32",
                     resolution=(10, 10, 10), voxel_offset=(0, 0, 0), volume_size=(32, 32, 32),
                     chunk_size=(16, 16, 16), num_channels=3, step="test")
  aff[:, :, :] = np.moveaxis(noisy_affinities(labels), 0, -1)
  queue = "fq://" + str(tmp_path / "queue")
  shape = (16, 16, 16)
  run_tasks(create_watershed_tasks(out + "/affinities", out + "/supervoxels", shape,
                                   chunk_size=(16, 16, 16), min_size=10), queue, 2)
  run_tasks(create_rag_tasks(out + "/supervoxels", out + "/affinities", "", out + "/rag", shape),
            queue, 1)
  run_tasks([partial(agglomerate_task, rag_prefix=out + "/rag",
                     supervoxels_path=out + "/supervoxels", out_prefix=out,
                     params={"threshold": 0.5}, sweep=[], track=False)], queue, 1)
  run_tasks(create_remap_tasks(out + "/supervoxels", out + "/segmentation", out, shape,
                               chunk_size=(16, 16, 16)), queue, 1)
  seg = open_layer(out + "/segmentation")[:, :, :][..., 0]
  assert seg.shape == (32, 32, 32) and seg.all()
  assert get_json(out, "agglomeration/summary.json")["segments"] >= 2
  # the objects really are in the bucket
  keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="iicats",
                                                        Prefix="run/segmentation/")["Contents"]]
  assert "run/segmentation/info" in keys and len(keys) > 8
  assert open_layer(out + "/segmentation").provenance.processing[-1]["method"]["task"] == "remap"
