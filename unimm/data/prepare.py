"""Convert your own interleaved documents into ArrayRecord shards unimm reads.

    python -m unimm.data.prepare --inputs='corpus/*.jsonl' --output_dir=out/train \\
        --image_size=256 --channels=3 --workers=8
    unimm-prepare ...                                   # the same, as a console script

Inputs are JSON lines or Parquet files, one document per line / row:

* JSON lines: ``{"parts": [{"text": "..."}, {"image": "img/cat.png"},
  {"image_base64": "..."}, {"text": "...", "loss_weight": 0}], "pair": false}``.
* Parquet: a ``parts`` column of ``list<struct<text: string, image: binary,
  image_path: string, loss_weight: float>>`` (unset fields null) and an optional
  ``pair`` bool column.

Both go through the same checks. ``parts`` is a list of objects, each holding
either ``text`` (a string, or UTF-8 bytes) with an optional ``loss_weight`` (a
finite number >= 0, default 1; ``0`` masks the text as a prompt), or one image:
``image`` (a path, or the encoded bytes), ``image_path`` (a path) or
``image_base64`` (a string). ``pair`` is a bool (absent or null: false); ``true``
marks an image–caption pair (the layout then picks the order and may drop the
caption).

Image paths resolve inside the image root: the input file's directory, or
``--image_root`` when given (relative paths are then relative to it). Symlinks
are followed and a path that ends up outside the root is refused, absolute ones
included. An image is refused before decoding when it has more than
``--max_image_pixels`` pixels (default 64 Mi, e.g. 8192×8192) or more than
``--max_image_bytes`` encoded bytes (default 256 MiB); PIL's own hard cap (twice
``PIL.Image.MAX_IMAGE_PIXELS``) still applies above that.

Each input file becomes one output shard ``<stem>.array_record`` (so shard
count and parallelism follow the input files), written by a pool of worker
processes while streaming: nothing is held whole in memory. Several hosts split
the files with ``--host_index=i --host_count=n`` (host i takes files i, i+n, …). Images are decoded,
converted to the channel count, fitted to ``image_size`` when given and stored as
PNG. ``--image_fit``: ``crop`` (the centred square of the short side, resized), ``pad``
(resized on the long side and centred on a (127, 127, 127) square) or ``per_role``
(both: the crop for an image the model writes, the padded one for an image it reads —
Janus's preprocessing; the layout picks per example).

Bad input loses nothing else. A document that cannot be converted is skipped,
counted by reason and logged with its place (``file:line``, 1-based, for JSON
lines; ``file:row i``, 0-based, for Parquet; the first few per reason and file):

* ``corrupt``: not JSON, not an object, or a pair without exactly one image;
* ``bad_field``: a field of the wrong type or value (``"pair": "false"``, a
  ``loss_weight`` that is not a finite number >= 0, ``parts`` not a list of
  objects, text that is not a string, a part with both text and an image or
  with neither, …);
* ``bad_text``: text that is not valid UTF-8 (a lone surrogate included);
* ``bad_image``: image data that is missing, unreadable or undecodable (bad
  base64 too);
* ``bad_path``: an image path outside the image root, or not a regular file;
* ``too_large``: an image above ``--max_image_pixels`` or ``--max_image_bytes``;
* ``empty``: no text and no image;
* ``unexpected``: any other error (a bug: logged with its traceback).

A file that fails as a whole (unreadable, not Parquet, a write error) is listed
with its error under ``failed_files`` and has no shard; the other files keep
theirs, and the command exits with status 1 after writing everything else.
``<stem>.stats.json`` per shard holds its counts, and ``stats.json`` in the
output directory (``stats-<host>-of-<hosts>.json`` on several hosts) the sums:
``files`` (this host's input files), ``written``, a count per reason,
``failed_files`` and ``resumed_files``.

Re-running resumes: a file whose shard and ``<stem>.stats.json`` are complete
and match the input (its size and modification time) and the options (image
size, channels, image root, limits) is skipped and its stored counts reused;
every other file is converted again, its stale outputs removed first.
``--noresume`` converts every file again.
"""

from __future__ import annotations

import base64
import binascii
import collections
import concurrent.futures
import contextlib
import dataclasses
import glob
import io
import json
import math
import multiprocessing
import numbers
import os
import stat
import sys
from typing import Iterator

from absl import app, flags, logging
import numpy as np
from PIL import Image as PILImage

from unimm import imaging
from unimm.data import documents, records

# Skip reasons of this converter beyond `documents.SKIP_REASONS` (which lists those the reader can meet).
BAD_FIELD = "bad_field"  # a field of the wrong type or value
BAD_PATH = "bad_path"  # an image path outside the image root, or not a regular file
TOO_LARGE = "too_large"  # an image above max_image_pixels or max_image_bytes
UNEXPECTED = "unexpected"  # any other error while converting a document
REASONS = (documents.CORRUPT, documents.EMPTY, documents.BAD_IMAGE, documents.BAD_TEXT, BAD_FIELD, BAD_PATH,
           TOO_LARGE, UNEXPECTED)

DEFAULT_MAX_IMAGE_PIXELS = imaging.MAX_IMAGE_PIXELS  # 8192 x 8192: 192 MiB decoded as RGB
DEFAULT_MAX_IMAGE_BYTES = 256 * 2**20  # an uncompressed 8192 x 8192 RGB image fits
_LOGGED_PER_REASON = 10  # bad documents logged per reason and file; the rest are only counted
_IMAGE_KEYS = ("image", "image_path", "image_base64")

_INPUTS = flags.DEFINE_list("inputs", None, "Input files or globs (.jsonl, .json, .parquet).",
                            allow_override=True)  # unimm.main's --mode=score has one too
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the shards go.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Square output size in pixels; 0 keeps the size.")
_IMAGE_FIT = flags.DEFINE_enum("image_fit", "crop", ["crop", "pad", "per_role"],
                               "How images become squares: crop | pad | per_role (crop written, pad read; Janus).")
_CHANNELS = flags.DEFINE_enum("channels", "3", ["1", "3"], "Image channels to store (1 = grayscale).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Worker processes; 0 = one per core.")
_HOST_INDEX = flags.DEFINE_integer("host_index", 0, "This host's index when several hosts split the inputs.")
_HOST_COUNT = flags.DEFINE_integer("host_count", 1, "How many hosts split the inputs (files i::count each).")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Directory image paths resolve in (and must stay inside); "
                                  "default: each input file's directory.")
_MAX_IMAGE_PIXELS = flags.DEFINE_integer("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS,
                                         "Larger images (width x height) are skipped as too_large, undecoded.")
_MAX_IMAGE_BYTES = flags.DEFINE_integer("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES,
                                        "Larger encoded images are skipped as too_large, unread.")
_RESUME = flags.DEFINE_boolean("resume", True, "Skip files whose shard is complete and matches the input.")


@dataclasses.dataclass(frozen=True)
class Options:
  """How documents are converted (the same for every file; a resumed shard must have been written with them).

  Attributes:
    image_size: square output size in pixels; 0 keeps the size.
    channels: 1 (grayscale) or 3 (RGB).
    image_root: the real path image paths resolve in; None = each input file's directory.
    max_image_pixels: images with more pixels are skipped as too_large before decoding.
    max_image_bytes: images with more encoded bytes are skipped as too_large before reading them.
    image_fit: crop | pad | per_role (see the module doc).
  """

  image_size: int = 0
  channels: int = 3
  image_root: str | None = None
  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
  max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
  image_fit: str = "crop"

  def settings(self) -> dict:
    """What a shard written with these options records (and a resumed one must match)."""
    out = {**dataclasses.asdict(self), "record_format": records.FORMAT_VERSION}
    if self.image_fit == "crop":  # shards written before the option existed were crops: they still match
      del out["image_fit"]
    return out


def iter_records(path: str) -> Iterator[tuple[str, dict | None, documents.BadRecord | None]]:
  """Streams (where, record, error) from one input file: `where` is `path:line` (1-based) for JSON lines,
  `path:row i` (0-based) for Parquet; record None and the error set when a line is not a JSON object."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
      for record in batch.to_pylist():
        yield f"{path}:row {row}", record, None
        row += 1
    return
  with open(path, "rb") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        obj = json.loads(line.decode("utf-8"))
      except UnicodeDecodeError as e:
        yield where, None, documents.BadRecord(documents.BAD_TEXT, f"the line is not UTF-8: {e}")
        continue
      except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        yield where, None, documents.BadRecord(documents.CORRUPT, f"not JSON: {e}")
        continue
      if not isinstance(obj, dict):
        yield where, None, documents.BadRecord(documents.CORRUPT, f"the line is a JSON {type(obj).__name__}, "
                                               "expected an object")
        continue
      yield where, obj, None


def convert_image(data: bytes, image_size: int, channels: int,
                  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, fit: str = "crop") -> bytes:
  """PNG bytes of an encoded image, converted and fitted to `image_size` (`imaging.fit_square`).

  Raises:
    BadRecord: too_large when the image has more than `max_image_pixels` pixels (checked before decoding),
      bad_image when it does not decode.
  """
  try:
    im = imaging.open_bounded(io.BytesIO(data), max_image_pixels)
  except imaging.ImageTooLarge as e:
    raise documents.BadRecord(TOO_LARGE, f"{e}; raise --max_image_pixels to keep it") from e
  except Exception as e:  # PIL raises many kinds on bad bytes
    raise documents.BadRecord(documents.BAD_IMAGE, f"undecodable image: {e}") from e
  with im:
    w, h = im.size
    try:
      im = im.convert("L" if channels == 1 else "RGB")
      if image_size:
        im = imaging.fit_square(im, image_size, fit)
      pixels = np.asarray(im, np.uint8)
    except PILImage.DecompressionBombError as e:
      raise documents.BadRecord(TOO_LARGE, str(e)) from e
    except Exception as e:  # truncated or corrupt data shows only while decoding
      raise documents.BadRecord(documents.BAD_IMAGE, f"undecodable image: {e}") from e
  return records.encode_image(pixels[..., None] if pixels.ndim == 2 else pixels)


def _read_image_file(path: str, image_root: str, max_bytes: int) -> bytes:
  """The bytes of the image file at `path` (relative to `image_root`, or absolute), which must lie inside it."""
  if not path:
    raise documents.BadRecord(BAD_FIELD, "an empty image path")
  try:
    full = os.path.realpath(os.path.join(image_root, path))  # an absolute `path` replaces the root
  except ValueError as e:  # a NUL byte
    raise documents.BadRecord(BAD_PATH, f"image path {path!r}: {e}") from e
  if os.path.commonpath([full, image_root]) != image_root:
    raise documents.BadRecord(BAD_PATH, f"image path {path!r} resolves to {full}, outside the image root "
                              f"{image_root}; move the image under it or pass --image_root")
  # O_NOFOLLOW: a symlink swapped in since realpath is not followed; O_NONBLOCK: a FIFO does not block.
  flags_ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
  try:
    fd = os.open(full, flags_)
  except OSError as e:
    raise documents.BadRecord(documents.BAD_IMAGE, f"cannot read image {full}: {e}") from e
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      raise documents.BadRecord(BAD_PATH, f"image path {path!r} ({full}) is not a regular file")
    if st.st_size > max_bytes:
      raise documents.BadRecord(TOO_LARGE, f"image {full} has {st.st_size} bytes, above max_image_bytes="
                                f"{max_bytes}; raise --max_image_bytes to keep it")
    with io.FileIO(fd, "rb", closefd=False) as f:
      data = f.read(max_bytes + 1)
  except OSError as e:
    raise documents.BadRecord(documents.BAD_IMAGE, f"cannot read image {full}: {e}") from e
  finally:
    os.close(fd)
  if len(data) > max_bytes:  # grew since fstat
    raise documents.BadRecord(TOO_LARGE, f"image {full} has over max_image_bytes={max_bytes} bytes")
  return data


def _image_bytes(part: dict, key: str, image_root: str, options: Options) -> bytes:
  """The encoded image a part holds under `key` (one of `_IMAGE_KEYS`)."""
  value = part[key]
  if key == "image_base64":
    if not isinstance(value, str):
      raise documents.BadRecord(BAD_FIELD, f"'image_base64' is a {type(value).__name__}, expected a string")
    if len(value) // 4 * 3 > options.max_image_bytes:
      raise documents.BadRecord(TOO_LARGE, f"a base64 image of {len(value)} characters, above max_image_bytes="
                                f"{options.max_image_bytes} decoded; raise --max_image_bytes to keep it")
    try:
      return base64.b64decode(value)
    except (binascii.Error, ValueError) as e:  # ValueError: not ASCII
      raise documents.BadRecord(documents.BAD_IMAGE, f"bad base64 in 'image_base64': {e}") from e
  if key == "image" and isinstance(value, (bytes, bytearray)):
    if len(value) > options.max_image_bytes:
      raise documents.BadRecord(TOO_LARGE, f"an image of {len(value)} bytes, above max_image_bytes="
                                f"{options.max_image_bytes}; raise --max_image_bytes to keep it")
    return bytes(value)
  if not isinstance(value, str):
    expected = "a path (string) or the encoded bytes" if key == "image" else "a path (string)"
    raise documents.BadRecord(BAD_FIELD, f"'{key}' is a {type(value).__name__}, expected {expected}")
  return _read_image_file(value, image_root, options.max_image_bytes)


def _text(value) -> str:
  """A text field as a str; raises BadRecord (bad_field, bad_text)."""
  if isinstance(value, (bytes, bytearray)):
    return documents.decode_text(bytes(value))
  if not isinstance(value, str):
    raise documents.BadRecord(BAD_FIELD, f"'text' is a {type(value).__name__} ({value!r:.40}), expected a string")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise documents.BadRecord(documents.BAD_TEXT, f"text that is not valid UTF-8 (a lone surrogate?): {e}") from e
  return value


def _loss_weight(value) -> float:
  """A `loss_weight` field as a float (absent or null: 1); raises BadRecord (bad_field)."""
  if value is None:
    return 1.0
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise documents.BadRecord(BAD_FIELD, f"'loss_weight' is a {type(value).__name__} ({value!r:.40}), "
                              "expected a number")
  try:
    weight = float(value)
  except (OverflowError, ValueError) as e:
    raise documents.BadRecord(BAD_FIELD, f"'loss_weight' {value!r:.40}: {e}") from e
  if not math.isfinite(weight) or weight < 0:
    raise documents.BadRecord(BAD_FIELD, f"'loss_weight' is {weight}, expected a finite number >= 0")
  return weight


def _convert_part(part, image_root: str, options: Options) -> dict | None:
  """One input part as a record part (None for empty text); raises BadRecord with the skip reason."""
  if not isinstance(part, dict):
    raise documents.BadRecord(BAD_FIELD, f"a part is a {type(part).__name__}, expected an object")
  images = [k for k in _IMAGE_KEYS if part.get(k) is not None]
  if part.get("text") is not None:
    if images:
      raise documents.BadRecord(BAD_FIELD, f"a part holds both 'text' and {images}; make them two parts")
    text, weight = _text(part["text"]), _loss_weight(part.get("loss_weight"))
    return {"text": text, "loss_weight": weight} if text else None
  if not images:
    raise documents.BadRecord(BAD_FIELD, f"a part with neither text nor an image: keys {sorted(part)}")
  if len(images) > 1:
    raise documents.BadRecord(BAD_FIELD, f"a part with several images {images}; make them separate parts")
  data = _image_bytes(part, images[0], image_root, options)
  convert = lambda fit: convert_image(data, options.image_size, options.channels, options.max_image_pixels, fit)  # noqa: E731
  if options.image_fit == "per_role":
    return {"image": convert("crop"), "image_read": convert("pad")}
  return {"image": convert(options.image_fit)}


def convert_record(record: dict, image_root: str, options: Options) -> bytes:
  """One input document (a JSON object or Parquet row) as a record; raises BadRecord with the skip reason.

  Args:
    record: the document's fields: `parts` and optional `pair`.
    image_root: the real path image paths resolve in (and must stay inside).
    options: how to convert.
  """
  is_pair = record.get("pair")
  if is_pair is None:
    is_pair = False
  elif not isinstance(is_pair, (bool, np.bool_)):
    raise documents.BadRecord(BAD_FIELD, f"'pair' is a {type(is_pair).__name__} ({is_pair!r:.40}), "
                              "expected true, false or null")
  parts = record.get("parts")
  if not isinstance(parts, list):
    found = "missing" if parts is None else f"a {type(parts).__name__}"
    raise documents.BadRecord(BAD_FIELD, f"'parts' is {found}, expected a list of objects")
  out = [p for p in (_convert_part(part, image_root, options) for part in parts) if p is not None]
  if not out:
    raise documents.BadRecord(documents.EMPTY, "no text and no image")
  if is_pair and sum("image" in p for p in out) != 1:
    raise documents.BadRecord(documents.CORRUPT, "a pair needs exactly one image")
  return records.encode_document(out, bool(is_pair))


def _stem(path: str) -> str:
  return os.path.basename(path).rsplit(".", 1)[0]


def _output_paths(path: str, output_dir: str) -> tuple[str, str, str]:
  """(shard, its `.incomplete` while written, its per-file stats) of one input file."""
  shard = os.path.join(output_dir, _stem(path) + ".array_record")
  return shard, shard + ".incomplete", os.path.join(output_dir, _stem(path) + ".stats.json")


def _input_fingerprint(path: str) -> dict:
  st = os.stat(path)
  return {"input_path": os.path.realpath(path), "input_size": st.st_size, "input_mtime_ns": st.st_mtime_ns}


def _write_json(path: str, obj) -> None:
  """Writes `obj` to `path` atomically (a reader never sees half a file)."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def _remove(*paths: str) -> None:
  for p in paths:
    with contextlib.suppress(FileNotFoundError):
      os.remove(p)


def _complete_stats(path: str, output_dir: str, options: Options) -> dict | None:
  """The stored per-file stats of `path` when its shard is complete and matches the input and options, else
  None (the file must be converted again)."""
  shard, _, stats_path = _output_paths(path, output_dir)
  try:
    with open(stats_path) as f:
      stats = json.load(f)
    want = {**_input_fingerprint(path), "output_size": os.path.getsize(shard), "settings": options.settings()}
  except (OSError, ValueError):
    return None
  return stats if isinstance(stats, dict) and stats.get("resume") == want else None


def _count_skip(counts: collections.Counter, reason: str, where: str, detail: str, exc_info: bool = False):
  """Counts a skipped document and logs the first few of each reason (a file of bad lines must not flood)."""
  counts[reason] += 1
  if counts[reason] <= _LOGGED_PER_REASON:
    last = counts[reason] == _LOGGED_PER_REASON
    more = f" (further {reason} documents of this file are counted, not logged)" if last else ""
    logging.warning("%s: skipped, %s: %s%s", where, reason, detail, more, exc_info=exc_info)


def convert_file(path: str, output_dir: str, options: Options) -> dict:
  """Converts one input file into `<output_dir>/<stem>.array_record` and writes `<stem>.stats.json`.

  Never raises: a bad document is skipped and counted by reason; when the file fails as a whole (unreadable,
  not Parquet, a write error) its outputs are removed and the error returned.

  Returns:
    The per-file stats: `input`, `output`, `written` and a count per skip reason, and under `resume` what a
    re-run compares; or `{"input": path, "error": "..."}` when the file failed.
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  shard, tmp, stats_path = _output_paths(path, output_dir)
  where = path
  try:
    _remove(stats_path, shard, tmp)  # an older run's: they no longer match (a failure must not leave them)
    fingerprint = _input_fingerprint(path)  # before reading: a change while converting shows at the next run
    image_root = options.image_root or os.path.realpath(os.path.dirname(os.path.abspath(path)))
    counts = collections.Counter(written=0)
    writer = ArrayRecordWriter(tmp, "group_size:1")  # group 1: cheap random access for shuffling
    try:
      if not writer.ok():
        raise OSError(f"cannot create {tmp}")
      for where, record, error in iter_records(path):
        try:
          if error is not None:
            raise error
          data = convert_record(record, image_root, options)
        except documents.BadRecord as e:
          _count_skip(counts, e.reason, where, e.detail)
        except Exception as e:  # a bug must not cost the other documents
          _count_skip(counts, UNEXPECTED, where, f"{type(e).__name__}: {e}", exc_info=True)
        else:
          writer.write(data)
          counts["written"] += 1
    except BaseException:
      with contextlib.suppress(Exception):
        writer.close()
      raise
    writer.close()
    os.replace(tmp, shard)  # a shard exists only once complete
    stats = {"input": path, "output": shard, **counts,
             "resume": {**fingerprint, "output_size": os.path.getsize(shard), "settings": options.settings()}}
    _write_json(stats_path, stats)  # last: a shard counts as complete only with its stats
    logging.info("%s: %s", path, dict(counts))
    return stats
  except Exception as e:
    error = f"{type(e).__name__}: {e}" + (f" (last record read: {where})" if where != path else "")
    logging.error("%s failed, no shard written: %s", path, error, exc_info=True)
    with contextlib.suppress(OSError):
      _remove(tmp, shard, stats_path, stats_path + ".tmp")
    return {"input": path, "error": error}


def _convert_all(paths: list[str], output_dir: str, options: Options, workers: int) -> dict[str, dict]:
  """Per-file stats of each path, converted by `workers` processes; a file whose worker died is failed."""
  if workers <= 1:
    return {p: convert_file(p, output_dir, options) for p in paths}
  per_file = {}
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    futures = {pool.submit(convert_file, p, output_dir, options): p for p in paths}
    for future in concurrent.futures.as_completed(futures):
      path = futures[future]
      try:
        per_file[path] = future.result()
      except Exception as e:  # the worker process died (killed for memory, a crash in a decoder)
        error = f"{type(e).__name__}: {e}; run again to convert it (finished files are kept)"
        logging.error("%s failed: %s", path, error)
        per_file[path] = {"input": path, "error": error}
  return per_file


def prepare(inputs: list[str], output_dir: str, *, image_size: int = 0, channels: int = 3, image_fit: str = "crop",
            workers: int = 0,
            host_index: int = 0, host_count: int = 1, image_root: str | None = None,
            max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
            resume: bool = True) -> dict:
  """Converts this host's share of the input files (in parallel) and writes the summary; returns it.

  Bad documents and failed files are counted and listed, not raised (see the module docstring).

  Args:
    inputs: input files or globs.
    output_dir: where the shards go.
    image_size: square output size in pixels; 0 keeps the size.
    channels: 1 (grayscale) or 3 (RGB).
    workers: worker processes; 0 = one per core.
    host_index: this host's index when several hosts split the inputs.
    host_count: how many hosts split the inputs (host i takes files i, i + n, ...).
    image_root: the directory image paths resolve in and must stay inside; None = each input file's.
    max_image_pixels: images with more pixels are skipped (too_large) before decoding.
    max_image_bytes: images with more encoded bytes are skipped (too_large) before reading.
    resume: skip files whose shard is complete and matches the input and these options.

  Returns:
    `files`, `written`, a count per skip reason, `failed_files` ([{"input", "error"}]) and `resumed_files`.
  """
  paths = sorted({p for pattern in inputs for p in glob.glob(pattern) if not os.path.isdir(p)})
  if not paths:
    raise FileNotFoundError(f"no input files match {inputs}")
  if not 0 <= host_index < host_count:
    raise ValueError(f"host_index={host_index} must lie in [0, host_count={host_count})")
  if channels not in (1, 3):
    raise ValueError(f"channels={channels}; use 1 (grayscale) or 3 (RGB)")
  if image_size < 0 or max_image_pixels <= 0 or max_image_bytes <= 0:
    raise ValueError(f"image_size={image_size} must be >= 0 (0 keeps the size), max_image_pixels="
                     f"{max_image_pixels} and max_image_bytes={max_image_bytes} > 0")
  if image_root is not None:
    if not os.path.isdir(image_root):
      raise ValueError(f"image_root={image_root!r} is not a directory; pass the directory your image paths "
                       "are relative to")
    image_root = os.path.realpath(image_root)
  stems = [_stem(p) for p in paths]
  dupes = [s for s, n in collections.Counter(stems).items() if n > 1]
  if dupes:
    raise ValueError(f"input files share the names {dupes}; each becomes <name>.array_record, rename them")
  os.makedirs(output_dir, exist_ok=True)
  if image_fit not in ("crop", "pad", "per_role"):
    raise ValueError(f"image_fit={image_fit!r}; expected crop, pad or per_role")
  options = Options(image_size, channels, image_root, max_image_pixels, max_image_bytes, image_fit)
  mine = paths[host_index::host_count]
  per_file, todo = {}, []
  for path in mine:
    stats = _complete_stats(path, output_dir, options) if resume else None
    if stats is None:
      todo.append(path)
    else:
      per_file[path] = stats
      _remove(_output_paths(path, output_dir)[1])  # a crashed run's leftover
  if per_file:
    logging.info("resuming: %d of %d files are complete, %d to convert", len(per_file), len(mine), len(todo))
  resumed = len(per_file)
  if todo:
    per_file.update(_convert_all(todo, output_dir, options, min(len(todo), workers or os.cpu_count() or 1)))
  total = collections.Counter(written=0)
  failed = []
  for path, stats in sorted(per_file.items()):
    if "error" in stats:
      failed.append({"input": path, "error": stats["error"]})
    else:
      total.update({k: v for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)})
  summary = {"files": len(mine), "failed_files": failed, "resumed_files": resumed, **dict(sorted(total.items()))}
  name = "stats.json" if host_count == 1 else f"stats-{host_index:05d}-of-{host_count:05d}.json"
  _write_json(os.path.join(output_dir, name), summary)
  if failed:
    logging.error("%d of %d files failed (no shard written): %s", len(failed), len(mine), failed)
  return summary


def main(argv):
  del argv
  if not _INPUTS.value or not _OUTPUT_DIR.value:
    raise app.UsageError("--inputs and --output_dir are required")
  summary = prepare(_INPUTS.value, _OUTPUT_DIR.value, image_size=_IMAGE_SIZE.value,
                    channels=int(_CHANNELS.value), image_fit=_IMAGE_FIT.value, workers=_WORKERS.value, host_index=_HOST_INDEX.value,
                    host_count=_HOST_COUNT.value, image_root=_IMAGE_ROOT.value,
                    max_image_pixels=_MAX_IMAGE_PIXELS.value, max_image_bytes=_MAX_IMAGE_BYTES.value,
                    resume=_RESUME.value)
  logging.info("prepared: %s", summary)
  print(json.dumps(summary))
  if summary["failed_files"]:
    sys.exit(1)  # after writing everything else: the failed files are listed in the summary


def run():
  app.run(main)


if __name__ == "__main__":
  run()
