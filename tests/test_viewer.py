"""Neuroglancer states/links (viewer/link.py) and the local layer server (viewer/server.py)."""
import gzip
import http.client
import json
import os
import socket

import neuroglancer
import numpy as np
import pytest
from click.testing import CliRunner

from iicats_cv.errors import IicatsError
from iicats_cv.viewer import link, server
from iicats_cv.viewer.link import build_state, state_json, state_to_url, to_source
from iicats_cv.viewer.server import DataServer

from browser_support import write_layer


def layer(state, name):
  return state.layers[name]


def full_state(**kwargs):
  args = dict(image="gs://lab/em", segmentation="gs://lab/run/segmentation",
              affinities="gs://lab/run/affinities", organelles="gs://lab/run/organelles",
              supervoxels="gs://lab/run/supervoxels", segments=[7, 3, 7],
              nuclei_nm=[[80, 160, 240]], synapses_nm=[[[0, 0, 0], [16, 32, 48]]],
              resolution_nm=(8, 8, 16), position_nm=(512, 512, 512))
  args.update(kwargs)
  return build_state(**args)


# ---------------------------------------------------------------------------------------------
# link.py

def test_state_has_layers_shaders_and_segments():
  state = full_state()
  names = [l.name for l in state.layers]
  assert names == ["image", "affinities", "organelles", "supervoxels", "segmentation",
                   "nuclei", "synapses"]
  assert layer(state, "image").type == "image"
  aff = layer(state, "affinities").shader
  assert "emitRGB(vec3(toNormalized(getDataValue(0))" in aff
  assert "getDataValue(1)" in aff and "getDataValue(2)" in aff
  org = layer(state, "organelles").shader
  assert "#uicontrol float opacity slider(" in org
  for name in ("nucleus", "mitochondria", "synapse"):
    assert f"#uicontrol vec3 {name} color(" in org
  assert layer(state, "supervoxels").type == "segmentation"
  assert state.layers["supervoxels"].visible is False
  seg = layer(state, "segmentation")
  assert seg.type == "segmentation" and state.layers["segmentation"].visible
  assert sorted(int(s) for s in seg.segments) == [3, 7]
  assert "segmentColor()" in seg.skeleton_shader
  assert seg.skeleton_rendering.mode3d == "lines"


def test_state_dimensions_position_and_annotations_in_voxels():
  state = full_state()
  assert list(state.dimensions.scales) == pytest.approx([8e-9, 8e-9, 16e-9])
  assert list(state.position) == pytest.approx([64, 64, 32])
  nuclei = layer(state, "nuclei")
  assert nuclei.type == "annotation"
  assert list(nuclei.annotations[0].point) == pytest.approx([10, 20, 15])
  synapse = layer(state, "synapses").annotations[0]
  assert synapse.type == "line"
  assert list(synapse.point_a) == pytest.approx([0, 0, 0])
  assert list(synapse.point_b) == pytest.approx([2, 4, 3])
  dims = state_json(state)["layers"][5]["source"][0]["transform"]["outputDimensions"]
  assert dims["z"] == [pytest.approx(16e-9), "m"]


def test_state_zooms_to_extent():
  state = full_state(extent_nm=(512, 512, 1024), layout="3d")
  assert state.layout.type == "3d"
  assert state.projection_scale == pytest.approx(64 * link.PROJECTION_MARGIN)
  assert state.cross_section_scale == pytest.approx(64 / link.VIEW_PIXELS)


def test_only_given_layers_and_no_empty_annotations():
  state = build_state(image="gs://lab/em", nuclei_nm=np.zeros((0, 3)))
  assert [l.name for l in state.layers] == ["image"]


def test_url_round_trips():
  state = full_state()
  url = state_to_url(state)
  assert url.startswith("https://neuroglancer-demo.appspot.com/#!")
  assert neuroglancer.parse_url(url).to_json() == state.to_json()
  other = state_to_url(state, prefix="http://localhost:8080")
  assert other.startswith("http://localhost:8080/#!")
  assert json.loads(json.dumps(state_json(state)))["layers"][0]["name"] == "image"


@pytest.mark.parametrize("cloudpath, source", [
  ("gs://bucket/path/seg", "precomputed://gs://bucket/path/seg"),
  ("gs://bucket/path/seg/", "precomputed://gs://bucket/path/seg"),
  ("s3://bucket/p", "precomputed://s3://bucket/p"),
  ("http://host:8000/p", "precomputed://http://host:8000/p"),
  ("https://host/p", "precomputed://https://host/p"),
  ("precomputed://gs://b/p", "precomputed://gs://b/p"),
  ("s3://http://127.0.0.1:8333/bucket/seg", "precomputed://http://127.0.0.1:8333/bucket/seg"),
])
def test_source_conversion(cloudpath, source):
  assert to_source(cloudpath) == source


def test_file_sources_need_a_server():
  with pytest.raises(IicatsError, match="iicats view"):
    to_source("file:///tmp/run/image")
  with pytest.raises(IicatsError, match="iicats view"):
    build_state(image="file:///tmp/run/image")
  mapped = to_source("file:///tmp/run/image", lambda p: "http://127.0.0.1:9/" + p[-5:])
  assert mapped == "precomputed://http://127.0.0.1:9/image"
  with pytest.raises(IicatsError, match="cannot read 'mem://'"):
    to_source("mem://x")


def test_bad_segments_and_inputs():
  with pytest.raises(IicatsError, match="not an integer"):
    link.parse_segments("1,x")
  with pytest.raises(IicatsError, match="positive"):
    build_state(segmentation="gs://b/s", segments=[0])
  with pytest.raises(IicatsError, match="resolution_nm"):
    build_state(image="gs://b/i", resolution_nm=(8, 8))


def test_readers(tmp_path):
  tracked = tmp_path / "tracked.json"
  tracked.write_text(json.dumps([{"id": 5, "seed_nm": [1, 2, 3]}, {"id": 2}]))
  assert link.read_tracked(str(tracked)) == [2, 5]
  (tmp_path / "bad.json").write_text('{"id": 1}')
  with pytest.raises(IicatsError, match="list of"):
    link.read_tracked(str(tmp_path / "bad.json"))
  nuclei = tmp_path / "nuclei.csv"
  nuclei.write_text("x,y,z\n10,20,30\n40,50,60\n")
  assert link.read_nuclei(str(nuclei)).shape == (2, 3)
  synapses = tmp_path / "synapses.csv"
  synapses.write_text("pre_x,pre_y,pre_z,post_x,post_y,post_z\n1,2,3,4,5,6\n")
  assert link.read_synapses(str(synapses)).tolist() == [[[1, 2, 3], [4, 5, 6]]]
  (tmp_path / "n2.csv").write_text("a,b,c\n1,2,3\n")
  with pytest.raises(IicatsError):
    link.read_nuclei(str(tmp_path / "n2.csv"))


# ---------------------------------------------------------------------------------------------
# DataServer

SECRET = b"outside the served folder"
CHUNK = bytes(range(256)) * 40


@pytest.fixture
def served(tmp_path):
  """A served folder with a plain file, a gzip-only chunk and symlinks leaving it."""
  root = tmp_path / "root"
  (root / "layer" / "8_8_8").mkdir(parents=True)
  (root / "layer" / "info").write_text('{"type": "image"}')
  (root / "layer" / "8_8_8" / "0-64_0-64_0-64.gz").write_bytes(gzip.compress(CHUNK))
  (root / "plain.bin").write_bytes(CHUNK)
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "secret.txt").write_bytes(SECRET)
  os.symlink(outside / "secret.txt", root / "link.txt")
  os.symlink(outside, root / "linkdir")
  with DataServer(str(root)) as data_server:
    yield data_server


def get(data_server, path, method="GET", headers=None):
  conn = http.client.HTTPConnection("127.0.0.1", data_server.port, timeout=10)
  conn.request(method, path, headers=headers or {})
  response = conn.getresponse()
  body = response.read()
  conn.close()
  return response, body


def raw_request(data_server, target):
  """Status line and body of a request sent verbatim (no client-side normalisation)."""
  with socket.create_connection(("127.0.0.1", data_server.port), timeout=10) as sock:
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
      data += chunk
  head, _, body = data.partition(b"\r\n\r\n")
  return head.split(b"\r\n")[0].decode(), body


def test_server_binds_loopback_and_url(served):
  assert served.url == f"http://127.0.0.1:{served.port}"
  assert served.host == "127.0.0.1"
  assert served.source_url("file://" + served.root + "/layer") == \
    f"precomputed://{served.url}/layer"
  with pytest.raises(IicatsError, match="outside"):
    served.source_url("file:///etc")


def test_server_cors_and_plain_files(served):
  response, body = get(served, "/layer/info", headers={"Origin": "http://example.org"})
  assert response.status == 200
  assert response.getheader("Access-Control-Allow-Origin") == "*"
  assert response.getheader("Content-Type") == "application/json"
  assert json.loads(body) == {"type": "image"}
  response, body = get(served, "/layer/info", method="OPTIONS")
  assert response.status == 204
  assert response.getheader("Access-Control-Allow-Origin") == "*"
  assert "GET" in response.getheader("Access-Control-Allow-Methods")
  response, body = get(served, "/plain.bin", method="HEAD")
  assert response.status == 200 and body == b""
  assert int(response.getheader("Content-Length")) == len(CHUNK)


def test_server_gzip_chunks(served):
  path = "/layer/8_8_8/0-64_0-64_0-64"
  response, body = get(served, path, headers={"Accept-Encoding": "gzip, deflate"})
  assert response.status == 200
  assert response.getheader("Content-Encoding") == "gzip"
  assert response.getheader("Access-Control-Allow-Origin") == "*"
  assert gzip.decompress(body) == CHUNK
  response, body = get(served, path, headers={"Accept-Encoding": "identity"})
  assert response.status == 200 and response.getheader("Content-Encoding") is None
  assert body == CHUNK
  assert served.requests[-1].encoding == "decoded"
  response, body = get(served, path + ".gz")  # the stored file itself, as bytes
  assert gzip.decompress(body) == CHUNK and response.getheader("Content-Encoding") is None


def test_server_ranges(served):
  response, body = get(served, "/plain.bin", headers={"Range": "bytes=10-19"})
  assert response.status == 206 and body == CHUNK[10:20]
  assert response.getheader("Content-Range") == f"bytes 10-19/{len(CHUNK)}"
  response, body = get(served, "/plain.bin", headers={"Range": "bytes=-5"})
  assert body == CHUNK[-5:]
  response, _ = get(served, "/plain.bin", headers={"Range": f"bytes={len(CHUNK)}-"})
  assert response.status == 416


def test_server_404(served):
  response, body = get(served, "/layer/8_8_8/missing")
  assert response.status == 404
  assert response.getheader("Access-Control-Allow-Origin") == "*"
  assert get(served, "/layer/8_8_8")[0].status == 404  # no directory listings
  assert served.requests[-1].status == 404


@pytest.mark.parametrize("target", [
  "/../outside/secret.txt", "/layer/../../outside/secret.txt", "/%2e%2e/outside/secret.txt",
  "/layer/%2E%2E/%2e%2e/outside/secret.txt", "/..%2foutside%2fsecret.txt",
  "/link.txt", "/linkdir/secret.txt", "/layer%5c..%5c..%5coutside%5csecret.txt",
  "/%00info",
])
def test_server_refuses_traversal(served, target):
  status, body = raw_request(served, target)
  assert status.split()[1] in ("403", "404"), status
  assert SECRET not in body


def test_server_absolute_paths_stay_inside(served):
  status, body = raw_request(served, "//" + os.path.join(os.path.dirname(served.root),
                                                         "outside", "secret.txt").lstrip("/"))
  assert status.split()[1] in ("403", "404") and SECRET not in body
  status, body = raw_request(served, "http://x/%2e%2e/outside/secret.txt")
  assert status.split()[1] == "403" and SECRET not in body


def test_server_port_in_use(served):
  with pytest.raises(IicatsError, match="in use"):
    DataServer(served.root, port=served.port)


# ---------------------------------------------------------------------------------------------
# Layers through the server, `iicats link`, `view`

@pytest.fixture
def run_dir(tmp_path):
  """A small run: image + segmentation layers, tracked.json, annotation CSVs."""
  from browser_support import blob_neurons
  labels, image = blob_neurons((32, 32, 32))
  base = tmp_path / "run"
  write_layer(f"file://{base}/image", "image", image, (8, 8, 8))
  write_layer(f"file://{base}/segmentation", "segmentation", labels, (8, 8, 8))
  (base / "tracked.json").write_text(json.dumps([{"id": 11, "seed_nm": [1, 2, 3]}]))
  (base / "annotations").mkdir()
  (base / "annotations" / "nuclei.csv").write_text("x,y,z\n80,80,80\n")
  (base / "annotations" / "synapses.csv").write_text(
    "pre_x,pre_y,pre_z,post_x,post_y,post_z\n8,8,8,24,24,24\n")
  return base, labels, image


def test_cloudvolume_reads_through_server(run_dir):
  from cloudvolume import CloudVolume
  base, labels, image = run_dir
  with DataServer(str(base)) as data_server:
    cv = CloudVolume(f"{data_server.url}/segmentation", progress=False)
    assert np.array_equal(cv[:, :, :][..., 0], labels)
    cv = CloudVolume(f"{data_server.url}/image", progress=False)
    assert np.array_equal(cv[:, :, :][..., 0], image)
    assert any(r.encoding == "gzip" for r in data_server.requests)  # CloudVolume's .gz chunks


def test_link_command(run_dir, tmp_path):
  from iicats_cv.viewer.link import link_command
  base, _, _ = run_dir
  state_path = tmp_path / "state.json"
  with DataServer(str(base)) as data_server:
    result = CliRunner().invoke(link_command, [
      "--image", f"{data_server.url}/image", "--segmentation", f"{data_server.url}/segmentation",
      "--tracked", str(base / "tracked.json"), "--nuclei", str(base / "annotations/nuclei.csv"),
      "--synapses", str(base / "annotations/synapses.csv"), "--json", str(state_path),
      "--prefix", "http://localhost:8080"])
  assert result.exit_code == 0, result.output
  url = result.stdout.strip().splitlines()[-1]
  assert url.startswith("http://localhost:8080/#!")
  state = neuroglancer.parse_url(url)
  assert [int(s) for s in state.layers["segmentation"].segments] == [11]
  assert list(state.position) == pytest.approx([16, 16, 16])
  assert list(state.layers["nuclei"].annotations[0].point) == pytest.approx([10, 10, 10])
  assert json.loads(state_path.read_text())["layers"][0]["source"][0]["url"] == \
    f"precomputed://{data_server.url}/image"


def test_link_command_errors(tmp_path):
  from iicats_cv.viewer.link import link_command
  runner = CliRunner()
  result = runner.invoke(link_command, ["--image", f"file://{tmp_path}/nothing"])
  assert result.exit_code == 1 and "iicats view" in result.output
  result = runner.invoke(link_command, ["--segmentation", "gs://b/s", "--segments", "1",
                                        "--tracked", "x.json"])
  assert result.exit_code == 1 and "one of them" in result.output
  result = runner.invoke(link_command, [])
  assert result.exit_code == 1 and "no layer" in result.output
  help_text = runner.invoke(link_command, ["--help"]).output
  assert "Example:" in help_text and "iicats link --image" in help_text


def test_view_state_of_a_run(run_dir):
  base, _, _ = run_dir
  viewer, data_server = server.view(f"file://{base}", port=0, block=False)
  try:
    state = viewer.state
    assert [l.name for l in state.layers] == ["image", "segmentation", "nuclei", "synapses"]
    assert [int(s) for s in state.layers["segmentation"].segments] == [11]
    assert state.layers["image"].source[0].url == f"precomputed://{data_server.url}/image"
    assert viewer.get_viewer_url().startswith("http://127.0.0.1:")
  finally:
    data_server.close()


def test_an_image_mapped_through_a_window_is_shown_in_it():
  layer = state_json(build_state(image="gs://lab/em16", image_window=(1000, 26500)))["layers"][0]
  assert layer["shaderControls"] == {"normalized": {"range": [1000.0, 26500.0]}}
  assert "shaderControls" not in state_json(build_state(image="gs://lab/em"))["layers"][0]


def test_view_shows_the_layers_of_iicats_track(run_dir):
  """OUT/NAME beside OUT/NAME.json (what `iicats track --name NAME` writes) is shown with its
  neurons selected and the run's segmentation hidden; other JSON objects are not layers."""
  base, labels, _ = run_dir
  write_layer(f"file://{base}/stained", "segmentation", np.where(labels == 11, labels, 0),
              (8, 8, 8))
  (base / "stained.json").write_text(json.dumps([{"id": 11, "seed": 1, "voxels": 5}]))
  (base / "summary.json").write_text(json.dumps({"layers": {}}))
  (base / "orphan.json").write_text(json.dumps([{"id": 3, "seed": 1}]))  # no layer beside it
  assert server.tracked_layers(f"file://{base}") == {"stained": (f"file://{base}/stained", [11])}
  viewer, data_server = server.view(f"file://{base}", port=0, block=False)
  try:
    state = viewer.state
    assert [l.name for l in state.layers] == ["image", "segmentation", "stained", "nuclei",
                                              "synapses"]
    assert state.layers["segmentation"].visible is False
    assert [int(s) for s in state.layers["stained"].segments] == [11]
    assert state.layers["stained"].source[0].url == f"precomputed://{data_server.url}/stained"
  finally:
    data_server.close()


def test_view_serves_a_run_whose_input_image_lies_elsewhere(run_dir, tmp_path):
  """`iicats pipeline --image file:///data/em --out ./run`: the image stays where it is; the
  run's link and `iicats view` reach it at /_image, and nothing beside it."""
  import shutil
  from cloudvolume import CloudVolume
  from iicats_cv.tasks.pipeline import make_link
  base, _, image = run_dir
  elsewhere = tmp_path / "data" / "em"
  shutil.move(str(base / "image"), str(elsewhere))
  (tmp_path / "data" / "secret.txt").write_bytes(SECRET)
  (base / "pipeline").mkdir()
  (base / "pipeline" / "run.json").write_text(json.dumps({"image": f"file://{elsewhere}"}))
  viewer, data_server = server.view(f"file://{base}", port=0, block=False)
  try:
    source = viewer.state.layers["image"].source[0].url
    assert source == f"precomputed://{data_server.url}/_image"
    cv = CloudVolume(source[len("precomputed://"):], progress=False)
    assert np.array_equal(cv[:, :, :][..., 0], image)
    for target in ("/_image/../secret.txt", "/_image/%2e%2e/secret.txt"):
      status, body = raw_request(data_server, target)
      assert status.split()[1] in ("403", "404") and SECRET not in body
  finally:
    data_server.close()
  layers = {"image": f"file://{elsewhere}", "segmentation": f"file://{base}/segmentation"}
  url, _ = make_link(f"file://{base}", layers, [])
  assert neuroglancer.parse_url(url).layers["image"].source[0].url == \
    f"precomputed://http://127.0.0.1:{server.DEFAULT_PORT}/_image"


def test_view_errors(tmp_path):
  with pytest.raises(IicatsError, match="no such folder"):
    server.start_view(str(tmp_path / "missing"), port=0)
  with pytest.raises(IicatsError, match="no precomputed layer"):
    server.start_view(str(tmp_path), port=0)
  (tmp_path / "segmentation").mkdir()
  (tmp_path / "segmentation" / "info").write_text('{"type": "segmentation", "da')
  with pytest.raises(IicatsError, match="segmentation layer .*: its info is not a precomputed "
                                        "info"):
    server.start_view(str(tmp_path), port=0)
