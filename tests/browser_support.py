"""Helpers for the browser test: find/install Chromium, drive it over the DevTools protocol,
and build a small dataset (image, segmentation, meshes, skeletons) with CloudVolume + Igneous.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time

import numpy as np

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser",
                       "/usr/bin/google-chrome", "/usr/bin/google-chrome-stable")
INSTALL_TIMEOUT_S = 900

# Flags giving a rendered WebGL 2 canvas without a GPU or display: SwiftShader through ANGLE.
CHROMIUM_FLAGS = (
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--no-first-run", "--disable-sync",
  "--disable-dev-shm-usage", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
  "--hide-scrollbars", "--mute-audio",
)
WINDOW_SIZE = (1000, 700)


# ---------------------------------------------------------------------------------------------
# Chromium

def find_chromium() -> str | None:
  """Path of a Chromium/Chrome binary, or None."""
  for path in CHROMIUM_CANDIDATES:
    if os.path.exists(path):
      return path
  for name in ("chromium", "chromium-browser", "google-chrome"):
    path = shutil.which(name)
    if path:
      return path
  return None


def install_chromium(log_path: str) -> str:
  """Install Debian's chromium with apt (root only). Returns '' or the reason it could not."""
  if os.name != "posix" or os.geteuid() != 0:
    return "not running as root, cannot apt-get install chromium"
  if not shutil.which("apt-get"):
    return "apt-get is not available to install chromium"
  command = ("apt-get update && DEBIAN_FRONTEND=noninteractive "
             "apt-get install -y --no-install-recommends chromium")
  try:
    with open(log_path, "w") as log:
      result = subprocess.run(["bash", "-c", command], stdout=log, stderr=subprocess.STDOUT,
                              timeout=INSTALL_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    return f"apt-get install chromium took over {INSTALL_TIMEOUT_S} s (log: {log_path})"
  if result.returncode != 0:
    return f"apt-get install chromium failed with exit {result.returncode} (log: {log_path})"
  return ""


def ensure_chromium(log_path: str) -> tuple[str | None, str]:
  """(path, '') of a usable Chromium, installing it when possible; else (None, reason)."""
  path = find_chromium()
  if path:
    return path, ""
  reason = install_chromium(log_path)
  path = find_chromium()
  if path:
    return path, ""
  return None, reason or "chromium not found after apt-get install"


class Browser:
  """A headless Chromium driven over the DevTools protocol (one page target)."""

  def __init__(self, binary: str, user_data_dir: str, window_size=WINDOW_SIZE,
               flags=CHROMIUM_FLAGS):
    self.user_data_dir = user_data_dir
    os.makedirs(user_data_dir, exist_ok=True)
    port_file = os.path.join(user_data_dir, "DevToolsActivePort")
    if os.path.exists(port_file):
      os.remove(port_file)
    self.window_size = tuple(window_size)
    args = [binary, *flags, f"--user-data-dir={user_data_dir}",
            f"--window-size={window_size[0]},{window_size[1]}",
            "--remote-debugging-port=0", "--remote-allow-origins=*", "about:blank"]
    self.log = open(os.path.join(user_data_dir, "chromium.log"), "w")
    self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
    self.ws = None
    self._id = 0
    self.console = []
    try:
      self.port = self._wait_port(port_file)
      self._connect()
    except BaseException:
      self.close()
      raise

  def _wait_port(self, port_file, timeout=30.0) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f"chromium exited with {self.process.returncode} "
                           f"(log: {self.log.name})")
      if os.path.exists(port_file):
        with open(port_file) as fh:
          first = fh.readline().strip()
        if first.isdigit():
          return int(first)
      time.sleep(0.1)
    raise RuntimeError(f"chromium wrote no DevToolsActivePort in {timeout} s")

  def _connect(self):
    import urllib.request
    import websocket
    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
      targets = json.load(r)
    page = next(t for t in targets if t.get("type") == "page")
    self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60,
                                          suppress_origin=True)
    self.call("Page.enable")
    self.call("Runtime.enable")
    width, height = self.window_size
    self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
              deviceScaleFactor=1, mobile=False)

  def call(self, method: str, **params) -> dict:
    """Send one DevTools command and return its result (events meanwhile are kept)."""
    self._id += 1
    ident = self._id
    self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
    while True:
      message = json.loads(self.ws.recv())
      if message.get("id") == ident:
        if "error" in message:
          raise RuntimeError(f"{method}: {message['error']}")
        return message.get("result", {})
      self._event(message)

  def _event(self, message):
    if message.get("method") == "Runtime.consoleAPICalled":
      args = message["params"].get("args", [])
      self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
    elif message.get("method") == "Runtime.exceptionThrown":
      details = message["params"]["exceptionDetails"]
      self.console.append("exception: " + str(details.get("exception", {}).get(
        "description", details.get("text"))))

  def navigate(self, url: str):
    self.call("Page.navigate", url=url)

  def evaluate(self, expression: str):
    result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
    return result.get("result", {}).get("value")

  def screenshot(self) -> bytes:
    data = self.call("Page.captureScreenshot", format="png")["data"]
    return base64.b64decode(data)

  def close(self):
    try:
      if self.ws is not None:
        self.ws.close()
    finally:
      self.process.terminate()
      try:
        self.process.wait(10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
      self.log.close()


# ---------------------------------------------------------------------------------------------
# Dataset

def blob_neurons(shape=(64, 64, 64), seed=0):
  """Labels of three tube-and-soma neurons on background 0, and an EM-like image, (x, y, z)."""
  grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape],
                              indexing="ij"), -1)
  labels = np.zeros(shape, np.uint64)
  neurons = {
    11: ((16, 16, 8), (48, 40, 56), 5.0),
    22: ((50, 12, 10), (12, 52, 50), 4.0),
    33: ((32, 56, 6), (40, 8, 58), 4.5),
  }
  for label, (start, end, radius) in neurons.items():
    start, end = np.array(start, np.float32), np.array(end, np.float32)
    axis = end - start
    t = np.clip(((grid - start) @ axis) / (axis @ axis), 0, 1)
    dist = np.linalg.norm(grid - (start + t[..., None] * axis), axis=-1)
    soma = np.linalg.norm(grid - start, axis=-1) < radius * 2
    labels[((dist < radius) | soma) & (labels == 0)] = label
  return labels, em_like(labels, seed)


def em_like(labels, seed=0) -> np.ndarray:
  """uint8 image: textured cytoplasm, light neurons with dark membranes."""
  from scipy import ndimage
  rng = np.random.default_rng(seed)
  texture = ndimage.gaussian_filter(rng.normal(0, 1, labels.shape), 1.5)
  image = 125 + 22 * texture / (texture.std() + 1e-6) + 6 * rng.normal(0, 1, labels.shape)
  inside = labels > 0
  image[inside] = 185 + 6 * rng.normal(0, 1, int(inside.sum()))
  membrane = inside & ~ndimage.binary_erosion(inside, iterations=1)
  image[membrane] = 45
  return np.clip(image, 0, 255).astype(np.uint8)


def affinities_of(labels) -> np.ndarray:
  """float32 (x, y, z, 3) affinities: 1 between equal non-zero neighbours."""
  aff = np.zeros(labels.shape + (3,), np.float32)
  for axis in range(3):
    same = np.diff(labels, axis=axis) == 0
    sl = [slice(None)] * 3
    sl[axis] = slice(1, None)
    aff[tuple(sl) + (axis,)] = same & (labels[tuple(sl)] > 0)
  return aff


def organelles_of(labels) -> np.ndarray:
  """uint8 (x, y, z, 3) nucleus / mitochondria / synapse probabilities (simple shapes)."""
  out = np.zeros(labels.shape + (3,), np.uint8)
  out[..., 0] = np.where(labels == 11, 255, 0)
  out[20:28, 20:28, 20:28, 1] = 255
  out[30:34, 30:34, 30:34, 2] = 255
  return out


def write_layer(cloudpath, layer_type, data, resolution):
  """Write an (x, y, z[, c]) array as a precomputed layer with CloudVolume's defaults."""
  from cloudvolume import CloudVolume
  channels = data.shape[3] if data.ndim == 4 else 1
  info = CloudVolume.create_new_info(
    num_channels=channels, layer_type=layer_type, data_type=data.dtype.name,
    encoding="raw" if layer_type == "image" else "compressed_segmentation",
    resolution=list(resolution), voxel_offset=[0, 0, 0], volume_size=list(data.shape[:3]),
    chunk_size=[32, 32, 32])
  cv = CloudVolume(cloudpath, info=info, progress=False)
  cv.commit_info()
  cv[:, :, :] = data


def write_dataset(root: str, resolution=(8, 8, 8), shape=(64, 64, 64)) -> dict:
  """Write image, affinities, organelles, segmentation (+ meshes, skeletons) under root.

  CloudVolume's and Igneous' defaults are kept (gzip chunks, gzip mesh fragments) so the
  server's `.gz` handling is exercised by the browser.
  """
  import igneous.task_creation as tc
  from taskqueue import LocalTaskQueue
  labels, image = blob_neurons(shape)
  prefix = "file://" + os.path.abspath(root)
  for name, layer_type, data in (("image", "image", image),
                                 ("segmentation", "segmentation", labels),
                                 ("affinities", "image", affinities_of(labels)),
                                 ("organelles", "image", organelles_of(labels))):
    write_layer(f"{prefix}/{name}", layer_type, data, resolution)
  seg = f"{prefix}/segmentation"
  tq = LocalTaskQueue(parallel=1, progress=False)
  tq.insert(tc.create_meshing_tasks(seg, mip=0, shape=(64, 64, 64), mesh_dir="mesh",
                                    dust_threshold=50))
  tq.execute(progress=False)
  tq.insert(tc.create_mesh_manifest_tasks(seg, magnitude=1))
  tq.execute(progress=False)
  tq.insert(tc.create_skeletonizing_tasks(seg, mip=0, shape=(64, 64, 64),
                                          teasar_params={"scale": 4, "const": 40},
                                          dust_threshold=100))
  tq.execute(progress=False)
  tq.insert(tc.create_unsharded_skeleton_merge_tasks(seg, magnitude=1, dust_threshold=100,
                                                     tick_threshold=0))
  tq.execute(progress=False)
  ids = sorted(int(i) for i in np.unique(labels) if i)
  return {"prefix": prefix, "segments": ids, "resolution": resolution, "shape": shape}
