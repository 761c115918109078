"""`--mode=score`: next-token logits and log-likelihoods of given sequences — the logit checker for a
converted or trained model, and a likelihood scorer.

    python -m unimm.main --mode=score --workdir=W --inputs=requests.jsonl --out=O [--dtype=float32]

Each line of the inputs is `{"id": str, "token_ids": [int, …]}` (the row exactly as given: no BOS added,
as a reference model is called) or `{"id": str, "parts": [{"text": …} | {"image": path}, …]}` (laid out as
training lays out a document: BOS, the parts, EOS; images read clean). Written: `O/<id>.npy`, float32
[T, V], the text head's next-token logits at every position (V: the model's vocabulary without its
padding rows, i.e. the larger of a converted checkpoint's vocabulary and the tokenizer's ids), and
`O/<id>.image.npy` for code families (Chameleon, Janus): float32 [C, codebook], the image head's logits at
the C positions that predict an image code (those followed by an image slot, in order), and
`O/manifest.jsonl`, one line per request: `{"id", "line", "file", "tokens", "log_likelihood"}` — the sum
of log p(next token) over its text targets (token_ids: every next token; parts: the text, BOI and EOS,
not image slots nor EOI) and their count — or `{"id", "line", "error"}` for a request that cannot run
(the others still do).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from unimm.data import documents, layout, packing
from unimm.inference import requests as requests_lib

_PAD_TO = 64  # rows are padded to a multiple of this: few distinct shapes to compile


def parse(path: str, image_shape, image_fit: str = "resize") -> list[dict]:
  """The requests of a JSON-lines file: {"id", "line", and "token_ids" | "parts" | "error"}."""
  requests_lib.check_requests_file(path)
  base = os.path.dirname(os.path.abspath(path))
  out = []
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  for number, raw in enumerate(lines, start=1):
    if not raw.strip():
      continue
    row = {"id": f"line{number}", "line": number}
    try:
      obj = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
      out.append({**row, "error": f"line {number} is not UTF-8 JSON: {e}"[:500]})
      continue
    if not isinstance(obj, dict):
      out.append({**row, "error": f"line {number} is not a JSON object"})
      continue
    if isinstance(obj.get("id"), (str, int)) and not isinstance(obj.get("id"), bool):
      row["id"] = str(obj["id"])
    if ("token_ids" in obj) == ("parts" in obj):
      out.append({**row, "error": "a score request has exactly one of token_ids or parts"})
    elif "token_ids" in obj:
      ids = obj["token_ids"]
      ok = isinstance(ids, list) and len(ids) >= 1 and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
      out.append({**row, "token_ids": ids} if ok else {**row, "error": "token_ids must be a non-empty list of ints"})
    else:
      parts, _, errors = requests_lib.parse_parts(obj["parts"], base, image_shape, image_fit=image_fit)
      out.append({**row, "error": errors[0]} if errors else {**row, "parts": parts})
  return out


def _fragment(request: dict, tokenizer, opts: layout.LayoutOptions, image_shape):
  """The request as a one-document fragment (`layout.layout_document`'s dict), or an error string."""
  if "token_ids" in request:
    ids = np.asarray(request["token_ids"], np.int32)
    return {"tokens": ids, "image_ids": np.zeros_like(ids), "loss_weights": np.ones(len(ids), np.float32),
            "images": np.zeros((0, *image_shape), np.uint8), "image_t_max": np.zeros(0, np.int32),
            "image_written": np.zeros(0, bool)}
  fragment = layout.layout_document(documents.Document(tuple(request["parts"])), tokenizer, opts,
                                    np.random.default_rng(0))
  if isinstance(fragment, documents.Skipped):
    return f"the parts do not make a document: {fragment.reason} ({fragment.detail})"
  return fragment


def run(task, params, tokenizer, config, reqs: list[dict], out_dir: str, vocab: int) -> list[dict]:
  """Scores `reqs`; writes the logits and `manifest.jsonl` into `out_dir`; returns the manifest rows."""
  os.makedirs(out_dir, exist_ok=True)
  opts = layout.LayoutOptions.from_config(config.data)
  image_shape = layout.image_shape_of(config.data)
  max_images, seq_len = int(config.data.max_images_per_row), int(config.data.seq_len)
  vocab = min(vocab, task_vocabulary(task, params))  # the rows a request may name: no padding, none past the head
  logits_fn = jax.jit(task.logits)
  image_logits_fn = jax.jit(task.image_logits) if hasattr(task, "image_logits") else None
  eoi = tokenizer.specials.eoi
  manifest, used = [], set()
  for req in reqs:
    row = {"id": req["id"], "line": req["line"]}
    fragment = req.get("error") or _fragment(req, tokenizer, opts, image_shape)
    if isinstance(fragment, dict):
      n = len(fragment["tokens"])
      bad_ids = [int(i) for i in fragment["tokens"] if not 0 <= i < vocab]
      if bad_ids:
        fragment = f"token ids {bad_ids[:5]} are outside the model's vocabulary [0, {vocab})"
      elif n > seq_len:
        fragment = f"{n} tokens; the model's rows hold data.seq_len={seq_len} (--config.data.seq_len to raise it)"
      elif len(fragment["images"]) > max_images:
        fragment = f"{len(fragment['images'])} images; rows hold data.max_images_per_row={max_images}"
    if isinstance(fragment, str):
      manifest.append({**row, "error": fragment})
      continue
    length = -(-n // _PAD_TO) * _PAD_TO
    batch = packing.make_row([fragment], {}, seq_len=length, max_images=max_images, image_shape=image_shape,
                             pad_id=tokenizer.specials.pad)
    batch.pop("stats", None)
    batch = {k: np.asarray(v)[None] for k, v in batch.items()}
    logits = np.asarray(logits_fn(params, batch)[0, :n, :vocab], np.float32)
    name = requests_lib.safe_name(req["id"], used, ".npy")
    np.save(os.path.join(out_dir, name), logits)
    if image_logits_fn is not None and (fragment["image_ids"][1:] > 0).any():
      at_codes = np.nonzero(fragment["image_ids"][1:] > 0)[0]  # positions whose next slot is a code
      image = np.asarray(image_logits_fn(params, batch)[0], np.float32)[at_codes]
      np.save(os.path.join(out_dir, name[:-len(".npy")] + ".image.npy"), image)
    log_probs = logits - _logsumexp(logits)
    targets = fragment["tokens"][1:]
    if "token_ids" in req:
      keep = np.ones(n - 1, bool)
    else:
      keep = (fragment["image_ids"][1:] == 0) & (targets != eoi)
    picked = log_probs[np.arange(n - 1), targets][keep]
    manifest.append({**row, "file": name, "tokens": int(keep.sum()), "log_likelihood": float(picked.sum())})
  with open(os.path.join(out_dir, "manifest.jsonl"), "w") as f:
    for line in manifest:
      f.write(json.dumps(line) + "\n")
  return manifest


def _logsumexp(x: np.ndarray) -> np.ndarray:
  top = x.max(-1, keepdims=True)
  return top + np.log(np.exp(x.astype(np.float64) - top).sum(-1, keepdims=True)).astype(np.float32)


def task_vocabulary(task, params) -> int:
  """The rows of the text head (the model's vocabulary, padding included)."""
  del task
  return int(params["lm_head"]["kernel"].shape[-1])
