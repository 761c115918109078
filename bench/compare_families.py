"""Transfusion vs Chameleon vs Janus at equal size and equal training FLOPs on shapes.

    python bench/compare_families.py --workdir=/tmp/compare [--steps=1200] [--parallel=2] [--families=janus]
    python bench/compare_families.py --workdir=/tmp/compare_mot --tokenizer=/tmp/compare/tokenizer/checkpoints \
        --siglip=/tmp/compare/siglip/checkpoints --set='model.backbone.mot=("qkv","out","mlp","norms")' \
        --set=train.ema_decay=0.999 --raw_eval

Trains the tiny VQ tokenizer first (configs/tokenizers/tiny.py:shapes, skipped when --tokenizer names
a trained one's checkpoints) and, for Janus, the tiny SigLIP ViT (configs/siglip/tiny.py:shapes, skipped
when --siglip names one), then configs/transfusion/tiny.py, configs/chameleon/tiny.py and
configs/janus/tiny.py: the same backbone (4 layers × 128), batch, row length and optimiser. Transfusion
trains `--steps` steps; the others as many as give the same model FLOPs
(`unimm.train.setup.flops_per_token` × tokens; frozen tokenizer encoders and Janus's ViT, run once per
image, are not counted). Janus runs its three stages in turn (each from the previous one's checkpoint),
their steps split as configs/janus/tiny.py splits them; its data mix is each stage's (understanding :
text : generation), the others' is caption-first 0.7. Each run ends with the standard evaluation
(`--eval_examples` test examples; 50 steps of the config's sampler, guidance 3 for Transfusion; CFG over
codes for Chameleon (3) and Janus (5, its default)). `--set KEY=VALUE` (repeatable) overrides every
family's config (every Janus stage's) the same way, e.g. Mixture-of-Transformers or an EMA; with an EMA,
`--raw_eval` also evaluates the raw weights (`--mode=eval --ema=false`, the same training run) as a row of
its own. `--reuse` keeps a family's finished run (its eval.json) in the workdir instead of training it
again. Prints one JSON line per family, then a Markdown table.
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

FAMILIES = {"transfusion": "configs/transfusion/tiny.py", "chameleon": "configs/chameleon/tiny.py",
            "janus": "configs/janus/tiny.py"}


def load_config(path: str, arg=None, sets=()):
  """The config file's get_config(arg), with `sets` (KEY=VALUE, as train_step.py's --override) applied."""
  from train_step import apply_override  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for kv in sets:
    try:
      apply_override(config, kv)
    except KeyError as e:
      raise SystemExit(f"--set {kv}: {path} has no such key ({e})") from e
  return config


def flops_per_token(config_path: str, text_vocab: int, sets=()) -> tuple[float, int]:
  """(model FLOPs per trained token, parameters) of a config, from its abstract train state."""
  import jax  # pylint: disable=g-import-not-at-top
  from unimm.parallel import sharding  # pylint: disable=g-import-not-at-top
  from unimm.train import setup  # pylint: disable=g-import-not-at-top
  from unimm import families  # pylint: disable=g-import-not-at-top
  config = load_config(config_path, sets=sets)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}, jax.devices()[:1])
  built = setup.build(config, mesh, vocab_size=text_vocab, frozen_codec=families.random_frozen_codec(config))
  return setup.flops_per_token(built, config), built.total_params


def run(cmds: list[list[str]], log_path: str) -> subprocess.Popen:
  """The commands one after the other (stopping at a failure), logged to one file."""
  script = " && ".join(" ".join(f"'{a}'" for a in cmd) for cmd in cmds)
  return subprocess.Popen(["bash", "-c", script], cwd=REPO, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def pretrain(name: str, config: str, workdir: str, data: list[str]) -> str:
  """Trains an encoder the families need (tokenizer, SigLIP ViT) and returns its checkpoints dir."""
  out = os.path.join(workdir, name)
  start = time.time()
  subprocess.run([sys.executable, "-m", "unimm.main", f"--config={config}", f"--workdir={out}", *data], cwd=REPO,
                 check=True, stdout=open(out + ".log", "w"), stderr=subprocess.STDOUT)
  with open(os.path.join(out, "eval.json")) as f:
    print(json.dumps({"name": name, "seconds": round(time.time() - start, 1), "eval": flatten(json.load(f))}),
          flush=True)
  return os.path.join(out, "checkpoints")


def janus_commands(workdir: str, total_steps: int, eval_examples: int, encoders: list[str],
                   data: list[str], overrides: list[str]) -> tuple[list[list[str]], str]:
  """The three Janus stages, `total_steps` split as the tiny config splits them; (commands, last workdir)."""
  from configs.janus import tiny  # pylint: disable=g-import-not-at-top
  share = [tiny.STAGES[s][2] for s in (1, 2, 3)]
  steps = [round(total_steps * n / sum(share)) for n in share[:2]]
  steps.append(total_steps - sum(steps))
  cmds, previous = [], ""
  for stage, n in zip((1, 2, 3), steps):
    out = os.path.join(workdir, f"stage{stage}")
    cmds.append([sys.executable, "-m", "unimm.main", f"--config={FAMILIES['janus']}:stage{stage}", f"--workdir={out}",
                 f"--config.train.num_steps={n}",
                 f"--config.train.final_eval_examples={eval_examples if stage == 3 else 0}", *encoders, *data,
                 *overrides,
                 *([f"--config.train.init_from={previous}"] if previous else [])])
    previous = os.path.join(out, "checkpoints")
  return cmds, os.path.join(workdir, "stage3")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=1200, help="Transfusion's steps; Chameleon's follow from FLOPs")
  parser.add_argument("--tokenizer", default="", help="a trained tiny shapes tokenizer's checkpoints dir")
  parser.add_argument("--eval_examples", type=int, default=100)
  parser.add_argument("--parallel", type=int, default=1)
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--siglip", default="", help="a trained tiny shapes SigLIP run's checkpoints dir (Janus)")
  parser.add_argument("--families", default=",".join(FAMILIES), help="which to train (comma-separated)")
  parser.add_argument("--reuse", action="store_true", help="keep finished runs found in the workdir")
  parser.add_argument("--set", action="append", default=[], help="KEY=VALUE overriding every family's config")
  parser.add_argument("--raw_eval", action="store_true", help="with an EMA: also evaluate the raw weights")
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  data = [f"--config.data.data_dir={args.data_dir}"] if args.data_dir else []
  overrides = [f"--config.{kv}" for kv in args.set]
  for path in FAMILIES.values():  # a misspelt --set fails here, before any training
    load_config(path, sets=args.set)
  chosen = [f for f in FAMILIES if f in args.families.split(",")]
  tokenizer = args.tokenizer or pretrain("tokenizer", "configs/tokenizers/tiny.py:shapes", args.workdir, data)
  siglip = args.siglip
  if "janus" in chosen and not siglip:
    siglip = pretrain("siglip", "configs/siglip/tiny.py:shapes", args.workdir, data)

  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  data_config = load_config(FAMILIES["transfusion"]).data
  if args.data_dir:
    data_config.data_dir = args.data_dir
  text_vocab = pipeline.load_tokenizer(data_config).vocab_size
  fpt = {name: flops_per_token(path, text_vocab, args.set) for name, path in FAMILIES.items()}
  steps = {name: round(args.steps * fpt["transfusion"][0] / fpt[name][0]) for name in FAMILIES}
  encoders = {"transfusion": [], "chameleon": [f"--config.model.vq.checkpoint={tokenizer}"],
              "janus": [f"--config.model.vq.checkpoint={tokenizer}", f"--config.model.vision.checkpoint={siglip}"]}
  pending, running, rows = [], [], {}
  for name in FAMILIES:
    workdir = os.path.join(args.workdir, name)
    if name in chosen and not (args.reuse and os.path.exists(os.path.join(_eval_dir(name, workdir), "eval.json"))):
      pending.append(name)
    elif os.path.exists(os.path.join(_eval_dir(name, workdir), "eval.json")):
      rows[name] = _row(name, workdir, steps, fpt, None, None)
  while pending or running:
    while pending and len(running) < args.parallel:
      name = pending.pop(0)
      workdir = os.path.join(args.workdir, name)
      if name == "janus":
        cmds, _ = janus_commands(workdir, steps[name], args.eval_examples, encoders[name], data, overrides)
      else:
        cmds = [[sys.executable, "-m", "unimm.main", f"--config={FAMILIES[name]}", f"--workdir={workdir}",
                 f"--config.train.num_steps={steps[name]}", f"--config.train.final_eval_examples={args.eval_examples}",
                 *encoders[name], *data, *overrides]]
      if args.raw_eval:
        cmds += raw_eval_commands(_eval_dir(name, workdir), args.eval_examples)
      os.makedirs(workdir, exist_ok=True)
      running.append((name, workdir, time.time(), run(cmds, os.path.join(workdir, "compare.log"))))
    time.sleep(2)
    for item in list(running):
      name, workdir, start, proc = item
      if proc.poll() is None:
        continue
      running.remove(item)
      rows[name] = _row(name, workdir, steps, fpt, proc.returncode, round(time.time() - start, 1))
      print(json.dumps(rows[name]), flush=True)
  for name in list(rows):
    raw = _row(name, workdir=os.path.join(args.workdir, name), steps=steps, fpt=fpt, returncode=None, seconds=None,
               eval_file=RAW_EVAL)
    if "eval" in raw:
      rows[f"{name} (raw weights)"] = raw
  print(table({name: row for name, row in sorted(rows.items())}))


RAW_EVAL = "eval_raw.json"


def raw_eval_commands(eval_dir: str, eval_examples: int) -> list[list[str]]:
  """--mode=eval of the raw weights into EVAL_DIR/eval_raw.json, eval.json (the EMA's) kept as it was."""
  keep = os.path.join(eval_dir, "eval_ema.json")
  return [["cp", os.path.join(eval_dir, "eval.json"), keep],
          [sys.executable, "-m", "unimm.main", "--mode=eval", f"--workdir={eval_dir}", "--ema=false",
           f"--eval_examples={eval_examples}", "--diffusion_steps=50"],
          ["mv", os.path.join(eval_dir, "eval.json"), os.path.join(eval_dir, RAW_EVAL)],
          ["mv", keep, os.path.join(eval_dir, "eval.json")]]


def _eval_dir(name: str, workdir: str) -> str:
  return os.path.join(workdir, "stage3") if name == "janus" else workdir


def _row(name, workdir, steps, fpt, returncode, seconds, eval_file="eval.json") -> dict:
  row = {"name": name, "returncode": returncode, "seconds": seconds, "steps": steps[name], "params": fpt[name][1],
         "flops_per_token": fpt[name][0]}
  path = os.path.join(_eval_dir(name, workdir), eval_file)
  if os.path.exists(path):
    with open(path) as f:
      row["eval"] = flatten(json.load(f))
  return row


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
