"""Precomputed layer helpers: cloudpaths, validated opening, creation with provenance.

Every layer is a Neuroglancer precomputed layer opened with CloudVolume from a cloudpath
(`file://`, `gs://`, `s3://`, `s3://http://host:port/bucket/…` for S3-compatible servers,
`http(s)://` read-only). Arrays are (x, y, z[, c]) as CloudVolume returns them.
"""
from __future__ import annotations

import base64
import datetime
import os
import re
import socket
import traceback
from typing import Iterable, Sequence

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import Bbox, CloudVolume
from cloudvolume.exceptions import EmptyVolumeException, InfoUnavailableError

from . import __version__
from .errors import IicatsError

KNOWN_PROTOCOLS = ("file", "gs", "s3", "http", "https", "mem", "matrix", "tigerdata")


def normalize_cloudpath(path: str) -> str:
  """Plain local paths become absolute `file://` cloudpaths; cloudpaths pass through.

  >>> normalize_cloudpath("out/seg")  # doctest: +SKIP
  'file:///home/me/out/seg'
  """
  path = str(path)
  if "://" not in path:
    typo = re.match(r"^([a-z][a-z0-9]*):/", path)
    if typo and (typo.group(1) in KNOWN_PROTOCOLS or typo.group(1) == "precomputed"):
      rest = path[typo.end():].lstrip("/")
      meant = f"file:///{rest}" if typo.group(1) == "file" else f"{typo.group(1)}://{rest}"
      raise IicatsError(f"{path}: malformed cloudpath (did you mean {meant}?)")
    return "file://" + os.path.abspath(os.path.expanduser(path))
  protocol = path.split("://", 1)[0]
  if protocol not in KNOWN_PROTOCOLS and not protocol.startswith(("precomputed", "s3ep")):
    raise IicatsError(
      f"{path}: unknown protocol '{protocol}://' (use file://, gs://, s3:// or http(s)://)")
  return path.removeprefix("precomputed://")


_ENDPOINT_PATH = re.compile(r"^s3://(https?://[^/]+)/(.+)$")
_ALIAS_PROTOCOL = re.compile(r"\b(s3ep[a-z2-7]+)://")


def _alias_for(endpoint: str) -> str:
  return "s3ep" + base64.b32encode(endpoint.encode()).decode().lower().rstrip("=")


def register_endpoint_aliases(text: str) -> None:
  """Register the cloud-files aliases named in `text` (a cloudpath or a task payload).

  The alias name encodes its endpoint, so a worker on another machine can register it from a
  task payload alone (see resolve_cloudpath).
  """
  import cloudfiles.paths
  for alias in set(_ALIAS_PROTOCOL.findall(text)):
    if alias in cloudfiles.paths.ALIASES:
      continue
    encoded = alias[len("s3ep"):].upper()
    endpoint = base64.b32decode(encoded + "=" * (-len(encoded) % 8)).decode()
    cloudfiles.paths.add_alias(alias, f"s3://{endpoint}/")


def resolve_cloudpath(cloudpath: str) -> str:
  """The path to hand to CloudVolume / CloudFiles / Igneous.

  S3-compatible servers are addressed as `s3://http(s)://host:port/bucket/path`; cloud-files
  understands that form but CloudVolume does not, so it becomes a cloud-files alias
  (`s3ep<encoded endpoint>://bucket/path`) registered in this process.
  """
  match = _ENDPOINT_PATH.match(cloudpath)
  if match:
    endpoint, rest = match.groups()
    cloudpath = f"{_alias_for(endpoint)}://{rest}"
  register_endpoint_aliases(cloudpath)
  return cloudpath


def join(prefix: str, *parts: str) -> str:
  """Join a cloudpath prefix and sub-paths with '/'."""
  return "/".join([prefix.rstrip("/")] + [p.strip("/") for p in parts])


def local_path(cloudpath: str) -> str | None:
  """The filesystem path of a `file://` cloudpath, None for remote paths."""
  if cloudpath.startswith("file://"):
    return cloudpath[len("file://"):]
  return None


def _compress_for(cloudpath: str):
  # Uncompressed on local disk so that every reader (tensorstore, a plain static server)
  # reads the chunks as written; remote stores get gzip transfer encoding.
  return False if cloudpath.startswith("file://") else None


def open_layer(cloudpath: str, *, mip: int = 0, layer_type: str | None = None,
               dtypes: Iterable[str] | None = None, num_channels: int | None = None,
               fill_missing: bool = False, what: str = "layer") -> CloudVolume:
  """Open an existing precomputed layer and check what the caller needs of it.

  Raises IicatsError naming the layer when the info is missing or malformed, or when the
  layer type, data type or channel count differ from the expected ones.
  """
  cloudpath = normalize_cloudpath(cloudpath)
  try:
    cv = CloudVolume(resolve_cloudpath(cloudpath), fill_missing=fill_missing, progress=False,
                     compress=_compress_for(cloudpath), bounded=True)
  except InfoUnavailableError:
    raise IicatsError(f"{what} {cloudpath}: no precomputed 'info' file there "
                      "(is the path right? create the layer with 'iicats import')")
  except (ValueError, KeyError, TypeError) as err:
    raise IicatsError(f"{what} {cloudpath}: malformed precomputed info ({err})")
  except Exception as err:  # network, permissions: still one clear line
    if isinstance(err, IicatsError):
      raise
    raise IicatsError(f"{what} {cloudpath}: cannot open ({type(err).__name__}: {err})")
  info = cv.info
  if not isinstance(info.get("scales"), list) or not info["scales"]:
    raise IicatsError(f"{what} {cloudpath}: malformed info (no 'scales')")
  if mip >= len(info["scales"]):
    raise IicatsError(f"{what} {cloudpath}: has no mip {mip} (its {len(info['scales'])} mip(s): "
                      f"{scales_text(cv)}; `iicats downsample` adds more)")
  cv.mip = mip
  if layer_type is not None and cv.layer_type != layer_type:
    raise IicatsError(f"{what} {cloudpath}: is a '{cv.layer_type}' layer, expected '{layer_type}'")
  if dtypes is not None and cv.dtype.name not in tuple(dtypes):
    raise IicatsError(
      f"{what} {cloudpath}: data type is {cv.dtype.name}, expected one of {', '.join(dtypes)}")
  if num_channels is not None and cv.num_channels != num_channels:
    raise IicatsError(
      f"{what} {cloudpath}: has {cv.num_channels} channel(s), expected {num_channels}")
  return cv


def compressed_segmentation_problem(data, shape, dtype, block_size):
  """Why a compressed_segmentation chunk cannot be decoded safely, or None when its structure
  holds: data bytes; shape (x, y, z[, c]); dtype uint32 or uint64; block_size (bx, by, bz).

  Neuroglancer's format, in little-endian 32-bit words: one offset per channel, then per
  channel two header words per block (lookup-table offset | encoded bits << 24, encoded-values
  offset; offsets in words from the channel's start), the bit-packed indices and the lookup
  tables. Every offset, and the table entry of each block's highest index, must lie inside
  the channel's words."""
  if len(data) % 4:
    return f"{len(data)} bytes, not a whole number of 32-bit words"
  words = np.frombuffer(bytes(data), "<u4")
  shape = tuple(int(s) for s in shape) + (1,) * (4 - len(shape))
  channels = shape[3]
  entry_words = 2 if np.dtype(dtype).itemsize == 8 else 1
  block = np.asarray(block_size, np.int64)
  blocks = int(np.prod(-(-np.asarray(shape[:3]) // block)))
  block_voxels = int(np.prod(block))
  if len(words) < channels:
    return f"{len(words)} words, fewer than its {channels} channel offsets"
  starts = words[:channels].astype(np.int64)
  ends = np.r_[starts[1:], len(words)]
  for c, (base, end) in enumerate(zip(starts, np.minimum(ends, len(words)))):
    if base < channels or base + 2 * blocks > end:
      return f"channel {c}'s block headers lie outside its {len(words)} words"
    header = words[base:base + 2 * blocks].astype(np.int64)
    table, bits, values = header[0::2] & 0xFFFFFF, header[0::2] >> 24, header[1::2]
    odd = ~np.isin(bits, (0, 1, 2, 4, 8, 16, 32))
    if odd.any():
      return f"block {int(np.argmax(odd))} of channel {c} claims {int(bits[odd][0])} bits a voxel"
    value_words = -(-block_voxels * bits // 32)
    if np.any(base + values + value_words > end):
      return f"channel {c}'s encoded values run past its end"
    highest = np.zeros(blocks, np.int64)
    for b in np.unique(bits[bits > 0]):
      which = np.flatnonzero(bits == b)
      n = int(value_words[which[0]])
      packed = words[base + values[which, None] + np.arange(n)].astype(np.uint64)
      shifts = np.arange(0, 32, b, dtype=np.uint64)
      index = (packed[:, :, None] >> shifts) & np.uint64((1 << int(b)) - 1)
      highest[which] = index.reshape(len(which), -1)[:, :block_voxels].max(1).astype(np.int64)
    if np.any(base + table + (highest + 1) * entry_words > end):
      return f"channel {c}'s lookup table runs past its end"
  return None


def _check_compressed_segmentation_chunks():
  """compressed_segmentation 2.3's decoder trusts a chunk's offsets: a truncated chunk decodes
  to garbage without an error and a damaged header crashes the process (SIGSEGV). CloudVolume
  decodes every such chunk through chunks.decode_compressed_segmentation, so that function is
  wrapped once to check the chunk's structure first; a ValueError it raises is named by
  read_box like any chunk that does not decode."""
  from cloudvolume import chunks
  decode = chunks.decode_compressed_segmentation
  if getattr(decode, "checks_structure", False):
    return

  def checked(bytestring, shape, dtype, block_size):
    problem = compressed_segmentation_problem(bytestring, shape, dtype, block_size or (8, 8, 8))
    if problem:
      raise ValueError(f"not a compressed_segmentation chunk: {problem}")
    return decode(bytestring, shape, dtype, block_size)

  checked.checks_structure = True
  chunks.decode_compressed_segmentation = checked


_check_compressed_segmentation_chunks()


def _refuse_empty_chunk_files():
  """With fill_missing, CloudVolume reads a chunk file that is there but holds no data (a
  zero-byte file left by a failed upload or a full disk, or gzip of nothing) as black, as if
  it were missing: its content is b'' where a missing file's is None. CloudVolume decodes
  every downloaded chunk through rx.decode, so that function is wrapped once to decode such a
  chunk without fill_missing: the EmptyVolumeException it then raises is named as a corrupt
  chunk by read_box, which finds the file there."""
  from cloudvolume.datasource.precomputed.image import rx
  decode = rx.decode
  if getattr(decode, "refuses_empty_files", False):
    return

  def decode_present(meta, input_bbox, content, fill_missing, mip, *args, **kwargs):
    if content is not None and len(content) == 0:
      fill_missing = False
    return decode(meta, input_bbox, content, fill_missing, mip, *args, **kwargs)

  decode_present.refuses_empty_files = True
  rx.decode = decode_present


_refuse_empty_chunk_files()


def _undecodable_chunk(err: BaseException) -> str | None:
  """The chunk file whose decompression or decoding raised err, or None for other errors.
  CloudVolume reads each chunk in `download_chunk(…, filename, …)`, decompresses it with
  cloud-files (cloudfiles/compression.py) and decodes it in `_decode_helper(…, input_bbox=
  <file name>, …)`, re-raising what the codec raised (a ValueError from a short raw chunk,
  a codec's own error type otherwise)."""
  chunk, undecodable = None, False
  for frame, _ in traceback.walk_tb(err.__traceback__):
    if frame.f_code.co_name == "download_chunk":
      chunk = frame.f_locals.get("filename", chunk)
    elif frame.f_code.co_name == "_decode_helper":
      chunk, undecodable = frame.f_locals.get("input_bbox", chunk), True
    elif frame.f_code.co_filename.endswith(os.path.join("cloudfiles", "compression.py")):
      undecodable = True
  return str(chunk) if undecodable and chunk is not None else None


def read_box(cv: CloudVolume, box, what: str, path: str | None = None,
             missing_hint: str = "", missing_ok: bool = False) -> np.ndarray | None:
  """cv[box] as a numpy array (x, y, z, c) at cv.mip; box: a Bbox or slices.

  A chunk that was never written (cv opened without fill_missing) or that does not decode in
  the layer's encoding (truncated, overwritten, another encoding) raises IicatsError naming
  the layer (`what`, path or cv.cloudpath) and the chunk file: it will not mend by itself,
  so a task does not retry it. missing_hint is added to the missing-chunk message; with
  missing_ok a missing chunk returns None instead.
  """
  path = path or cv.cloudpath
  try:
    return _read_voxels(cv, box)
  except EmptyVolumeException as err:
    # CloudVolume also reads a chunk file that holds no data (zero bytes, or gzip of
    # nothing) as empty
    if CloudFiles(cv.cloudpath).exists(str(err)):
      raise IicatsError(f"{what} {path}: chunk {err} is corrupt: the file is there but holds "
                        "no data; rewrite it, or the stage that wrote it") from None
    if missing_ok:
      return None
    raise IicatsError(f"{what} {path}: chunk {err} is missing (never written, or deleted)"
                      f"{missing_hint}") from None
  except Exception as err:
    chunk = _undecodable_chunk(err)
    if chunk is None:
      raise
    raise IicatsError(f"{what} {path}: chunk {chunk} is corrupt: it does not decode as "
                      f"{cv.dtype.name} '{cv.encoding}' of {cv.num_channels} channel(s) "
                      f"({type(err).__name__}: {err}); rewrite it, or the stage that wrote "
                      "it") from None


def _read_voxels(cv: CloudVolume, box) -> np.ndarray:
  """np.asarray(cv[box]). CloudVolume 12.15's fast path for a box of one voxel decodes one
  channel's shape: a voxel of a multi-channel layer comes back as (c, 1, 1, 1), its channel
  slice then empty (and a missing one as one channel). Such a voxel is read as part of a box
  two voxels long instead."""
  slices = list(box.to_slices()) if isinstance(box, Bbox) else list(box)
  spatial = slices[:3]
  if cv.num_channels == 1 or not all(
      isinstance(s, slice) and s.start is not None and s.stop is not None
      and s.stop - s.start == 1 for s in spatial):
    return np.asarray(cv[box])
  bounds = cv.meta.bounds(cv.mip)
  for axis, part in enumerate(spatial):
    grown = list(spatial)
    if part.stop < bounds.maxpt[axis]:
      grown[axis], keep = slice(part.start, part.stop + 1), slice(0, 1)
    elif part.start > bounds.minpt[axis]:
      grown[axis], keep = slice(part.start - 1, part.stop), slice(1, 2)
    else:
      continue
    picked = [slice(None)] * 3
    picked[axis] = keep
    return np.asarray(cv[tuple(grown) + tuple(slices[3:])])[tuple(picked)]
  raise IicatsError(f"{cv.cloudpath}: a multi-channel layer of one voxel cannot be read with "
                    "CloudVolume")


def resolution_text(resolution) -> str:
  """Voxel size (x, y, z) as '4×4×40 nm' (for messages)."""
  return "×".join(f"{float(r):g}" for r in resolution) + " nm"


def box_text(box) -> str:
  """A Bbox as '[x0, y0, z0]-[x1, y1, z1]' (for messages)."""
  return f"{[int(v) for v in box.minpt]}-{[int(v) for v in box.maxpt]}"


def region_bbox(bounds, cv, name):
  """The region of layer `cv` (at its mip) a command works on -> Bbox.

  bounds: x0,y0,z0,x1,y1,z1 in voxels at that mip, as text (--bounds), 6 integers or a Bbox;
  'all' or None for the layer's whole bounds. Raises IicatsError naming the layer for a
  malformed, empty or out-of-bounds region."""
  from cloudvolume import Bbox
  if bounds is None or (isinstance(bounds, str) and bounds == "all"):
    return cv.bounds
  if isinstance(bounds, Bbox):
    bounds = list(bounds.minpt) + list(bounds.maxpt)
  text = bounds if isinstance(bounds, str) else ",".join(str(int(v)) for v in bounds)
  try:
    values = [int(v) for v in text.split(",")]
    assert len(values) == 6
  except (ValueError, AssertionError):
    raise IicatsError(f"--bounds {text}: expected x0,y0,z0,x1,y1,z1 (voxels) or 'all'")
  box = Bbox(values[:3], values[3:])
  if any(stop <= start for start, stop in zip(values[:3], values[3:])):
    raise IicatsError(f"--bounds {text}: empty (each stop must exceed its start)")
  if box.volume() == 1:
    # nothing to segment, and CloudVolume cannot read a multi-channel layer of one voxel
    raise IicatsError(f"--bounds {text}: a single voxel; give a region of two or more")
  if not cv.bounds.contains_bbox(box):
    raise IicatsError(f"--bounds {text}: outside {name}, whose bounds are "
                      f"{box_text(cv.bounds)} voxels at mip {cv.mip} "
                      f"({resolution_text(cv.resolution)})")
  return box


def scales_text(cv) -> str:
  """The voxel sizes of a layer's mips, '8×8×40 nm, 16×16×40 nm' (for messages)."""
  return ", ".join(resolution_text(cv.meta.resolution(m)) for m in range(len(cv.info["scales"])))


def scale_at_resolution(cv, resolution, what: str, at: str = "") -> int:
  """The mip of layer `cv` whose voxels are `resolution` nm (x,y,z). Raises IicatsError
  "{what}: has no scale at {at} {resolution} (its scales: ...)" where it has none."""
  for mip in range(len(cv.info["scales"])):
    if np.allclose(cv.meta.resolution(mip), resolution):
      return mip
  raise IicatsError(f"{what}: has no scale at {at + ' ' if at else ''}"
                    f"{resolution_text(resolution)} (its scales: {scales_text(cv)})")


def layer_exists(cloudpath: str) -> bool:
  """Whether a precomputed info file exists at cloudpath."""
  from cloudfiles import CloudFiles
  try:
    return CloudFiles(resolve_cloudpath(normalize_cloudpath(cloudpath))).exists("info")
  except Exception:
    return False


def check_existing_layer(cloudpath: str, *, layer_type: str, dtype: str,
                         resolution: Sequence[float], voxel_offset: Sequence[int],
                         volume_size: Sequence[int], num_channels: int = 1
                         ) -> CloudVolume | None:
  """The layer at cloudpath if it is one of this geometry, None if there is none; an
  IicatsError describing both when another layer is there (before anything is written)."""
  cloudpath = normalize_cloudpath(cloudpath)
  if not layer_exists(cloudpath):
    return None
  cv = open_layer(cloudpath)
  old = cv.info["scales"][0]
  same = (cv.layer_type == layer_type and cv.dtype.name == dtype
          and cv.num_channels == num_channels
          and list(old["size"]) == [int(v) for v in volume_size]
          and list(old["voxel_offset"]) == [int(v) for v in voxel_offset]
          and np.allclose(old["resolution"], [float(r) for r in resolution]))
  if not same:
    raise IicatsError(
      f"{cloudpath}: a layer already exists there as {cv.layer_type} {cv.dtype.name} × "
      f"{cv.num_channels} channel(s), size {old['size']} at {old['voxel_offset']}, "
      f"{old['resolution']} nm, not {layer_type} {dtype} × {num_channels} channel(s), size "
      f"{[int(v) for v in volume_size]} at {[int(v) for v in voxel_offset]}, "
      f"{[float(r) for r in resolution]} nm (delete it or write elsewhere)")
  return cv


def create_layer(cloudpath: str, *, layer_type: str, dtype: str, resolution: Sequence[float],
                 voxel_offset: Sequence[int], volume_size: Sequence[int],
                 chunk_size: Sequence[int] = (64, 64, 64), num_channels: int = 1,
                 encoding: str | None = None, step: str = "", params: dict | None = None,
                 overwrite: bool = False) -> CloudVolume:
  """Create (or reopen, when identical) a precomputed layer and record provenance.

  Re-creating a layer with the same geometry is a no-op so that tasks and stages are
  idempotent; a different geometry at the same path is an error unless overwrite=True.
  """
  cloudpath = normalize_cloudpath(cloudpath)
  if encoding is None:
    encoding = "compressed_segmentation" if layer_type == "segmentation" else "raw"
  info = CloudVolume.create_new_info(
    num_channels=int(num_channels), layer_type=layer_type, data_type=dtype, encoding=encoding,
    resolution=[float(r) for r in resolution], voxel_offset=[int(v) for v in voxel_offset],
    volume_size=[int(v) for v in volume_size], chunk_size=[int(c) for c in chunk_size],
  )
  if not overwrite:
    existing = check_existing_layer(cloudpath, layer_type=layer_type, dtype=dtype,
                                    resolution=resolution, voxel_offset=voxel_offset,
                                    volume_size=volume_size, num_channels=num_channels)
    if existing is not None:
      return existing
  cv = CloudVolume(resolve_cloudpath(cloudpath), info=info, compress=_compress_for(cloudpath),
                   progress=False)
  cv.commit_info()
  if step:
    add_provenance(cv, step, params or {})
  return cv


# what the models read: uint8 grey values; layers of the other types are mapped onto them
IMAGE_DTYPES = ("uint8", "uint16", "int16", "uint32", "float32")


WINDOW_SAMPLE_VOXELS = 10 ** 7  # at most this many voxels decide an image's window


def image_window(image_cv, region, image_path, samples_per_axis: int = 4) -> list:
  """[lo, hi]: the grey values of a non-uint8 image layer that map to 0 and 255, its
  IMAGE_WINDOW_PERCENTILES (as `iicats import` takes them) over up to samples_per_axis³
  chunk-sized boxes spread evenly over region (a Bbox at the layer's mip), strided to at most
  WINDOW_SAMPLE_VOXELS in all."""
  from cloudvolume import Bbox
  from .volume_io import IMAGE_WINDOW_PERCENTILES
  lo, hi = np.asarray(region.minpt), np.asarray(region.maxpt)
  size = np.minimum(np.asarray(image_cv.chunk_size), hi - lo)
  axes = [np.unique(np.linspace(a, b - s, samples_per_axis).round().astype(int))
          for a, b, s in zip(lo, hi, size)]
  values = []
  for x in axes[0]:
    for y in axes[1]:
      for z in axes[2]:
        start = np.array([x, y, z])
        box = read_box(image_cv, Bbox(start, start + size), "image layer", image_path,
                       missing_ok=True)
        if box is None:
          continue  # a chunk never written: no tissue there
        box = box[..., 0]
        step = max(1, int(np.ceil((box.size * len(axes[0]) * len(axes[1]) * len(axes[2])
                                   / WINDOW_SAMPLE_VOXELS) ** (1 / 3))))
        box = box[::step, ::step, ::step]
        values.append(box[np.isfinite(box)].ravel())
  values = np.concatenate(values) if values else np.zeros(0)
  if not values.size:
    raise IicatsError(f"image layer {image_path}: no grey values to choose a window from; "
                      "give --image-window LO,HI")
  low, high = np.percentile(values.astype(np.float64), IMAGE_WINDOW_PERCENTILES)
  return [float(low), float(high)]


def uint8_image(image_cv, box, image_path: str) -> np.ndarray:
  """uint8 (x, y, z) of an image layer over box (a whole region read into memory, as training
  and calibration read it); a layer of another dtype is mapped through its image_window over
  the box, said in one line."""
  image = read_box(image_cv, box, "image layer", image_path)[..., 0]
  if image.dtype == np.uint8:
    return image
  from .volume_io import to_uint8
  window = image_window(image_cv, box, image_path)
  print(f"note: image layer {image_path} is {image.dtype}: grey values {window[0]:g}-"
        f"{window[1]:g} (its 0.05-99.95th percentiles) map onto the model's 0-255", flush=True)
  return to_uint8(image, window)


def add_provenance(cv: CloudVolume, step: str, params: dict) -> None:
  """Append a processing record (step, parameters, software version, when, where)."""
  cv.provenance.description = cv.provenance.description or f"iicats-cv {step}"
  cv.provenance.processing.append({
    "method": {"task": step, "software": "iicats-cv", "version": __version__, **params},
    "by": os.environ.get("USER", "unknown"),
    "hostname": socket.gethostname(),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M %Z"),
  })
  cv.commit_provenance()


def parse_triple(text: str | Sequence, name: str, cast=float, positive: bool = True) -> tuple:
  """Parse 'X,Y,Z' into a 3-tuple, with an error naming the option; positive: every value
  must be > 0 (sizes, shapes, resolutions; not offsets)."""
  if isinstance(text, (tuple, list)):
    values = list(text)
  else:
    values = str(text).replace(" ", "").split(",")
  try:
    out = tuple(cast(v) for v in values)
  except ValueError:
    out = ()
  if len(out) != 3 or (cast is float and not all(np.isfinite(out))):
    raise IicatsError(f"{name}: expected three comma-separated numbers X,Y,Z, got '{text}'")
  if positive and any(v <= 0 for v in out):
    raise IicatsError(f"{name}: values must be positive, got '{text}'")
  return out
