"""Throughput and fill of the input pipeline on this machine; prints JSON.

    python bench/data_throughput.py [--batches=50] [--workdir=/tmp/unimm_bench]

Two settings:
* ``shapes_T256``: the tiny Transfusion config on the embedded shapes dataset.
* ``text_heavy_T4096``: a synthetic mix written through `unimm.data.prepare`:
  text-only documents (lognormal lengths, Zipfian words) at weight 0.9 and
  shapes image–caption pairs at 0.1, 256 slots per image.

Reported: packed rows/s, row tokens/s (T per row, padding included), real
tokens/s (padding excluded), fill ratio (non-padding fraction), documents per
row and skip counts, measured after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unimm import main as unimm_main  # pylint: disable=g-import-not-at-top
from unimm.data import documents, paths, pipeline, prepare, records, shapes, tokenizer  # pylint: disable=g-import-not-at-top


def load_tiny_config(data_dir: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/transfusion/tiny.py")
  spec = importlib.util.spec_from_file_location("tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("shapes")
  config.data.data_dir = data_dir
  return config


def measure(config, batches: int, warmup: int = 5) -> dict:
  it = pipeline.build_pipeline(config, "train")
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  got = [next(it) for _ in range(batches)]
  seconds = time.perf_counter() - t0
  rows = sum(b["tokens"].shape[0] for b in got)
  real = sum(int((b["segment_ids"] > 0).sum()) for b in got)
  return {
      "seq_len": int(config.data.seq_len), "batch_size": int(config.data.batch_size),
      "rows_per_s": round(rows / seconds, 1),
      "row_tokens_per_s": round(rows * int(config.data.seq_len) / seconds),
      "real_tokens_per_s": round(real / seconds),
      "fill_ratio": round(real / (rows * int(config.data.seq_len)), 4),
      "documents_per_row": round(sum(int(b["segment_ids"].max(1).sum()) for b in got) / rows, 2),
      "images_per_row": round(sum(int(b["image_valid"].sum()) for b in got) / rows, 2),
      "skipped": {r: int(sum(b["stats"][r].sum() for b in got)) for r in documents.SKIP_REASONS},
      "batches_timed": batches,
  }


def write_text_heavy(workdir: str, num_text: int = 4000, num_pairs: int = 1500, seed: int = 0) -> dict:
  """Synthetic JSON lines → prepared shards; returns the source specs."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  vocab = ["".join(rng.choice(letters, int(rng.integers(2, 9)))) for _ in range(3000)]
  zipf = 1.0 / np.arange(1, len(vocab) + 1)
  zipf /= zipf.sum()
  raw = os.path.join(workdir, "raw")
  os.makedirs(raw, exist_ok=True)
  texts = []
  for shard in range(4):
    with open(os.path.join(raw, f"text-{shard}.jsonl"), "w") as f:
      for _ in range(num_text // 4):
        words = int(min(6000, rng.lognormal(mean=np.log(350), sigma=0.9)))
        text = " ".join(rng.choice(vocab, words, p=zipf))
        texts.append(text)
        f.write(json.dumps({"parts": [{"text": text}]}) + "\n")
  with open(os.path.join(raw, "pairs.jsonl"), "w") as f:
    for _ in range(num_pairs):
      image, objects = shapes.sample_scene(rng)
      import base64  # pylint: disable=g-import-not-at-top
      f.write(json.dumps({"pair": True, "parts": [
          {"text": shapes.caption(objects)},
          {"image_base64": base64.b64encode(records.encode_image(image)).decode()}]}) + "\n")
  prepare.prepare([os.path.join(raw, "text-*.jsonl")], os.path.join(workdir, "text"), workers=2)
  prepare.prepare([os.path.join(raw, "pairs.jsonl")], os.path.join(workdir, "pairs"), image_size=32, workers=1)
  tokenizer.train_tokenizer(texts[:2000] + [shapes.caption(shapes.sample_scene(rng)[1]) for _ in range(500)],
                            os.path.join(workdir, "tokenizer.model"), vocab_size=4096)
  return {
      "text": {"kind": "prepared", "path": os.path.join(workdir, "text", "*.array_record"), "weight": 0.9},
      "pairs": {"kind": "prepared", "path": os.path.join(workdir, "pairs", "*.array_record"), "weight": 0.1},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", default="/tmp/unimm_bench_data")
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--data_dir", default=None, help="where the embedded shapes dataset is (or goes)")
  args = parser.parse_args()
  import ml_collections as mlc  # pylint: disable=g-import-not-at-top

  config = load_tiny_config(args.data_dir or paths.default_data_dir())
  unimm_main.prepare(config)
  results = {"shapes_T256": measure(config, args.batches)}

  text_dir = os.path.join(args.workdir, "text_heavy")
  specs = write_text_heavy(text_dir)
  config = load_tiny_config(config.data.data_dir)
  config.data.sources = mlc.ConfigDict(specs)
  config.data.tokenizer.path = os.path.join(text_dir, "tokenizer.model")
  config.model.patch_size = 2  # 256 slots per 32×32 image
  config.data.seq_len = 4096
  config.data.batch_size = 8
  config.data.packing_bins = 16
  results["text_heavy_T4096"] = measure(config, max(5, args.batches // 5))
  results["cpu_count"] = os.cpu_count()
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
