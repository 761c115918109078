"""The sample command: JSON-lines requests in, a manifest and PNGs out (a contract).

    python -m unimm.main --mode=sample --config=... --workdir=... --prompts=FILE --out=DIR

FILE, one request a line (image paths relative to FILE):
    {"id": "...", "parts": [{"text": "..."}, {"image": "path.png"}], "generate": "image" | "text",
     "max_tokens": 32}
DIR/manifest.jsonl, one line a request, in input order:
    {"id", "prompt": <the text parts joined>, "generate", "text" (text requests) | "image" (relative PNG path)}
A text request whose model opens an image (emits BOI) gets it drawn and then continues; its line
then also holds "images" (relative PNG paths, in order) and "parts" ([{"text"} | {"image"}], the
output in order), while "text" stays the text parts joined. A request that cannot run gets
    {"id", "prompt", "generate", "error": "..."}
and the others still run.
PNGs are written at the dataset's resolution and mode (grayscale for 1 channel).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
from PIL import Image as PILImage

from unimm.data import documents
from unimm.inference import generators, images as images_lib, prompts as prompts_lib, text as text_lib


@dataclasses.dataclass
class Request:
  id: str
  prompt_text: str
  generate: str
  max_tokens: int = 32
  parts: list = dataclasses.field(default_factory=list)
  error: str = ""


def load_image(path: str, image_shape) -> np.ndarray:
  """uint8 [H, W, C] in the model's resolution and mode (converted and resized if needed)."""
  h, w, c = image_shape
  with PILImage.open(path) as im:
    im = im.convert("L" if c == 1 else "RGB")
    if im.size != (w, h):
      im = im.resize((w, h), PILImage.Resampling.BICUBIC)
    pixels = np.asarray(im, np.uint8)
  return pixels[..., None] if pixels.ndim == 2 else pixels


def parse_requests(path: str, image_shape) -> list[Request]:
  """Every line of FILE as a Request; problems become the request's `error`."""
  base = os.path.dirname(os.path.abspath(path))
  out = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        out.append(Request(f"line{number}", "", "", error=f"line {number} is not JSON: {e}"))
        continue
      if not isinstance(obj, dict):
        out.append(Request(f"line{number}", "", "", error=f"line {number} is not a JSON object"))
        continue
      max_tokens = obj.get("max_tokens", 32)
      valid_budget = isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1
      req = Request(str(obj.get("id", f"line{number}")), "", str(obj.get("generate", "")),
                    max_tokens=max_tokens if valid_budget else -1)
      texts = []
      for part in obj.get("parts", []) if isinstance(obj.get("parts"), list) else [None]:
        if isinstance(part, dict) and set(part) == {"text"} and isinstance(part["text"], str):
          texts.append(part["text"])
          req.parts.append(documents.Text(part["text"]))
        elif isinstance(part, dict) and set(part) == {"image"} and isinstance(part["image"], str):
          full = os.path.join(base, part["image"])
          try:
            req.parts.append(documents.Image(load_image(full, image_shape)))
          except FileNotFoundError:
            req.error = req.error or f"image file not found: {part['image']}"
          except Exception as e:  # PIL's many kinds of undecodable input
            req.error = req.error or f"image {part['image']} does not decode: {e}"
        else:
          req.error = req.error or f"unknown part {part!r}: a part is {{\"text\": str}} or {{\"image\": path}}"
      req.prompt_text = " ".join(texts)
      if req.generate not in ("image", "text"):
        req.error = req.error or f"generate is {obj.get('generate')!r}; expected 'image' or 'text'"
      if req.max_tokens < 1:
        req.error = req.error or f"max_tokens is {obj.get('max_tokens')!r}; expected a positive integer"
      out.append(req)
  return out


def safe_name(request_id: str, used: set[str]) -> str:
  stem = re.sub(r"[^A-Za-z0-9._-]", "_", request_id)[:80] or "image"
  name, k = stem, 1
  while name in used:
    k += 1
    name = f"{stem}_{k}"
  used.add(name)
  return name + ".png"


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


def run_requests(task, params, tokenizer, requests: list[Request], out_dir: str, *, context: int, rng,
                 sampling: text_lib.SamplingOptions, num_steps: int, guidance: float, sampler: str,
                 batch_size: int = 32, placement=None,
                 code_sampling: text_lib.SamplingOptions | None = None, images_per_prompt: int = 1) -> list[dict]:
  """Runs the valid requests in batches; writes PNGs and the manifest; returns the manifest rows.

  `code_sampling`: temperature / top-k / top-p over image codes, for families that write codes.
  `images_per_prompt` > 1: an image request's line gets `images` (all of them; `image` is the first).
  """
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  slots, m = task.model.slots, task.model.max_images
  prompts = {}
  for i, req in enumerate(requests):
    if req.error:
      continue
    prompt = prompts_lib.encode(req.parts, tokenizer, slots)
    need = len(prompt) + (slots + 2 if req.generate == "image" else req.max_tokens)
    limit_images = m - 1 if req.generate == "image" else m
    if need > context:
      req.error = (f"prompt of {len(prompt)} tokens plus {need - len(prompt)} to generate exceeds the model's "
                   f"context of {context}")
    elif len(prompt.images) > limit_images:
      req.error = f"{len(prompt.images)} images in the prompt; at most {limit_images} here"
    else:
      prompts[i] = prompt
  results: dict[int, dict] = {}
  used: set[str] = set()
  text_gen = images_gen = None
  diffusion = images_lib.DiffusionOptions(num_steps=num_steps, guidance=guidance, sampler=sampler)
  for kind in ("text", "image"):
    todo = [i for i in prompts if requests[i].generate == kind]
    for start in range(0, len(todo), batch_size):
      chunk = todo[start:start + batch_size]
      rng, sub = jax.random.split(rng)
      if kind == "text":
        text_gen = text_gen or generators.text_generator(task, params, tokenizer.specials, placement, code_sampling)
        outs = text_gen.generate_mixed([prompts[i] for i in chunk], rng=sub, options=sampling,
                                       max_new_tokens=[requests[i].max_tokens for i in chunk],
                                       diffusion=diffusion)
        for i, generation in zip(chunk, outs):
          results[i] = text_result(generation, tokenizer, out_dir, requests[i].id, used)
      else:
        images_gen = images_gen or generators.image_generator(task, params, tokenizer.specials, placement,
                                                              code_sampling)
        # Several images per prompt: the prompt repeated in one batch (drawn in parallel).
        pixels = images_gen.generate([prompts[i] for i in chunk for _ in range(images_per_prompt)], sub,
                                     num_steps=num_steps, guidance=guidance, sampler=sampler)
        for n, i in enumerate(chunk):
          names = []
          for j in range(images_per_prompt):
            names.append(safe_name(requests[i].id if j == 0 else f"{requests[i].id}_{j}", used))
            save_png(pixels[n * images_per_prompt + j], out_dir, names[-1])
          results[i] = {"image": names[0], **({"images": names} if images_per_prompt > 1 else {})}
  manifest = []
  for i, req in enumerate(requests):
    row = {"id": req.id, "prompt": req.prompt_text, "generate": req.generate}
    row.update({"error": req.error} if req.error else results[i])
    manifest.append(row)
  with open(os.path.join(out_dir, "manifest.jsonl"), "w", encoding="utf-8") as f:
    for row in manifest:
      f.write(json.dumps(row) + "\n")
  return manifest
