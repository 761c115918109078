"""Transfusion vs Chameleon at equal size and equal training FLOPs on shapes (Transfusion's Table 3 in miniature).

    python bench/compare_families.py --workdir=/tmp/compare [--steps=1200] [--parallel=2]

Trains the tiny VQ tokenizer first (configs/tokenizers/tiny.py:shapes, skipped when --tokenizer names
a trained one's checkpoints), then configs/transfusion/tiny.py and configs/chameleon/tiny.py: the same
backbone (4 layers × 128), data mix, batch, row length and optimiser. Transfusion trains `--steps`
steps; Chameleon as many as give the same model FLOPs (`unimm.train.setup.flops_per_token` × tokens;
the frozen tokenizer's encoder, like the papers, is not counted). Each run ends with the standard
evaluation (`--eval_examples` test examples; DDIM 50 steps, guidance 3 for Transfusion; CFG 3 over
codes for Chameleon). Prints one JSON line per family, then a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

from demo_sweep import REPO, flatten

sys.path.insert(0, REPO)

FAMILIES = {"transfusion": "configs/transfusion/tiny.py", "chameleon": "configs/chameleon/tiny.py"}


def load_config(path: str, arg=None):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def flops_per_token(config_path: str, text_vocab: int) -> tuple[float, int]:
  """(model FLOPs per trained token, parameters) of a config, from its abstract train state."""
  import jax  # pylint: disable=g-import-not-at-top
  from unimm.parallel import sharding  # pylint: disable=g-import-not-at-top
  from unimm.train import setup  # pylint: disable=g-import-not-at-top
  config = load_config(config_path)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}, jax.devices()[:1])
  built = setup.build(config, mesh, vocab_size=text_vocab, frozen_codec={})
  return setup.flops_per_token(built, config), built.total_params


def run(cmd: list[str], log_path: str) -> subprocess.Popen:
  return subprocess.Popen(cmd, cwd=REPO, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=1200, help="Transfusion's steps; Chameleon's follow from FLOPs")
  parser.add_argument("--tokenizer", default="", help="a trained tiny shapes tokenizer's checkpoints dir")
  parser.add_argument("--eval_examples", type=int, default=100)
  parser.add_argument("--parallel", type=int, default=1)
  parser.add_argument("--data_dir", default="")
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  data = [f"--config.data.data_dir={args.data_dir}"] if args.data_dir else []
  tokenizer = args.tokenizer
  if not tokenizer:
    tok_dir = os.path.join(args.workdir, "tokenizer")
    start = time.time()
    subprocess.run([sys.executable, "-m", "unimm.main", "--config=configs/tokenizers/tiny.py:shapes",
                    f"--workdir={tok_dir}", *data], cwd=REPO, check=True, stdout=open(tok_dir + ".log", "w"),
                   stderr=subprocess.STDOUT)
    with open(os.path.join(tok_dir, "eval.json")) as f:
      print(json.dumps({"name": "tokenizer", "seconds": round(time.time() - start, 1),
                        "eval": flatten(json.load(f))}), flush=True)
    tokenizer = os.path.join(tok_dir, "checkpoints")

  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  data_config = load_config(FAMILIES["transfusion"]).data
  if args.data_dir:
    data_config.data_dir = args.data_dir
  text_vocab = pipeline.load_tokenizer(data_config).vocab_size
  fpt = {name: flops_per_token(path, text_vocab) for name, path in FAMILIES.items()}
  steps = {"transfusion": args.steps,
           "chameleon": round(args.steps * fpt["transfusion"][0] / fpt["chameleon"][0])}
  pending, running, rows = list(FAMILIES), [], {}
  while pending or running:
    while pending and len(running) < args.parallel:
      name = pending.pop(0)
      workdir = os.path.join(args.workdir, name)
      cmd = [sys.executable, "-m", "unimm.main", f"--config={FAMILIES[name]}", f"--workdir={workdir}",
             f"--config.train.num_steps={steps[name]}", f"--config.train.final_eval_examples={args.eval_examples}",
             *data]
      if name == "chameleon":
        cmd.append(f"--config.model.vq.checkpoint={tokenizer}")
      os.makedirs(workdir, exist_ok=True)
      running.append((name, workdir, time.time(), run(cmd, os.path.join(workdir, "compare.log"))))
    time.sleep(2)
    for item in list(running):
      name, workdir, start, proc = item
      if proc.poll() is None:
        continue
      running.remove(item)
      row = {"name": name, "returncode": proc.returncode, "seconds": round(time.time() - start, 1),
             "steps": steps[name], "params": fpt[name][1], "flops_per_token": fpt[name][0]}
      path = os.path.join(workdir, "eval.json")
      if os.path.exists(path):
        with open(path) as f:
          row["eval"] = flatten(json.load(f))
      rows[name] = row
      print(json.dumps(row), flush=True)
  print(table(rows))


def table(rows: dict) -> str:
  cols = [("text→image acc", "shapes/text_to_image/accuracy"), ("count", "shapes/text_to_image/count_accuracy"),
          ("colour", "shapes/text_to_image/colour_accuracy"), ("shape", "shapes/text_to_image/shape_accuracy"),
          ("caption exact", "shapes/image_to_text/exact_match"),
          ("caption shape", "shapes/image_to_text/shape_accuracy"), ("text ppl", "text/perplexity")]
  lines = ["| family | params | steps | train FLOPs | " + " | ".join(c for c, _ in cols) + " |",
           "|---" * (4 + len(cols)) + "|"]
  for name, row in rows.items():
    ev = row.get("eval", {})
    tokens = row["steps"] * 16 * 256  # batch × row length of the tiny configs (an upper bound: padding counts)
    vals = [f"{ev[k]:.2f}" if k in ev else "—" for _, k in cols]
    lines.append(f"| {name} | {row['params'] / 1e6:.2f}M | {row['steps']} | {row['flops_per_token'] * tokens:.2e} | "
                 + " | ".join(vals) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
