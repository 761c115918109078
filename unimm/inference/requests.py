"""The sample command: JSON-lines requests in, a manifest and PNGs out (a contract).

    python -m unimm.main --mode=sample --config=... --workdir=... --prompts=FILE --out=DIR

FILE, one request a line, UTF-8 (image paths relative to FILE's directory, and inside it):
    {"id": "...", "parts": [{"text": "..."}, {"image": "path.png"}], "generate": "image" | "text",
     "max_tokens": 32}
`id` is a string or a number (default "line<N>"); ids need not be unique (PNG names are made so).
DIR/manifest.jsonl, one line a request, in input order:
    {"id", "line": <the request's line number in FILE>, "prompt": <the text parts joined>, "generate",
     "text" (text requests) | "image" (relative PNG path)}
A text request whose model opens an image (emits BOI) gets it drawn and then continues; its line
then also holds "images" (relative PNG paths, in order) and "parts" ([{"text"} | {"image"}], the
output in order), while "text" stays the text parts joined. A request that cannot run gets
    {"id", "line", "prompt", "generate", "error": "..."}
and the others still run. Errors are per request: a line that is not UTF-8 or not JSON (NaN and
Infinity are not JSON; its id is then "line<N>"), a bad `id`, `parts`, part, `generate` or
`max_tokens`, text that is not valid Unicode, an image that is missing, does not decode, lies outside
FILE's directory or has more than `MAX_IMAGE_PIXELS` pixels, a prompt the tokenizer cannot encode or
that does not fit the model's context, and a generation that raises (a failing batch is rerun one
request at a time, so only the requests that fail get `error`).
The manifest is written while the run goes: each line as soon as its request finishes (parse errors
first, then batches as they end), so a run that dies keeps what it finished, in completion order;
a completed run rewrites it atomically in input order.
Exit status (`exit_code`): 0 when every request succeeded (or FILE holds none), `SOME_FAILED` (3) when
the run completed but some lines have `error`; a run that could not start (no checkpoint, FILE
missing or a directory) exits 1 with a usage error.
PNGs are written at the dataset's resolution and mode (grayscale for 1 channel).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from absl import logging
import numpy as np
from PIL import Image as PILImage

from unimm import imaging
from unimm.data import documents
from unimm.inference import images as images_lib, prompts as prompts_lib, sampling as sampling_lib, text as text_lib

SOME_FAILED = 3  # exit status of a completed run in which some request got an `error` line
MAX_IMAGE_PIXELS = imaging.MAX_IMAGE_PIXELS  # a prompt image above this is refused before decoding
_MAX_ERROR_CHARS = 500  # an exception's text in a manifest line (XLA's can run to pages)


@dataclasses.dataclass
class Request:
  id: str
  prompt_text: str
  generate: str
  max_tokens: int = 32
  parts: list = dataclasses.field(default_factory=list)
  error: str = ""
  line: int = 0  # the request's line number in the requests file (1-based)


def _short(value, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 1] + "…"


def _exception_text(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS - 1] + "…"


def load_image(path: str, image_shape, max_pixels: int = MAX_IMAGE_PIXELS, fit: str = "resize") -> np.ndarray:
  """uint8 [H, W, C] in the model's resolution and mode: resized if needed (`fit` resize), or fitted to
  the square as `imaging.fit_square` does (`crop`, `pad`: `data.read_image_fit`, Janus's letterbox).

  Raises ValueError for an image of more than `max_pixels` pixels (checked from its header, before
  decoding); OSError / PIL errors for a file that does not decode.
  """
  h, w, c = image_shape
  with imaging.open_bounded(path, max_pixels) as im:
    im = im.convert("L" if c == 1 else "RGB")
    if fit != "resize" and h == w:
      im = imaging.fit_square(im, h, fit)
    elif im.size != (w, h):
      im = im.resize((w, h), PILImage.Resampling.BICUBIC)
    pixels = np.asarray(im, np.uint8)
  return pixels[..., None] if pixels.ndim == 2 else pixels


def check_requests_file(path: str) -> None:
  """Raises FileNotFoundError / IsADirectoryError (naming `path`) when it is not a readable file."""
  if os.path.isdir(path):
    raise IsADirectoryError(f"--prompts={path!r} is a directory; give the JSON-lines requests file")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--prompts={path!r}: no such file (the JSON-lines requests)")


def parse_requests(path: str, image_shape, *, max_image_pixels: int = MAX_IMAGE_PIXELS,
                   image_fit: str = "resize") -> list[Request]:
  """Every non-blank line of FILE as a Request, in order; a line's problem becomes its request's `error`.

  Only a FILE that cannot be read at all raises (see `check_requests_file`); an empty FILE gives [].
  """
  check_requests_file(path)
  base = os.path.dirname(os.path.abspath(path))
  with open(path, "rb") as f:
    data = f.read()
  out = []
  # Lines are decoded one by one, so a bad byte costs only its line; line numbers count "\n" as editors do.
  for number, raw in enumerate(data.split(b"\n"), start=1):
    req = _parse_line(raw, number, base, image_shape, max_image_pixels, image_fit)
    if req is not None:
      out.append(req)
  return out


def _reject_constant(name: str):
  raise ValueError(f"{name} is not a JSON number; numbers are finite")


def _parse_line(raw: bytes, number: int, base: str, image_shape, max_image_pixels: int,
                image_fit: str = "resize") -> Request | None:
  """The request on one line (None for a blank line)."""
  def bad(message: str) -> Request:
    return Request(f"line{number}", "", "", line=number, error=message)

  try:
    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark may open the file
  except UnicodeDecodeError as e:
    return bad(f"line {number} is not UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1}); save the file as UTF-8")
  if not line.strip():
    return None
  try:
    obj = json.loads(line, parse_constant=_reject_constant)
  except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
    return bad(f"line {number} is not JSON: {_exception_text(e)}")
  if not isinstance(obj, dict):
    return bad(f"line {number} is not a JSON object but {type(obj).__name__}")
  raw_id, generate, max_tokens = obj.get("id", f"line{number}"), obj.get("generate"), obj.get("max_tokens", 32)
  id_ok = isinstance(raw_id, str) or (isinstance(raw_id, (int, float)) and not isinstance(raw_id, bool))
  valid_budget = isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1
  req = Request(str(raw_id) if id_ok else f"line{number}", "", generate if isinstance(generate, str) else "",
                max_tokens=max_tokens if valid_budget else -1, line=number)
  errors = []  # the first is reported
  if not id_ok:
    errors.append(f"id is {_short(raw_id)}; expected a string or a number")
  parts, texts, part_errors = parse_parts(obj.get("parts", []), base, image_shape, max_image_pixels, image_fit)
  req.parts.extend(parts)
  errors.extend(part_errors)
  req.prompt_text = " ".join(texts)
  if req.generate not in ("image", "text"):
    errors.append(f"generate is {_short(generate)}; expected 'image' or 'text'")
  if req.max_tokens < 1:
    errors.append(f"max_tokens is {_short(max_tokens)}; expected a positive integer")
  req.error = errors[0] if errors else ""
  return req


def parse_parts(parts, base: str, image_shape, max_image_pixels: int = MAX_IMAGE_PIXELS, image_fit: str = "resize"):
  """A request's `parts` list → (documents parts, their texts, errors): `{"text": str}` or
  `{"image": path}` (relative to `base`, the requests file's directory, and inside it), each image loaded
  in the model's resolution (`image_fit`: see `load_image`; the model reads these images). Shared by the
  sample and score commands."""
  out, texts, errors = [], [], []
  if not isinstance(parts, list):
    errors.append(f"parts is {_short(parts)}; expected a list of {{\"text\": str}} / {{\"image\": path}} parts")
    parts = []
  for k, part in enumerate(parts):
    if isinstance(part, dict) and set(part) == {"text"} and isinstance(part["text"], str):
      try:
        part["text"].encode("utf-8")
      except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer takes
        errors.append(f"part {k}'s text is not valid Unicode (a lone surrogate U+{ord(part['text'][e.start]):04X} "
                      f"at character {e.start}); escape only whole characters")
      texts.append(part["text"])
      out.append(documents.Text(part["text"]))
    elif isinstance(part, dict) and set(part) == {"image"} and isinstance(part["image"], str):
      rel = part["image"]
      full = os.path.normpath(os.path.join(base, rel))
      # Lexical: a `..` or an absolute path may not leave the directory; links placed in it are its owner's choice.
      if os.path.commonpath([base, full]) != base:
        errors.append(f"image path {_short(rel)} leaves {base}; image paths are relative to the requests file's "
                      "directory and stay inside it")
        continue
      try:
        out.append(documents.Image(load_image(full, image_shape, max_image_pixels, image_fit)))
      except FileNotFoundError:
        errors.append(f"image file not found: {_short(rel)}")
      except Exception as e:  # PIL's many kinds of undecodable input, the pixel limit, a directory, a NUL byte
        errors.append(f"image {_short(rel)} does not decode: {_exception_text(e)}")
    else:
      errors.append(f"unknown part {_short(part)}: a part is {{\"text\": str}} or {{\"image\": path}}")
  return out, texts, errors


def safe_name(request_id: str, used: set[str], suffix: str = ".png") -> str:
  """A file name for `request_id` (unsafe characters replaced, cut to 80, numbered when taken)."""
  stem = re.sub(r"[^A-Za-z0-9._-]", "_", request_id)[:80] or "image"
  name, k = stem, 1
  while name in used:
    k += 1
    name = f"{stem}_{k}"
  used.add(name)
  return name + suffix


def save_png(pixels: np.ndarray, out_dir: str, name: str) -> None:
  PILImage.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(os.path.join(out_dir, name))


def text_result(generation: text_lib.Generation, tokenizer, out_dir: str, stem: str, used: set[str]) -> dict:
  """A text request's manifest fields: the text, and any images the model drew (saved as PNG)."""
  s = tokenizer.specials
  parts, run, images = [], [], iter(generation.images)
  for t in generation.tokens:
    if t == s.boi:
      if run:
        parts.append({"text": tokenizer.decode(run)})
        run = []
      name = safe_name(stem, used)
      save_png(next(images), out_dir, name)
      parts.append({"image": name})
    elif t not in (s.eoi, s.eos):
      run.append(t)
  if run:
    parts.append({"text": tokenizer.decode(run)})
  result = {"text": "".join(p.get("text", "") for p in parts)}
  if generation.images:
    result.update(images=[p["image"] for p in parts if "image" in p], parts=parts)
  return result


def manifest_row(req: Request, result: dict | None = None) -> dict:
  """A request's manifest line: its error, or `result` (the fields `text_result` / an image request give)."""
  row = {"id": req.id, "line": req.line, "prompt": req.prompt_text, "generate": req.generate}
  row.update({"error": req.error} if req.error else result)
  return row


def exit_code(manifest: list[dict]) -> int:
  """The sample command's exit status: 0 when no line has an `error`, else `SOME_FAILED`."""
  return SOME_FAILED if any("error" in row for row in manifest) else 0


class _ManifestWriter:
  """DIR/manifest.jsonl while the run goes: lines appended (and flushed) as requests finish; `finish`
  replaces it atomically with the lines in input order."""

  def __init__(self, out_dir: str):
    self.path = os.path.join(out_dir, "manifest.jsonl")
    self._file = open(self.path, "w", encoding="utf-8")

  def add(self, row: dict) -> None:
    self._file.write(json.dumps(row) + "\n")  # ASCII (json escapes the rest): any text survives
    self._file.flush()

  def finish(self, rows: list[dict]) -> None:
    self._file.close()
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
    os.replace(tmp, self.path)

  def close(self) -> None:
    self._file.close()


def run_requests(family, task, params, tokenizer, requests: list[Request], out_dir: str, *, context: int, rng,
                 sampling: sampling_lib.SamplingOptions, num_steps: int, guidance: float, sampler: str | None,
                 batch_size: int = 32, placement=None,
                 code_sampling: sampling_lib.SamplingOptions | None = None, images_per_prompt: int = 1) -> list[dict]:
  """Runs the valid requests with `family`'s generators (`unimm.families.Family`) in batches; writes PNGs and
  the manifest; returns the manifest rows (input order).

  A request that fails (its prompt does not encode or fit, its generation raises) gets an `error` line
  and the others still run: a batch whose generation raises is rerun one request at a time. Lines reach
  manifest.jsonl as requests finish (see the module docstring); exceptions that are not `Exception`s
  (KeyboardInterrupt, SystemExit) end the run with the finished lines on disk.
  `code_sampling`: temperature / top-k / top-p over image codes, for families that write codes.
  `images_per_prompt` > 1: an image request's line gets `images` (all of them; `image` is the first).
  """
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  if not requests:
    logging.warning("No requests: the requests file holds no non-blank line; writing an empty manifest.")
  manifest = _ManifestWriter(out_dir)
  try:
    for req in requests:
      if req.error:
        manifest.add(manifest_row(req))
    prompts = _encode_prompts(task, tokenizer, requests, context, manifest)
    results: dict[int, dict] = {}
    used: set[str] = set()
    generators_made = {}
    diffusion = images_lib.DiffusionOptions(num_steps=num_steps, guidance=guidance, sampler=sampler)

    def generate(kind: str, chunk: list[int], rng) -> dict[int, dict]:
      """The manifest fields of the requests `chunk` (all of `kind`); writes their PNGs."""
      if kind not in generators_made:
        make = family.text_generator if kind == "text" else family.image_generator
        if make is None:
          raise ValueError(f"family {family.name!r} does not generate {kind}")
        generators_made[kind] = make(task, params, tokenizer.specials, placement, code_sampling)
      out = {}
      if kind == "text":
        outs = generators_made[kind].generate_mixed(
            [prompts[i] for i in chunk], rng=rng, options=sampling,
            max_new_tokens=[requests[i].max_tokens for i in chunk], diffusion=diffusion)
        for i, generation in zip(chunk, outs):
          out[i] = text_result(generation, tokenizer, out_dir, requests[i].id, used)
        return out
      # Several images per prompt: the prompt repeated in one batch (drawn in parallel).
      pixels = generators_made[kind].generate([prompts[i] for i in chunk for _ in range(images_per_prompt)], rng,
                                              num_steps=num_steps, guidance=guidance, sampler=sampler)
      for n, i in enumerate(chunk):
        names = []
        for j in range(images_per_prompt):
          names.append(safe_name(requests[i].id if j == 0 else f"{requests[i].id}_{j}", used))
          save_png(pixels[n * images_per_prompt + j], out_dir, names[-1])
        out[i] = {"image": names[0], **({"images": names} if images_per_prompt > 1 else {})}
      return out

    def attempt(kind: str, chunk: list[int], rng) -> BaseException | None:
      """Generates `chunk` into `results`; on an exception, forgets its PNG names and returns it."""
      names_before = set(used)
      try:
        results.update(generate(kind, chunk, rng))
        return None
      except Exception as e:  # pylint: disable=broad-except
        used.intersection_update(names_before)  # a rerun writes the same names again
        return e

    for kind in ("text", "image"):
      todo = [i for i in prompts if requests[i].generate == kind]
      for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        rng, sub = jax.random.split(rng)
        error = attempt(kind, chunk, sub)
        failures = {} if error is None else {chunk[0]: error}
        if error is not None and len(chunk) > 1:
          logging.warning("A batch of %d %s requests failed (%s); running them one at a time.", len(chunk), kind,
                          _exception_text(error))
          failures = {}
          for n, i in enumerate(chunk):
            alone = attempt(kind, [i], jax.random.fold_in(sub, n))
            if alone is not None:
              failures[i] = alone
        for i, e in failures.items():
          requests[i].error = f"generation failed: {_exception_text(e)}"
          logging.error("Request %r (line %d) failed: %s", requests[i].id, requests[i].line, _exception_text(e),
                        exc_info=e)
        for i in chunk:
          manifest.add(manifest_row(requests[i], results.get(i)))
    rows = [manifest_row(req, results.get(i)) for i, req in enumerate(requests)]
    manifest.finish(rows)
  finally:
    manifest.close()
  return rows


def _encode_prompts(task, tokenizer, requests: list[Request], context: int, manifest: _ManifestWriter) -> dict:
  """{index: Prompt} of the requests that can run; the others get `error` (and their manifest line)."""
  slots, m = task.model.slots, task.model.max_images
  prompts = {}
  for i, req in enumerate(requests):
    if req.error:
      continue
    try:
      prompt = prompts_lib.encode(req.parts, tokenizer, slots)
    except Exception as e:  # pylint: disable=broad-except  # the tokenizer's, on text it cannot take
      req.error = f"the prompt does not encode: {_exception_text(e)}"
      manifest.add(manifest_row(req))
      continue
    need = len(prompt) + (slots + 2 if req.generate == "image" else req.max_tokens)
    limit_images = m - 1 if req.generate == "image" else m
    if need > context:
      req.error = (f"prompt of {len(prompt)} tokens plus {need - len(prompt)} to generate exceeds the model's "
                   f"context of {context}")
    elif len(prompt.images) > limit_images:
      req.error = f"{len(prompt.images)} images in the prompt; at most {limit_images} here"
    else:
      prompts[i] = prompt
    if req.error:
      manifest.add(manifest_row(req))
  return prompts
