"""The workdir's record of its config, and what a resume may change.

`WORKDIR/config.json` is a versioned, loadable record: ``{"format": 1, "config": <every key, derived ones
resolved>, "data": <fingerprint of the files the run reads>}`` (`load_config` gives it back as a
ConfigDict). A resume compares the new config with it *before touching anything*:

* safe (`SAFE_KEYS`): the step count, log/eval/sample/checkpoint cadence and retention, the learning-rate
  schedule, the fault-tolerance knobs, the EMA decay (an EMA turned on starts from the restored weights),
  the mesh and other placement or memory choices (the state reshards on restore) — accepted and recorded;
* paths (`PATH_KEYS`: data dir, tokenizer, prepared sources, frozen codec checkpoints): accepted when the
  files they name are the same (the fingerprint matches), e.g. after moving the data;
* data (every other `data.*` key, `seed`, or files that changed under the same paths): changes the data
  order, so the saved iterator position means nothing: refused unless
  `--config.train.reset_data_iterator=True` (the model and optimiser resume, the data starts afresh);
* everything else is structural (the model, the optimiser): refused with the diff unless
  `--config.train.allow_config_change=True`;
* a key only one side has (added or dropped by another unimm version) is accepted and recorded. A legacy
  `config.json` (a bare dump) cannot be checked: a warning, then it is replaced by a record.

Every accepted change is appended to `WORKDIR/config_changes.jsonl` with the step it applies from, and
the record is rewritten (process 0) only once the check passed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import glob
import json
import os
import time

from absl import logging
import ml_collections

FORMAT = 1
RECORD_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"

SAFE_KEYS = (
    "train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpoints", "train.sample_*", "train.eval_*", "train.final_eval_*",
    "train.learning_rate", "train.warmup_steps", "train.final_learning_rate",
    "train.skip_nonfinite", "train.max_consecutive_skips", "train.good_after_steps", "train.loss_spike_factor",
    "train.rewind_to_last_good", "train.allow_config_change", "train.reset_data_iterator",
    "train.restart_from_scratch", "train.init_from", "train.grad_accum_steps", "train.ema_decay",
    "mesh.*", "targets.*", "sharding.*", "model.backbone.remat", "model.backbone.attention",
    "model.vision.remat", "model.lm_loss_chunk", "model.guidance", "data.read_threads", "data.read_prefetch",
    "data.warn_skip_rate",
)
PATH_KEYS = ("data.data_dir", "data.tokenizer.path", "data.sources.*.path", "model.*.checkpoint")
DATA_KEYS = ("data.*", "seed")


class ConfigChangeError(ValueError):
  """A resume whose config changes what the checkpoint was trained with."""


def _plain(value):
  """JSON's view of a config value (tuples become lists), so a record and a fresh config compare equal."""
  return json.loads(json.dumps(value, default=str))


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _matches(key: str, patterns) -> bool:
  return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _listing(pattern: str) -> list:
  """[(name, size)] of the files a path names: a file, a glob, or every file under a directory."""
  found = []
  for path in sorted(glob.glob(pattern)):
    if os.path.isdir(path):
      for root, _, files in sorted(os.walk(path)):
        found += [(os.path.relpath(os.path.join(root, f), path), os.path.getsize(os.path.join(root, f)))
                  for f in sorted(files)]
    else:
      found.append((os.path.basename(path), os.path.getsize(path)))
  return found


def _sha256(path: str) -> str:
  try:
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  except OSError:
    return ""


def data_fingerprint(config) -> dict:
  """What the run reads, by content rather than path: the tokenizer's hash, each source's files (names,
  sizes) and each frozen codec's newest checkpoint files, so moved data compares equal and re-prepared
  data does not."""
  d = config.data
  sources = {}
  for name in sorted(d.sources.keys()):
    spec = d.sources[name]
    if spec.get("kind") == "tfds":
      parts = [d.data_dir, *spec.get("tfds_name", "").split("/")]
      if spec.get("builder_config"):
        parts.append(spec.get("builder_config"))
      sources[name] = _listing(os.path.join(*parts))
    else:
      sources[name] = _listing(str(spec.get("path", "")).replace("{split}", "*"))
  codecs = {}
  for key in sorted(config.model.keys()):  # the frozen codecs and encoders a family reads (`model.*.checkpoint`)
    node = config.model[key]
    directory = node.get("checkpoint", "") if isinstance(node, ml_collections.ConfigDict) else ""
    if directory:
      steps = sorted((int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else [])
      codecs[key] = _listing(os.path.join(directory, str(steps[-1]))) if steps else []
  tokenizer = d.tokenizer.path.format(data_dir=d.data_dir)
  if os.path.isdir(tokenizer):  # a Hugging Face model directory: its tokenizer.json is what is read
    tokenizer = os.path.join(tokenizer, "tokenizer.json")
  return _plain({"tokenizer": _sha256(tokenizer), "sources": sources, "codecs": codecs})


def make_record(config) -> dict:
  return {"format": FORMAT, "config": _plain(config.to_dict()), "data": data_fingerprint(config)}


def read_record(workdir: str) -> dict | None:
  """The workdir's record; None when there is none; a legacy `config.json` (a bare config dump) comes back
  with format 0 and no fingerprint."""
  path = os.path.join(workdir, RECORD_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    raw = json.load(f)
  if isinstance(raw, dict) and raw.get("format") == FORMAT and "config" in raw:
    return raw
  return {"format": 0, "config": raw, "data": None}


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's run resolved (every key, derived ones included)."""
  record = read_record(workdir)
  if record is None:
    raise FileNotFoundError(f"no {RECORD_FILE} in {workdir}: not a unimm workdir, or it never started")
  return ml_collections.ConfigDict(record["config"])


def changes(old: dict, new: dict) -> dict[str, str]:
  """{key: class} of every key whose value differs between two records (classes: safe, path, data,
  structural, version — a key only one of them has; a path key becomes data when the fingerprints differ)."""
  a, b = _flat(old["config"]), _flat(new["config"])
  same_files = old.get("data") is None or old["data"] == new["data"]
  out = {}
  for key in sorted(set(a) | set(b)):
    if a.get(key, "<absent>") == b.get(key, "<absent>"):
      continue
    if key not in a or key not in b:
      out[key] = "version"  # a key this unimm version added or dropped: its default is the code's, not a choice
    elif _matches(key, SAFE_KEYS):
      out[key] = "safe"
    elif _matches(key, PATH_KEYS):
      out[key] = "path" if same_files else "data"
    elif _matches(key, DATA_KEYS):
      out[key] = "data"
    else:
      out[key] = "structural"
  if not same_files and not any(c == "data" for c in out.values()):
    out["<data files>"] = "data"  # the same paths, other contents (re-prepared, or a new tokenizer)
  return out


def check_resume(config, workdir: str) -> tuple[dict, dict, bool]:
  """Compares `config` with the workdir's record before a resume. Returns (the new record, the accepted
  changes {key: [old, new, class]}, whether the data iterator must start afresh); raises
  `ConfigChangeError` with the diff and the flag that allows it."""
  new = make_record(config)
  old = read_record(workdir)
  if old is None:
    return new, {}, False
  if old["format"] == 0:
    logging.warning("%s/%s is a config dump from an older unimm, not a versioned record: the resume cannot be "
                    "checked against it; it is replaced by a record of this config.", workdir, RECORD_FILE)
    return new, {}, False
  found = changes(old, new)
  a, b = _flat(old["config"]), _flat(new["config"])
  t = config.train
  refused = {k: c for k, c in found.items()
             if (c == "structural" and not t.allow_config_change) or (c == "data" and not t.reset_data_iterator)}
  if refused:
    lines = [f"  {k}: {a.get(k, '<absent>')!r} → {b.get(k, '<absent>')!r} ({c})" for k, c in refused.items()]
    raise ConfigChangeError(
        f"the config differs from the one {workdir} was trained with, in ways a resume cannot take:\n"
        + "\n".join(lines) + "\nNothing was changed in the workdir. Undo these overrides to resume; or set "
        "--config.train.reset_data_iterator=True to resume the model with the data started afresh (data "
        "changes), --config.train.allow_config_change=True to resume anyway (structural changes), or use a new "
        "--workdir. Safe to change: " + ", ".join(SAFE_KEYS) + "; paths that point at the same files.")
  accepted = {k: [a.get(k), b.get(k), c] for k, c in found.items()}
  reset = any(c == "data" for c in found.values())
  return new, accepted, reset


def write_record(workdir: str, record: dict) -> None:
  tmp = os.path.join(workdir, RECORD_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, os.path.join(workdir, RECORD_FILE))


def log_changes(workdir: str, step: int, accepted: dict, reset_data: bool) -> None:
  """Appends one line per resume that changed something: the step it applies from and each change."""
  if not accepted:
    return
  with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
    f.write(json.dumps({"step": int(step), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "data_iterator_reset": bool(reset_data), "changes": _plain(accepted)}) + "\n")
