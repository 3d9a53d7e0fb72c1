"""Neuroglancer states and links for the layers of a run.

`build_state` makes one `neuroglancer.ViewerState` with the EM image, affinities (RGB),
organelles (one colour per channel), supervoxels (hidden), the segmentation with the tracked
neurons selected (meshes + skeletons), and nuclei / synapse annotations. Cloudpaths become
Neuroglancer data sources (`gs://b/p` -> `precomputed://gs://b/p`, ...); `file://` layers need
a server (`iicats view`), which is what `source_url` is for.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import threading
from typing import Callable, Iterable, Sequence

import click
import numpy as np
# neuroglancer (0.75 s with tensorstore) is imported by the functions that build states, not
# by every command that imports the CLI

from iicats_cv.errors import IicatsError, output_file_option

DEFAULT_PREFIX = "https://neuroglancer-demo.appspot.com/"

AFFINITY_SHADER = """\
void main() {
  emitRGB(vec3(toNormalized(getDataValue(0)),
               toNormalized(getDataValue(1)),
               toNormalized(getDataValue(2))));
}
"""

ORGANELLE_SHADER = """\
#uicontrol float opacity slider(min=0.0, max=1.0, default=0.6, step=0.05)
#uicontrol vec3 nucleus color(default="#2f6bff")
#uicontrol vec3 mitochondria color(default="#22dd44")
#uicontrol vec3 synapse color(default="#ff2a2a")
void main() {
  float n = toNormalized(getDataValue(0));
  float m = toNormalized(getDataValue(1));
  float s = toNormalized(getDataValue(2));
  vec3 rgb = min(n * nucleus + m * mitochondria + s * synapse, vec3(1.0));
  emitRGBA(vec4(rgb, max(n, max(m, s)) * opacity));
}
"""

SKELETON_SHADER = """\
#uicontrol float brightness slider(min=0.2, max=2.0, default=1.3)
void main() {
  emitRGB(min(segmentColor().rgb * brightness, vec3(1.0)));
}
"""

NUCLEUS_COLOR = "#3b7bff"
SYNAPSE_COLOR = "#ff3030"
DEFAULT_ORIENTATION = (0.25, -0.3, -0.08, 0.92)  # an oblique 3D view
VIEW_PIXELS = 450  # the whole volume fits in about this many pixels of a 2D panel
PROJECTION_MARGIN = 2.5  # 3D panel height / largest volume side
INFO_TIMEOUT_S = 10.0  # reading a layer's info for the view's geometry (best effort)


def _no_local_source(cloudpath: str) -> str:
  raise IicatsError(
    f"{cloudpath}: a local (file://) layer cannot be opened by a web Neuroglancer link; "
    "serve the run with `iicats view OUT_PREFIX` instead")


# ---------------------------------------------------------------------------------------------
# Sources

def to_source(cloudpath: str, source_url: Callable[[str], str | None] = _no_local_source) -> str:
  """The Neuroglancer data source URL of a precomputed layer's cloudpath.

  gs:// s3:// http(s):// become `precomputed://…`; `s3://http(s)://host:port/bucket/path`
  (an S3-compatible server) is read over plain HTTP from that endpoint; `file://` paths (and
  plain local paths) go through `source_url`, which maps them to a served URL.
  """
  path = str(cloudpath).strip().removeprefix("precomputed://")
  if "://" not in path:
    path = "file://" + os.path.abspath(os.path.expanduser(path))
  protocol, rest = path.split("://", 1)
  if protocol == "file":
    return _local_source(path, source_url)
  if protocol == "s3" and rest.startswith(("http://", "https://")):
    return "precomputed://" + rest.rstrip("/")
  if protocol in ("gs", "s3", "http", "https"):
    return "precomputed://" + path.rstrip("/")
  raise IicatsError(
    f"{cloudpath}: Neuroglancer cannot read '{protocol}://' layers "
    "(use gs://, s3://, http(s):// or a file:// layer served by `iicats view`)")


def _local_source(path: str, source_url) -> str:
  url = source_url(path)
  if url is None:
    url = _no_local_source(path)
  url = str(url)
  return url if url.startswith("precomputed://") else "precomputed://" + url.rstrip("/")


# ---------------------------------------------------------------------------------------------
# State

def _coordinate_space(resolution_nm) -> neuroglancer.CoordinateSpace:
  import neuroglancer
  return neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm",
                                      scales=[float(r) for r in resolution_nm])


def _annotation_space(resolution_nm):
  return _coordinate_space(resolution_nm if resolution_nm is not None else (1, 1, 1))


def _to_voxels(points_nm, resolution_nm) -> np.ndarray:
  scale = np.asarray(resolution_nm if resolution_nm is not None else (1, 1, 1), float)
  return np.asarray(points_nm, dtype=float) / scale


def _segment_ids(segments: Iterable) -> list[int]:
  ids = []
  for segment in segments or ():
    try:
      value = int(segment)
    except (TypeError, ValueError):
      raise IicatsError(f"segment id '{segment}' is not an integer")
    if value <= 0:
      raise IicatsError(f"segment id {value}: ids are positive (0 is background)")
    ids.append(value)
  return sorted(set(ids))


IMAGE_SHADER = """\
#uicontrol invlerp normalized
void main() {
  emitGrayscale(normalized());
}
"""


def image_layer(source: str, window=None) -> neuroglancer.ImageLayer:
  """The EM image in greyscale; window (lo, hi): the grey values shown black to white (what
  the run mapped onto the model's 0-255, for images not of uint8)."""
  import neuroglancer
  if window is None:
    return neuroglancer.ImageLayer(source=source)
  return neuroglancer.ImageLayer(source=source, shader=IMAGE_SHADER, shader_controls={
    "normalized": {"range": [float(window[0]), float(window[1])]}})


def affinity_layer(source: str) -> neuroglancer.ImageLayer:
  """x, y, z affinities as red, green, blue."""
  import neuroglancer
  return neuroglancer.ImageLayer(source=source, shader=AFFINITY_SHADER)


def organelle_layer(source: str) -> neuroglancer.ImageLayer:
  """Nucleus blue, mitochondria green, synapse red; opacity in the shader."""
  import neuroglancer
  return neuroglancer.ImageLayer(source=source, shader=ORGANELLE_SHADER)


def segmentation_layer(source: str, segments=(), skeletons: bool = True):
  """A segmentation with `segments` selected; meshes and skeletons of those are drawn."""
  import neuroglancer
  layer = neuroglancer.SegmentationLayer(source=source, segments=_segment_ids(segments))
  if skeletons:
    layer.skeleton_shader = SKELETON_SHADER
    layer.skeleton_rendering.mode2d = "lines_and_points"
    layer.skeleton_rendering.mode3d = "lines"
    layer.skeleton_rendering.line_width3d = 2.0
  return layer


def nuclei_layer(nuclei_nm, resolution_nm=None) -> neuroglancer.LocalAnnotationLayer:
  """Point annotations at nucleus centres (input in nm, stored in the layer's voxels)."""
  import neuroglancer
  points = np.asarray(nuclei_nm, dtype=float).reshape(-1, 3)
  voxels = _to_voxels(points, resolution_nm)
  annotations = [neuroglancer.PointAnnotation(id=f"nucleus-{i}", point=p.tolist())
                 for i, p in enumerate(voxels)]
  return neuroglancer.LocalAnnotationLayer(
    dimensions=_annotation_space(resolution_nm), annotations=annotations,
    annotation_color=NUCLEUS_COLOR)


def synapse_layer(synapses_nm, resolution_nm=None) -> neuroglancer.LocalAnnotationLayer:
  """Line annotations pre -> post (input (S, 2, 3) nm)."""
  import neuroglancer
  pairs = np.asarray(synapses_nm, dtype=float).reshape(-1, 2, 3)
  voxels = _to_voxels(pairs, resolution_nm)
  annotations = [neuroglancer.LineAnnotation(id=f"synapse-{i}", point_a=pre.tolist(),
                                             point_b=post.tolist())
                 for i, (pre, post) in enumerate(voxels)]
  return neuroglancer.LocalAnnotationLayer(
    dimensions=_annotation_space(resolution_nm), annotations=annotations,
    annotation_color=SYNAPSE_COLOR)


def _check_triple(values, name):
  if values is None:
    return None
  array = np.asarray(values, dtype=float).reshape(-1)
  if array.size != 3 or not np.all(np.isfinite(array)):
    raise IicatsError(f"{name}: expected three numbers x,y,z, got {values!r}")
  return array


def build_state(image=None, segmentation=None, affinities=None, organelles=None,
                supervoxels=None, segments: Iterable = (), nuclei_nm=None, synapses_nm=None,
                resolution_nm=None, position_nm=None,
                source_url: Callable[[str], str | None] = _no_local_source,
                layout="xy-3d", extent_nm=None,
                tracked_layers: dict | None = None,
                image_window=None) -> neuroglancer.ViewerState:
  """A Neuroglancer state for the layers of a run (every argument optional).

  Layer cloudpaths are converted with `to_source` (file:// through `source_url`).
  `segments` are selected in the segmentation layer; `tracked_layers` {name: (cloudpath,
  segment ids)} are the layers `iicats track` writes, each shown with its neurons selected
  (the run's segmentation is hidden then); `image_window` (lo, hi) sets the image's grey
  range (image_layer); nuclei (K, 3) and synapses (S, 2, 3)
  are positions in nm, shown as point / pre->post line annotations. `resolution_nm` sets the
  state's dimensions (x, y, z voxels of that size); `position_nm` centres the view and
  `extent_nm` (the volume's size, with `resolution_nm`) zooms both panels to show all of it.
  """
  import neuroglancer
  resolution = _check_triple(resolution_nm, "resolution_nm")
  if resolution is not None and np.any(resolution <= 0):
    raise IicatsError(f"resolution_nm: values must be positive, got {resolution_nm!r}")
  position = _check_triple(position_nm, "position_nm")
  state = neuroglancer.ViewerState()
  if resolution is not None:
    state.dimensions = _coordinate_space(resolution)
    if position is not None:
      state.position = (position / resolution).tolist()
  add = _layer_adder(state, source_url)
  add("image", image, lambda s: image_layer(s, image_window))
  add("affinities", affinities, affinity_layer, visible=False)
  add("organelles", organelles, organelle_layer)
  add("supervoxels", supervoxels, lambda s: segmentation_layer(s, skeletons=False),
      visible=False)
  add("segmentation", segmentation, lambda s: segmentation_layer(s, segments),
      visible=not tracked_layers)
  for name, (cloudpath, ids) in (tracked_layers or {}).items():
    add(name, cloudpath, lambda s, ids=ids: segmentation_layer(s, ids))
  if nuclei_nm is not None and len(nuclei_nm):
    state.layers.append(name="nuclei", layer=nuclei_layer(nuclei_nm, resolution))
  if synapses_nm is not None and len(synapses_nm):
    state.layers.append(name="synapses", layer=synapse_layer(synapses_nm, resolution))
  _set_view(state, layout, _check_triple(extent_nm, "extent_nm"), resolution)
  return state


def _layer_adder(state, source_url):
  def add(name, cloudpath, make, visible=True):
    if not cloudpath:
      return
    layer = make(to_source(cloudpath, source_url))
    state.layers.append(name=name, layer=layer, visible=None if visible else False)
  return add


def _set_view(state, layout, extent_nm, resolution):
  state.layout = layout
  state.projection_orientation = list(DEFAULT_ORIENTATION)
  if extent_nm is not None and resolution is not None:
    voxels = float(np.max(extent_nm / resolution))
    state.cross_section_scale = max(voxels / VIEW_PIXELS, 1e-3)
    state.projection_scale = voxels * PROJECTION_MARGIN


def state_to_url(state: neuroglancer.ViewerState, prefix: str = DEFAULT_PREFIX) -> str:
  """The shareable Neuroglancer URL of `state` (client at `prefix`)."""
  import neuroglancer
  return neuroglancer.to_url(state, prefix=prefix.rstrip("/") + "/")


def state_json(state: neuroglancer.ViewerState) -> dict:
  """The state as plain JSON data (what Neuroglancer's 'Edit JSON state' shows)."""
  import neuroglancer
  return json.loads(neuroglancer.url_state.to_json_dump(state))


# ---------------------------------------------------------------------------------------------
# Inputs of the command

def parse_segments(text: str | None) -> list[int]:
  """'1,2,3' -> [1, 2, 3], with an error naming the bad entry."""
  if not text:
    return []
  parts = [p.strip() for p in str(text).split(",") if p.strip()]
  return _segment_ids(parts)


def read_tracked(path: str) -> list[int]:
  """Segment ids from a tracked-neurons JSON file: [{"id": int, "seed_nm": [...]}, ...]."""
  try:
    with open(path) as fh:
      data = json.load(fh)
  except OSError as err:
    raise IicatsError(f"tracked neurons {path}: cannot read ({err.strerror})")
  except json.JSONDecodeError as err:
    raise IicatsError(f"tracked neurons {path}: not valid JSON ({err})")
  if not isinstance(data, list) or not all(isinstance(n, dict) and "id" in n for n in data):
    raise IicatsError(f"tracked neurons {path}: expected a list of {{\"id\": ..., ...}} objects")
  return _segment_ids(n["id"] for n in data)


def _read_csv_rows(path: str, header: Sequence[str], what: str) -> np.ndarray:
  try:
    with open(path, newline="") as fh:
      rows = [r for r in csv.reader(fh) if r and "".join(r).strip()]
  except OSError as err:
    raise IicatsError(f"{what} {path}: cannot read ({err.strerror})")
  if not rows or [c.strip().lower() for c in rows[0][:len(header)]] != list(header):
    raise IicatsError(f"{what} {path}: line 1 must be the header {','.join(header)} (nm)")
  values = []
  for number, row in enumerate(rows[1:], start=2):
    try:
      value = [float(v) for v in row[:len(header)]]
    except ValueError:
      value = []
    if len(value) != len(header) or not np.all(np.isfinite(value)):
      raise IicatsError(f"{what} {path}: line {number}: expected {len(header)} numbers, "
                        f"got {','.join(row)}")
    values.append(value)
  return np.array(values, dtype=float).reshape(-1, len(header))


def read_nuclei(path: str) -> np.ndarray:
  """(K, 3) nucleus centres in nm from a CSV `x,y,z`."""
  try:
    from iicats_cv.skeletons import read_nuclei_csv
  except ImportError:
    return _read_csv_rows(path, ("x", "y", "z"), "nuclei")
  return np.asarray(read_nuclei_csv(path), dtype=float).reshape(-1, 3)


def read_synapses(path: str) -> np.ndarray:
  """(S, 2, 3) pre/post synapse positions in nm from a CSV `pre_x,…,post_z`."""
  try:
    from iicats_cv.skeletons import read_synapses_csv
  except ImportError:
    header = ("pre_x", "pre_y", "pre_z", "post_x", "post_y", "post_z")
    return _read_csv_rows(path, header, "synapses").reshape(-1, 2, 3)
  return np.asarray(read_synapses_csv(path), dtype=float).reshape(-1, 2, 3)


def _read_geometry(cloudpath: str) -> dict:
  from cloudvolume import CloudVolume
  from iicats_cv.layers import normalize_cloudpath, resolve_cloudpath
  cv = CloudVolume(resolve_cloudpath(normalize_cloudpath(cloudpath)), progress=False)
  bounds = cv.meta.bounds(0)
  resolution = np.asarray(cv.meta.resolution(0), float)
  low, high = np.asarray(bounds.minpt, float), np.asarray(bounds.maxpt, float)
  return {"resolution_nm": resolution.tolist(),
          "position_nm": ((low + high) / 2.0 * resolution).tolist(),
          "extent_nm": ((high - low) * resolution).tolist()}


def layer_geometry(cloudpath: str | None, timeout: float = INFO_TIMEOUT_S) -> dict:
  """{resolution_nm, position_nm (centre), extent_nm} of a layer from its info; {} when the
  info cannot be read within `timeout` seconds (the link then lets Neuroglancer choose)."""
  if not cloudpath:
    return {}
  result = {}

  def read():
    try:
      result["geometry"] = _read_geometry(cloudpath)
    except Exception as err:  # noqa: BLE001 - the link still works without it
      result["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:200]

  thread = threading.Thread(target=read, daemon=True)
  thread.start()
  thread.join(timeout)
  if "geometry" in result:
    return result["geometry"]
  why = result.get("error", f"no answer in {timeout:g} s")
  print(f"note: could not read {cloudpath}/info ({why}); Neuroglancer will choose the "
        "view's dimensions and position", file=sys.stderr)
  return {}


# ---------------------------------------------------------------------------------------------
# Command

@click.command("link")
@click.option("--image", default=None, help="EM image layer cloudpath.")
@click.option("--segmentation", default=None, help="Segmentation layer cloudpath.")
@click.option("--affinities", default=None, help="Affinities layer (3 channels x,y,z).")
@click.option("--organelles", default=None,
              help="Organelles layer (nucleus, mitochondria, synapse channels).")
@click.option("--supervoxels", default=None, help="Supervoxels layer (added hidden).")
@click.option("--segments", default=None, help="Segment ids to select, e.g. 1,2,3.")
@click.option("--tracked", default=None, type=click.Path(dir_okay=False),
              help="Tracked neurons JSON (list of {\"id\": ...}); selects those ids.")
@click.option("--nuclei", default=None, type=click.Path(dir_okay=False),
              help="Nuclei CSV with header x,y,z (nm): point annotations.")
@click.option("--synapses", default=None, type=click.Path(dir_okay=False),
              help="Synapses CSV pre_x,pre_y,pre_z,post_x,post_y,post_z (nm): lines.")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
              help="Neuroglancer client URL the link opens.")
@click.option("--json", "json_path", default=None, callback=output_file_option,
              help="Also write the JSON state here.")
def link_command(image, segmentation, affinities, organelles, supervoxels, segments, tracked,
                 nuclei, synapses, prefix, json_path):
  """Print a Neuroglancer link showing the layers of a run.

  Remote layers (gs://, s3://, http(s)://) only; for file:// layers use `iicats view`.

  \b
  Example:
    iicats link --image gs://lab/em --segmentation gs://lab/run1/segmentation \\
      --organelles gs://lab/run1/organelles --tracked tracked.json --json state.json
  """
  if segments and tracked:
    raise IicatsError("--segments and --tracked: give one of them")
  if not any((image, segmentation, affinities, organelles, supervoxels)):
    raise IicatsError("no layer given (use --image, --segmentation, ...)")
  ids = read_tracked(tracked) if tracked else parse_segments(segments)
  # stdout holds the link alone (url=$(iicats link …)): CloudVolume's notes, such as which
  # Google credentials it uses, go to stderr
  with contextlib.redirect_stdout(sys.stderr):
    geometry = layer_geometry(segmentation or supervoxels or image)
  state = build_state(
    image=image, segmentation=segmentation, affinities=affinities, organelles=organelles,
    supervoxels=supervoxels, segments=ids,
    nuclei_nm=read_nuclei(nuclei) if nuclei else None,
    synapses_nm=read_synapses(synapses) if synapses else None,
    **geometry)
  click.echo(state_to_url(state, prefix))
  if json_path:
    with open(json_path, "w") as fh:
      json.dump(state_json(state), fh, indent=1)
    click.echo(f"state written to {json_path}", err=True)
