"""Local viewing of a run: a CORS file server for `file://` layers plus a Neuroglancer viewer.

`DataServer` serves a folder of precomputed layers over HTTP the way Neuroglancer reads them
from a bucket: CORS on every answer, `X` answered from `X.gz` with `Content-Encoding: gzip`
(CloudVolume / Igneous write gzip chunks, meshes and skeletons as `.gz` files), byte ranges
for sharded files, 404 for missing files, and nothing outside the folder (`..`, symlinks
leaving it: 403). `view` serves a run's output prefix and opens a Python-side
`neuroglancer.Viewer` on it.
"""
from __future__ import annotations

import collections
import email.utils
import errno
import gzip
import http.server
import json
import os
import socket
import threading
import time
import urllib.parse

import click

from iicats_cv.errors import IicatsError

DEFAULT_PORT = 9015
LAYER_NAMES = ("image", "affinities", "organelles", "supervoxels", "segmentation")
# where `iicats view` serves a run's input image that lies on local disk outside the run
INPUT_IMAGE_MOUNT = "_image"

RequestRecord = collections.namedtuple("RequestRecord", "method path status encoding")

CORS_HEADERS = (
  ("Access-Control-Allow-Origin", "*"),
  ("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS"),
  ("Access-Control-Allow-Headers", "Range, X-Requested-With, Content-Type, Authorization"),
  ("Access-Control-Expose-Headers", "Content-Range, Content-Length, Content-Encoding, "
                                    "Accept-Ranges"),
  ("Access-Control-Max-Age", "86400"),
)


class Forbidden(Exception):
  """The request names something outside the served folder."""


# ---------------------------------------------------------------------------------------------
# Paths and bodies

def resolve_request_path(root: str, request_target: str) -> str:
  """The real filesystem path a request target names under `root` (itself a real path).

  Raises Forbidden for `..` segments (also percent-encoded), NUL bytes, backslashes, and
  paths whose symlinks lead outside root.
  """
  path = urllib.parse.urlsplit(request_target).path
  text = urllib.parse.unquote(path, errors="strict")
  if "\x00" in text or "\\" in text:
    raise Forbidden(text)
  parts = [p for p in text.split("/") if p not in ("", ".")]
  if any(p == ".." for p in parts):
    raise Forbidden(text)
  return os.path.join(root, *parts)


def inside(root: str, path: str) -> bool:
  """Whether `path`, symlinks resolved, is root or below it."""
  real = os.path.realpath(path)
  return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def parse_range(header: str | None, size: int):
  """(start, end inclusive) for a single 'bytes=' range, None without one, 'bad' if invalid."""
  if not header:
    return None
  unit, _, spec = header.partition("=")
  if unit.strip().lower() != "bytes" or "," in spec:
    return None  # unsupported forms: answer the whole body (allowed by RFC 9110)
  first, _, last = spec.strip().partition("-")
  try:
    if first == "":
      length = int(last)
      if length <= 0:
        return "bad"
      return max(size - length, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
  except ValueError:
    return None
  if start >= size or end < start:
    return "bad"
  return start, min(end, size - 1)


def content_type(path: str) -> str:
  """application/json for info/JSON files, octet-stream otherwise."""
  name = os.path.basename(path)
  if name in ("info", "provenance", "transform.json") or name.endswith(".json"):
    return "application/json"
  return "application/octet-stream"


def decompress_file(path: str) -> bytes:
  """The decoded contents of a .gz / .br / .zst file."""
  with open(path, "rb") as fh:
    data = fh.read()
  if path.endswith(".gz"):
    return gzip.decompress(data)
  from cloudfiles.compression import decompress
  encoding = {".br": "br", ".zst": "zstd", ".zstd": "zstd"}[os.path.splitext(path)[1]]
  return decompress(data, encoding)


# ---------------------------------------------------------------------------------------------
# Request handler

class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves files under `self.server.root`; see DataServer."""

  protocol_version = "HTTP/1.1"
  server_version = "iicats-data"

  def do_OPTIONS(self):  # noqa: N802 (http.server naming)
    self.send_response(204)
    self._common_headers()
    self.send_header("Content-Length", "0")
    self.end_headers()
    self._record(204)

  def do_GET(self):  # noqa: N802
    self._serve(head=False)

  def do_HEAD(self):  # noqa: N802
    self._serve(head=True)

  def log_message(self, format, *args):  # noqa: A002 - quiet unless asked
    if self.server.verbose:
      super().log_message(format, *args)

  # -- helpers --

  def _common_headers(self):
    for name, value in CORS_HEADERS:
      self.send_header(name, value)

  def _record(self, status, encoding=None):
    path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path, errors="replace")
    self.server.record(RequestRecord(self.command, path, status, encoding))

  def _error(self, status, head):
    body = f"{status} {http.server.BaseHTTPRequestHandler.responses[status][0]}\n".encode()
    self.send_response(status)
    self._common_headers()
    self.send_header("Content-Type", "text/plain")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self._record(status)
    if not head:
      self.wfile.write(body)

  def _serve(self, head):
    root, target = self.server.root, self.path
    first, _, rest = urllib.parse.urlsplit(target).path.lstrip("/").partition("/")
    if urllib.parse.unquote(first) in self.server.mounts:
      root, target = self.server.mounts[urllib.parse.unquote(first)], "/" + rest
    try:
      path = resolve_request_path(root, target)
      found = self._find(root, path)
    except (Forbidden, UnicodeDecodeError):
      return self._error(403, head)
    if found is None:
      return self._error(404, head)
    file_path, encoding = found
    if encoding is None:
      return self._send_file(file_path, path, head)
    accepts = self.headers.get("Accept-Encoding", "")
    if encoding == "gzip" and "gzip" in accepts and not self.headers.get("Range"):
      return self._send_file(file_path, path, head, encoding="gzip")
    return self._send_bytes(decompress_file(file_path), path, head, encoding="decoded")

  def _find(self, root, path):
    """(file, compression) answering `path`: itself, or path.gz/.br/.zst; None if missing."""
    candidates = ((path, None), (path + ".gz", "gzip"), (path + ".br", "br"),
                  (path + ".zst", "zstd"))
    for candidate, encoding in candidates:
      if os.path.isfile(candidate):
        if not inside(root, candidate):
          raise Forbidden(candidate)
        return candidate, encoding
    if os.path.lexists(path) and not inside(root, path):
      raise Forbidden(path)
    return None

  def _start(self, status, path, length, encoding=None, extra=()):
    self.send_response(status)
    self._common_headers()
    self.send_header("Content-Type", content_type(path))
    self.send_header("Content-Length", str(length))
    self.send_header("Accept-Ranges", "bytes" if encoding is None else "none")
    self.send_header("Cache-Control", "no-cache")
    if encoding == "gzip":
      self.send_header("Content-Encoding", "gzip")
      self.send_header("Vary", "Accept-Encoding")
    for name, value in extra:
      self.send_header(name, value)
    self.end_headers()

  def _send_file(self, file_path, path, head, encoding=None):
    size = os.path.getsize(file_path)
    byte_range = None if encoding else parse_range(self.headers.get("Range"), size)
    if byte_range == "bad":
      self._start(416, path, 0, extra=[("Content-Range", f"bytes */{size}")])
      return self._record(416)
    start, end = byte_range or (0, size - 1)
    status = 206 if byte_range else 200
    extra = [("Content-Range", f"bytes {start}-{end}/{size}")] if byte_range else []
    extra.append(("Last-Modified", email.utils.formatdate(os.path.getmtime(file_path),
                                                          usegmt=True)))
    self._start(status, path, end - start + 1, encoding, extra)
    # recorded before the body goes out: a client that has read it sees its record
    self._record(status, encoding)
    if not head:
      with open(file_path, "rb") as fh:
        fh.seek(start)
        self._copy(fh, end - start + 1)

  def _send_bytes(self, data, path, head, encoding):
    byte_range = parse_range(self.headers.get("Range"), len(data))
    if byte_range == "bad":
      self._start(416, path, 0, extra=[("Content-Range", f"bytes */{len(data)}")])
      return self._record(416)
    start, end = byte_range or (0, len(data) - 1)
    status = 206 if byte_range else 200
    extra = [("Content-Range", f"bytes {start}-{end}/{len(data)}")] if byte_range else []
    self._start(status, path, end - start + 1, extra=extra)
    self._record(status, encoding)
    if not head:
      self.wfile.write(data[start:end + 1])

  def _copy(self, fh, remaining):
    while remaining > 0:
      block = fh.read(min(remaining, 1 << 20))
      if not block:
        break
      self.wfile.write(block)
      remaining -= len(block)


class _HTTPServer(http.server.ThreadingHTTPServer):
  daemon_threads = True
  allow_reuse_address = True

  def handle_error(self, request, client_address):
    import sys
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      super().handle_error(request, client_address)


class _HTTPServer6(_HTTPServer):
  address_family = socket.AF_INET6


# ---------------------------------------------------------------------------------------------
# DataServer

def advertised_host(host: str) -> str:
  """The host name to put in URLs for a bind address (wildcards -> this machine's name)."""
  if host in ("", "0.0.0.0", "::"):
    return socket.getfqdn()
  return f"[{host}]" if ":" in host else host


class DataServer:
  """A threaded HTTP server for the precomputed layers under `root_dir` (see module doc).

  Starts serving at construction; `close()` (or leaving a `with` block) stops it. Every
  request is recorded in `requests` (RequestRecord(method, decoded path, status, encoding)).
  """

  def __init__(self, root_dir: str, host: str = "127.0.0.1", port: int = 0,
               verbose: bool = False, mounts: dict | None = None):
    """mounts: {name: folder} served at /name/ besides root_dir (nothing above each folder)."""
    for folder in [root_dir, *(mounts or {}).values()]:
      if not os.path.isdir(folder):
        raise IicatsError(f"{folder}: not a folder to serve")
    server_class = _HTTPServer6 if ":" in host else _HTTPServer
    try:
      self._httpd = server_class((host, int(port)), _Handler)
    except OSError as err:
      if err.errno == errno.EADDRINUSE:
        raise IicatsError(f"port {port} on {host} is in use (choose another with --port)")
      raise IicatsError(f"cannot serve on {host}:{port} ({err.strerror or err})")
    self._httpd.root = os.path.realpath(root_dir)
    self._httpd.mounts = {name: os.path.realpath(folder)
                          for name, folder in (mounts or {}).items()}
    self._httpd.verbose = verbose
    self._httpd.record = self._record
    self._lock = threading.Lock()
    self.requests: list[RequestRecord] = []
    self.host = host
    self.port = self._httpd.server_address[1]
    self._thread = threading.Thread(target=self._httpd.serve_forever, name="iicats-data",
                                    kwargs={"poll_interval": 0.2}, daemon=True)
    self._thread.start()

  @property
  def root(self) -> str:
    return self._httpd.root

  @property
  def url(self) -> str:
    """Base URL of the served folder, without trailing slash."""
    return f"http://{advertised_host(self.host)}:{self.port}"

  def source_url(self, cloudpath: str) -> str:
    """`precomputed://` URL of a file:// layer under the served folder."""
    path = cloudpath[len("file://"):] if cloudpath.startswith("file://") else cloudpath
    real = os.path.realpath(path)
    for prefix, folder in [("", self.root), *((f"/{name}", folder) for name, folder
                                               in self._httpd.mounts.items())]:
      if inside(folder, real):
        rel = os.path.relpath(real, folder).replace(os.sep, "/")
        quoted = "" if rel == "." else "/" + urllib.parse.quote(rel)
        return f"precomputed://{self.url}{prefix}{quoted}"
    raise IicatsError(f"{cloudpath}: outside the served folder {self.root}")

  def _record(self, record: RequestRecord):
    with self._lock:
      self.requests.append(record)

  def successful(self, prefix: str = "/") -> list[str]:
    """Decoded paths of GET requests under `prefix` answered 200/206."""
    with self._lock:
      return [r.path for r in self.requests
              if r.method == "GET" and r.status in (200, 206) and r.path.startswith(prefix)]

  def close(self):
    """Stop serving and release the port."""
    self._httpd.shutdown()
    self._httpd.server_close()
    self._thread.join(5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------------------------
# view

def run_layers(out_prefix: str) -> dict:
  """{name: cloudpath} of the standard layers with an info file under out_prefix, and the
  run's input image (OUT/pipeline/run.json) where it lies elsewhere."""
  from iicats_cv.layers import join, layer_exists
  from iicats_cv.tasks.common import get_json
  layers = {name: join(out_prefix, name) for name in LAYER_NAMES
            if layer_exists(join(out_prefix, name))}
  image = (get_json(join(out_prefix, "pipeline"), "run.json") or {}).get("image")
  if "image" not in layers and image and layer_exists(image):
    layers["image"] = image
  return layers


def tracked_layers(out_prefix: str) -> dict:
  """{name: (cloudpath, segment ids)} of the layers `iicats track --name NAME` wrote under
  out_prefix: a layer OUT/NAME beside its neuron list OUT/NAME.json."""
  from cloudfiles import CloudFiles
  from iicats_cv.layers import join, layer_exists, resolve_cloudpath
  from iicats_cv.tasks.common import get_json
  found = {}
  for key in sorted(CloudFiles(resolve_cloudpath(out_prefix)).list(flat=True)):
    name = key.removesuffix(".json")
    if "/" in key or name == key or not layer_exists(join(out_prefix, name)):
      continue
    neurons = get_json(out_prefix, key)
    if isinstance(neurons, list) and all(isinstance(n, dict) and {"id", "seed"} <= n.keys()
                                         for n in neurons):
      found[name] = (join(out_prefix, name), [n["id"] for n in neurons])
  return found


def _run_annotations(out_prefix: str) -> dict:
  """Tracked ids and nuclei/synapse points stored beside a local run, when present."""
  from iicats_cv.layers import local_path
  from .link import read_nuclei, read_synapses, read_tracked
  base = local_path(out_prefix)
  if base is None:
    return {}
  found = {}
  files = (("tracked", "tracked.json", read_tracked),
           ("nuclei_nm", os.path.join("annotations", "nuclei.csv"), read_nuclei),
           ("synapses_nm", os.path.join("annotations", "synapses.csv"), read_synapses))
  for key, name, read in files:
    path = os.path.join(base, name)
    if os.path.isfile(path):
      found[key] = read(path)
  return found


def _check_local_info(cloudpath: str, name: str) -> None:
  """A served layer's info must be a JSON object with scales: Neuroglancer shows nothing of a
  layer whose info it cannot read, without saying why."""
  from iicats_cv.layers import local_path
  folder = local_path(cloudpath)
  if folder is None:
    return
  try:
    with open(os.path.join(folder, "info")) as fh:
      info = json.load(fh)
  except (OSError, ValueError) as err:
    raise IicatsError(f"{name} layer {cloudpath}: its info is not a precomputed info "
                      f"({type(err).__name__}: {err})")
  if not (isinstance(info, dict) and info.get("scales")):
    raise IicatsError(f"{name} layer {cloudpath}: its info is not a precomputed info (no "
                      "scales)")


def view_state(out_prefix: str, source_url=None, segments=None, layout: str = "xy-3d"):
  """The Neuroglancer state of the run under out_prefix (layers found there).

  `segments` None selects the tracked neurons of `{prefix}/tracked.json`, if any.
  """
  from iicats_cv.layers import join
  from iicats_cv.tasks.common import get_json
  from .link import build_state, layer_geometry
  layers = run_layers(out_prefix)
  if not layers:
    raise IicatsError(f"{out_prefix}: no precomputed layer found there "
                      f"(expected some of {', '.join(LAYER_NAMES)})")
  for name, path in layers.items():
    _check_local_info(path, name)
  extra = _run_annotations(out_prefix)
  tracked = extra.pop("tracked", [])
  # the run's region (its outputs' bounds), which may be a box of a larger image
  geometry = layer_geometry(layers.get("segmentation") or layers.get("image")
                            or next(iter(layers.values())))
  kwargs = {"source_url": source_url} if source_url else {}
  window = (get_json(join(out_prefix, "pipeline"), "run.json") or {}).get("image_window")
  return build_state(**layers, segments=tracked if segments is None else segments,
                     layout=layout, **geometry, **extra, **kwargs,
                     tracked_layers=tracked_layers(out_prefix), image_window=window)


def start_view(out_prefix: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
               segments=None, viewer_port: int = 0, layout: str = "xy-3d",
               open_browser: bool = False, verbose: bool = False):
  """Serve a run and open a Neuroglancer viewer on it; returns (viewer, server) at once.

  Local prefixes are served by a DataServer (None for remote prefixes, read directly).
  """
  import neuroglancer
  from iicats_cv.layers import local_path, normalize_cloudpath
  out_prefix = normalize_cloudpath(out_prefix).rstrip("/")
  base = local_path(out_prefix)
  if base is not None and not os.path.isdir(base):
    raise IicatsError(f"{out_prefix}: no such folder")
  server = None
  if base:
    image = run_layers(out_prefix).get("image")
    image_path = local_path(image) if image else None
    outside = image_path is not None and not inside(os.path.realpath(base), image_path)
    server = DataServer(base, host=host, port=port, verbose=verbose,
                        mounts={INPUT_IMAGE_MOUNT: image_path} if outside else None)
  try:
    state = view_state(out_prefix, server.source_url if server else None, segments, layout)
    neuroglancer.set_server_bind_address(host, bind_port=viewer_port)
    viewer = neuroglancer.Viewer()
    viewer.set_state(state)
  except BaseException:
    if server:
      server.close()
    raise
  if open_browser:
    import webbrowser
    webbrowser.open(viewer.get_viewer_url())
  return viewer, server


def view(out_prefix: str, host: str = "127.0.0.1", open_browser: bool = False, segments=None,
         port: int = DEFAULT_PORT, viewer_port: int = 0, layout: str = "xy-3d",
         block: bool = True, verbose: bool = False):
  """Serve a run's layers and show them in Neuroglancer, printing the viewer URL.

  Blocks until Ctrl-C when `block`; otherwise returns (viewer, server) (server None for a
  remote prefix). Stop a non-blocking view with `server.close()`.
  """
  viewer, server = start_view(out_prefix, host=host, port=port, segments=segments,
                              viewer_port=viewer_port, layout=layout,
                              open_browser=open_browser, verbose=verbose)
  click.echo(f"Neuroglancer: {viewer.get_viewer_url()}")
  if server:
    click.echo(f"layers of {server.root} served at {server.url}")
  if not block:
    return viewer, server
  click.echo("Ctrl-C to stop")
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    click.echo("stopped")
  finally:
    if server:
      server.close()
  return viewer, server


@click.command("view")
@click.argument("out_prefix")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 to let other machines connect).")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port of the layer file server (links printed by `iicats pipeline` "
                   "use the default).")
@click.option("--viewer-port", type=click.IntRange(0, 65535), default=0,
              help="Port of the viewer (0: any).")
@click.option("--segments", default=None,
              help="Segment ids to select, e.g. 1,2,3 (default: OUT_PREFIX/tracked.json).")
@click.option("--layout", default="xy-3d", show_default=True,
              type=click.Choice(["xy", "xz", "yz", "3d", "xy-3d", "xz-3d", "yz-3d", "4panel"]),
              help="Neuroglancer layout.")
@click.option("--open", "open_browser", is_flag=True, help="Open the viewer in a browser.")
@click.option("-v", "--verbose", is_flag=True, help="Log every file request.")
def view_command(out_prefix, host, port, viewer_port, segments, layout, open_browser, verbose):
  """Serve a run's layers locally and open them in Neuroglancer.

  Shows the layers found under OUT_PREFIX (image, affinities, organelles, supervoxels,
  segmentation with meshes and skeletons), the tracked neurons of OUT_PREFIX/tracked.json,
  the layers of `iicats track --name NAME` (OUT_PREFIX/NAME, its neurons selected) and
  OUT_PREFIX/annotations/{nuclei,synapses}.csv. Runs until Ctrl-C.

  \b
  Example:
    iicats view ./iicats-demo
    iicats view file:///data/run1 --segments 12,40 --host 0.0.0.0 --open
  """
  from .link import parse_segments
  ids = parse_segments(segments) if segments else None
  view(out_prefix, host=host, open_browser=open_browser, segments=ids, port=port,
       viewer_port=viewer_port, layout=layout, verbose=verbose)
