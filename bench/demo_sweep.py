"""Trains and evaluates variants of a config side by side on this machine; prints one JSON line each.

    python bench/demo_sweep.py --workdir=/tmp/sweep --parallel=4 \\
        --variant='base=' --variant='v=model.prediction=v' \\
        --variant='v_unet=model.prediction=v model.patch_kind=unet model.unet_channels=(16,32,64)'

Each variant is `NAME=key=value key=value` (config overrides as in --config.key=value), run as
`python -m unimm.main --config=CONFIG --workdir=WORKDIR/NAME` with the final evaluation on
(`train.final_eval_examples`, default 100). Printed per variant: wall seconds, the final
training metrics and the flattened eval.json. For picking the demo's settings on a fast machine:
quality at a given step count does not depend on where it was trained.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_variant(spec: str) -> tuple[str, list[str]]:
  name, _, rest = spec.partition("=")
  overrides = [f"--config.{kv}" for kv in rest.split() if kv]
  return name, overrides


def flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}/"))
    elif isinstance(v, (int, float)):
      out[f"{prefix}{k}"] = v
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/transfusion/tiny.py")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--variant", action="append", required=True, help="NAME=key=value key=value")
  parser.add_argument("--parallel", type=int, default=1)
  parser.add_argument("--eval_examples", type=int, default=100)
  args = parser.parse_args()
  pending = [parse_variant(v) for v in args.variant]
  running = []
  while pending or running:
    while pending and len(running) < args.parallel:
      name, overrides = pending.pop(0)
      workdir = os.path.join(args.workdir, name)
      os.makedirs(workdir, exist_ok=True)
      cmd = [sys.executable, "-m", "unimm.main", f"--config={args.config}", f"--workdir={workdir}",
             f"--config.train.final_eval_examples={args.eval_examples}", *overrides]
      log = open(os.path.join(workdir, "sweep.log"), "w")
      running.append((name, overrides, workdir, time.time(), subprocess.Popen(cmd, cwd=REPO, stdout=log,
                                                                             stderr=subprocess.STDOUT), log))
    time.sleep(2)
    for item in list(running):
      name, overrides, workdir, start, proc, log = item
      if proc.poll() is None:
        continue
      running.remove(item)
      log.close()
      row = {"name": name, "overrides": overrides, "returncode": proc.returncode,
             "seconds": round(time.time() - start, 1)}
      for key, file in (("final", "final_metrics.json"), ("eval", "eval.json")):
        path = os.path.join(workdir, file)
        if os.path.exists(path):
          with open(path) as f:
            row[key] = flatten(json.load(f))
      if proc.returncode:
        with open(os.path.join(workdir, "sweep.log")) as f:
          row["log_tail"] = f.read()[-2000:]
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
