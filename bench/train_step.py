"""Train-step speed and MFU for a config on whatever devices exist, beside a text-only run; prints JSON.

    python bench/train_step.py --config=configs/transfusion/tiny.py [--batch=16] [--seq_len=256] [--steps=10]
    python bench/train_step.py --config=configs/transfusion/1_4b.py --batch=4 --seq_len=4096 \\
        --set model.backbone.attention=pallas --set model.backbone.remat=qkv_proj

Two runs of one config (`--runs`): `multimodal`, the mixed rows below, and
`text_only`, the same backbone and LM head on rows of text documents with the
image path left out of the step (max_images_per_row=0) — their step-time ratio
is the cost of multimodality at equal tokens per step.

Batches are synthetic but shaped like real packed rows: documents of
image–caption pairs and text-only documents packed to the row length, about
half of the tokens image slots (the Transfusion paper's even split), so the
benchmark needs no dataset. A KL-VAE is randomly initialised when the config
names one (its encoder runs inside the step, as in training). Reported: step
time (median), tokens/s, model FLOP/s per device (counting in
`unimm.train.setup.flops_per_token`) and, on known accelerators, MFU.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from unimm import families  # pylint: disable=wrong-import-position
from unimm.data import layout  # pylint: disable=wrong-import-position
from unimm.models import attention, backbone  # pylint: disable=wrong-import-position
from unimm.parallel import sharding  # pylint: disable=wrong-import-position
from unimm.train import setup as setup_lib  # pylint: disable=wrong-import-position

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12}


def load_config(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def apply_override(config, assignment: str) -> None:
  key, _, value = assignment.partition("=")
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  current = node[leaf]
  if isinstance(current, (tuple, list)):
    node[leaf] = tuple(ast.literal_eval(value))
  elif isinstance(current, bool):
    node[leaf] = value.lower() in ("1", "true", "yes")
  elif isinstance(current, (int, float)):
    node[leaf] = type(current)(float(value)) if isinstance(current, int) else float(value)
  else:
    node[leaf] = value


def synthetic_batch(rng: np.random.Generator, batch: int, seq_len: int, slots: int, max_images: int,
                    image_shape, vocab: int) -> dict:
  """Packed rows: image–caption pairs and text-only documents, ~half image slots."""
  out = {k: np.zeros((batch, seq_len), np.int32) for k in ("tokens", "segment_ids", "positions", "image_ids")}
  out["loss_weights"] = np.zeros((batch, seq_len), np.float32)
  out["images"] = rng.integers(0, 256, (batch, max_images, *image_shape), dtype=np.uint8)
  out["image_valid"] = np.zeros((batch, max_images), bool)
  out["image_t_max"] = np.zeros((batch, max_images), np.int32)
  for b in range(batch):
    t, seg, k = 0, 0, 0
    while True:
      pair = rng.random() < 0.5 and k < max_images
      n = int(rng.integers(8, 64)) + slots + 4 if pair else int(rng.integers(64, max(65, slots * 2)))
      if t + n > seq_len:
        break
      seg += 1
      out["tokens"][b, t:t + n] = rng.integers(0, vocab, n)
      out["segment_ids"][b, t:t + n] = seg
      out["positions"][b, t:t + n] = np.arange(n)
      out["loss_weights"][b, t:t + n - 1] = 1.0
      if pair:
        k += 1
        start = t + n - slots - 2
        out["image_ids"][b, start:start + slots] = k
        out["loss_weights"][b, start - 1:start + slots] = 0.0
        out["image_valid"][b, k - 1] = True
        out["image_t_max"][b, k - 1] = 1000
      t += n
  return out


def measure(config, args, text_only: bool) -> dict:
  """Compile, run `args.steps` steps, report one configuration."""
  config = copy.deepcopy(config)
  if text_only:  # the same backbone and LM head, rows of text documents, no image path in the step
    config.data.max_images_per_row = 0
  vocab = int(config.model.vocab_size) or 256
  image_shape = layout.image_shape_of(config.data)
  mesh = sharding.make_mesh(config.mesh)
  setup = setup_lib.build(config, mesh, vocab, families.random_frozen_codec(config))
  state = setup.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  host = synthetic_batch(rng, int(config.data.batch_size), int(config.data.seq_len), setup.task.model.slots,
                         int(config.data.max_images_per_row), image_shape, vocab)
  batch = sharding.global_batch(host, mesh)
  key = jax.random.key(1)
  t0 = time.perf_counter()
  state, m = setup.step(state, batch, key)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = setup.step(state, batch, key)
    jax.block_until_ready(m)  # one step at a time: the figure is a step's latency, not a queue's
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  tokens = int(config.data.batch_size) * int(config.data.seq_len)
  # Model FLOPs (PaLM, appendix B): 6 per matmul parameter per token for forward + backward, plus
  # attention's 12·L·D·T per token halved for the causal mask — `setup.flops_per_token`. Not counted:
  # remat's recomputation, the frozen VAE encoder, the extra image squares of the mixed mask, the
  # skipped cross-document blocks. The text-only run is counted the same way, so MFU compares useful work.
  flops = setup_lib.flops_per_token(setup, config) * tokens
  device = jax.devices()[0]
  peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device.device_kind), None)
  per_device = flops / step_s / jax.device_count()
  return {
      "text_only": text_only, "params": setup.total_params, "matmul_params": setup.matmul_params,
      "batch": int(config.data.batch_size), "seq_len": int(config.data.seq_len),
      "image_slot_fraction": round(float((host["image_ids"] > 0).mean()), 3),
      "dtype": config.model.backbone.dtype, "remat": config.model.backbone.remat,
      "attention": config.model.backbone.attention,
      "attention_kernel": attention.resolve_implementation(
          config.model.backbone.attention, length=int(config.data.seq_len),
          head_dim=backbone.BackboneConfig.from_config(config.model.backbone).head_size),
      "compile_s": round(compile_s, 1), "step_ms": round(step_s * 1e3, 2),
      "step_ms_min": round(min(times) * 1e3, 2), "tokens_per_s": round(tokens / step_s),
      "model_tflops_per_s_per_device": round(per_device / 1e12, 3),
      "mfu": round(per_device / peak, 4) if peak and config.model.backbone.dtype == "bfloat16" else None,
      "loss": float(m["loss"]),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="FILE[:arg]")
  parser.add_argument("--batch", type=int, default=0, help="global rows per step (default: the config's)")
  parser.add_argument("--seq_len", type=int, default=0, help="row length (default: the config's)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--set", action="append", default=[], help="override, e.g. model.backbone.remat=full")
  parser.add_argument("--runs", default="multimodal,text_only",
                      help="multimodal (the mixed rows), text_only (same backbone, text rows), or both")
  args = parser.parse_args()

  config = load_config(args.config)
  for assignment in args.set:
    apply_override(config, assignment)
  if args.batch:
    config.data.batch_size = args.batch
  if args.seq_len:
    config.data.seq_len = args.seq_len
  device = jax.devices()[0]
  result = {"config": args.config, "overrides": args.set, "backend": jax.default_backend(),
            "device_kind": device.device_kind, "devices": jax.device_count(),
            "mesh": dict(sharding.make_mesh(config.mesh).shape),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
  runs = args.runs.split(",")
  for run in runs:
    if run not in ("multimodal", "text_only"):
      raise ValueError(f"--runs: {run!r}; expected multimodal and/or text_only")
    result[run] = measure(config, args, text_only=run == "text_only")
  if len(runs) == 2:  # the cost of multimodality, at equal tokens per step
    result["multimodal_vs_text_only_step"] = round(result["multimodal"]["step_ms"] / result["text_only"]["step_ms"], 3)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
