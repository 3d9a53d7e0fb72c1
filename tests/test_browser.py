"""End to end in a real browser: `view` serves a run and headless Chromium renders it with
Neuroglancer: the synthetic demo (sharded multi-resolution meshes, sharded skeletons) and a
small hand-made run with legacy unsharded meshes and skeletons.

Chromium is found at /usr/bin/chromium or installed from Debian (root + apt); otherwise the
test is skipped with the reason. Set IICATS_SCREENSHOT=path.png to keep the demo's screenshot
(the README's).
"""
import colorsys
import io
import json
import os
import time

import numpy as np
import pytest

from browser_support import Browser, WINDOW_SIZE, ensure_chromium, write_dataset

LOAD_TIMEOUT_S = 30
RENDER_TIMEOUT_S = 20
# each neuron must show; a small or half-hidden one still covers a few hundred pixels
MIN_NEURON_PIXELS = 300
MIN_TOTAL_PIXELS = 5000


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
  """Path of a headless-capable Chromium, installed with apt when missing (else skip)."""
  pytest.importorskip("websocket", reason="websocket-client (DevTools protocol) not installed")
  log = tmp_path_factory.mktemp("chromium-install") / "apt.log"
  path, reason = ensure_chromium(str(log))
  if path is None:
    pytest.skip(f"no Chromium for the browser test: {reason}")
  return path


@pytest.fixture
def run(tmp_path):
  """A written run with tracked neurons and nuclei/synapse annotations."""
  facts = write_dataset(str(tmp_path / "run"))
  base = tmp_path / "run"
  (base / "tracked.json").write_text(json.dumps(
    [{"id": i, "seed_nm": [0, 0, 0]} for i in facts["segments"]]))
  (base / "annotations").mkdir()
  (base / "annotations" / "nuclei.csv").write_text("x,y,z\n128,128,64\n")
  (base / "annotations" / "synapses.csv").write_text(
    "pre_x,pre_y,pre_z,post_x,post_y,post_z\n200,200,200,260,260,260\n")
  return facts


def loaded(data_server, segments, mesh_dir="mesh", skeleton_dir="skeletons") -> dict:
  """What the browser fetched successfully of the segmentation: image chunks, and the
  segments whose mesh / skeleton arrived (for sharded layers: any shard read, as one shard
  holds many segments and which one a byte range serves is not in the request)."""
  paths = data_server.successful("/segmentation/")
  mesh, skel = f"/segmentation/{mesh_dir}/", f"/segmentation/{skeleton_dir}/"

  def arrived(prefix, unsharded_name):
    if any(p.startswith(prefix) and p.endswith(".shard") for p in paths):
      return set(segments)
    return {s for s in segments if any(p.startswith(prefix + unsharded_name(s)) for p in paths)}

  return {
    "chunks": [p for p in paths if not p.startswith((mesh, skel))
               and os.path.basename(p) not in ("info", "provenance")],
    "fragments": arrived(mesh, lambda s: f"{s}:0:"),
    "skeletons": arrived(skel, lambda s: f"{s}"),
  }


def wait_for_data(data_server, segments, **dirs):
  deadline = time.time() + LOAD_TIMEOUT_S
  while time.time() < deadline:
    got = loaded(data_server, segments, **dirs)
    if got["chunks"] and got["fragments"] == set(segments) \
        and got["skeletons"] == set(segments):
      return got
    time.sleep(0.25)
  return loaded(data_server, segments, **dirs)


def segment_hue(segment) -> float:
  from neuroglancer import segment_colors
  text = segment_colors.hex_string_from_segment_id(0, segment)
  rgb = [int(text[i:i + 2], 16) / 255 for i in (1, 3, 5)]
  return colorsys.rgb_to_hsv(*rgb)[0]


def neuron_pixels(png: bytes, segments, region) -> dict:
  """Per segment, the saturated pixels of the 3D panel with that segment's hue."""
  from PIL import Image
  image = Image.open(io.BytesIO(png)).convert("RGB")
  left, top, right, bottom = region
  rgb = np.asarray(image, dtype=np.float32)[top:bottom, left:right] / 255.0
  high, low = rgb.max(-1), rgb.min(-1)
  saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0)
  hsv = np.asarray(image.convert("HSV"), dtype=np.float32)[top:bottom, left:right]
  hue = hsv[..., 0] / 255.0
  vivid = (saturation > 0.3) & (high > 0.25)
  counts = {}
  for segment in segments:
    distance = np.abs(hue - segment_hue(segment))
    distance = np.minimum(distance, 1 - distance)
    counts[segment] = int((vivid & (distance < 0.04)).sum())
  return counts


def panel_region(browser) -> tuple:
  """(left, top, right, bottom) of the 3D panel in screenshot pixels (the largest canvas
  region right of the middle, as a fallback the right half)."""
  rect = browser.evaluate(
    "(() => { const p = [...document.querySelectorAll('.neuroglancer-rendered-data-panel')]"
    ".map(e => e.getBoundingClientRect()).filter(r => r.width > 50)"
    ".sort((a, b) => b.left - a.left)[0];"
    " return p ? [p.left, p.top, p.right, p.bottom] : null; })()")
  if rect:
    return tuple(int(round(v)) for v in rect)
  width, height = WINDOW_SIZE
  return width // 2, 50, width, height


def render_served_run(chromium, prefix, segments, profile, screenshot=None):
  """Serve prefix with `view`, load it in Chromium, check requests and 3D-panel pixels."""
  from cloudvolume import CloudVolume
  from iicats_cv.viewer.server import view
  started = time.time()
  info = CloudVolume(f"{prefix}/segmentation").info
  dirs = {"mesh_dir": info["mesh"], "skeleton_dir": info["skeletons"]}
  viewer, data_server = view(prefix, port=0, layout="xy-3d", block=False)
  with viewer.txn() as state:
    state.show_slices = False  # the 3D panel then shows only meshes and skeletons
  browser = Browser(chromium, profile)
  try:
    browser.navigate(viewer.get_viewer_url())
    got = wait_for_data(data_server, segments, **dirs)
    assert got["chunks"], f"no segmentation chunk fetched: {data_server.requests}"
    assert got["fragments"] == set(segments), f"meshes: {data_server.requests}"
    assert got["skeletons"] == set(segments), f"skeletons: {data_server.requests}"
    counts = wait_for_render(browser, segments)
    assert rendered(counts), \
      f"neuron pixels in the 3D panel {counts}; console: {browser.console[-10:]}"
    assert not [r for r in data_server.requests if r.status >= 500]
    if screenshot:
      keep_screenshot(browser, screenshot)
  finally:
    browser.close()
    data_server.close()
  assert time.time() - started < 60


def test_neuroglancer_renders_the_synthetic_demo(chromium, synthetic_demo, tmp_path):
  out, summary, _, _ = synthetic_demo
  tracked = [n["id"] for n in summary["tracked"]]
  assert tracked
  render_served_run(chromium, "file://" + str(out), tracked, str(tmp_path / "profile"),
                    screenshot=os.environ.get("IICATS_SCREENSHOT"))


def test_neuroglancer_renders_unsharded_meshes_and_skeletons(chromium, run, tmp_path):
  render_served_run(chromium, run["prefix"], run["segments"], str(tmp_path / "profile"))


def rendered(counts: dict) -> bool:
  return (all(n >= MIN_NEURON_PIXELS for n in counts.values())
          and sum(counts.values()) >= MIN_TOTAL_PIXELS)


def wait_for_render(browser, segments) -> dict:
  """Neuron pixel counts once every neuron shows in the 3D panel (or at the deadline)."""
  deadline = time.time() + RENDER_TIMEOUT_S
  while True:
    time.sleep(0.5)
    counts = neuron_pixels(browser.screenshot(), segments, panel_region(browser))
    if rendered(counts) or time.time() > deadline:
      return counts


def keep_screenshot(browser, path):
  """Save the screenshot the pixel check passed on (the README's)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as fh:
    fh.write(browser.screenshot())
