"""Ablation sweeps: a config file names its sweep; this expands it, runs every member, gathers one table.

    python launch/sweep.py --config=configs/transfusion/tiny.py --sweep=lr --workdir=/tmp/sweep [--dry-run]
    python launch/sweep.py … --launcher=slurm --launcher_args="--nodes=8" -- --config.train.num_steps=20000
    python launch/sweep.py … --gather   # only collect the table

The config file defines `get_sweep(name)` (big_vision's way of keeping a sweep beside its config): a
list of override dicts, one per member, keys as in `--config.KEY=VALUE`; `--sweep=NAME` picks one.
Member NAME (its overrides, `key=value,…`) trains in WORKDIR/NAME with `python -m unimm.main
--config=FILE:ARG --config.KEY=VALUE…` plus the arguments after `--` (shared by all members).
`--launcher=local` (default) runs the members here, one after another, skipping those that finished
(final_metrics.json) — rerun to resume a sweep; `slurm`, `tpu_pod`, `xpk` or `local_multiprocess`
submit each member through that launcher instead.
Then every member's final_metrics.json and eval.json go into WORKDIR/sweep.md and sweep.csv.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shlex
import subprocess
import sys

import _common

LAUNCHERS = {"slurm": "slurm.py", "tpu_pod": "tpu_pod.py", "xpk": "xpk.py", "local_multiprocess": "local.py"}
# Columns from final_metrics.json, then every number in eval.json (flattened with "/").
TRAIN_COLUMNS = ("step", "loss", "lm_loss", "diffusion_loss", "image_loss", "text_loss", "tokens_per_s")


def load_sweep(config: str, sweep: str | None) -> list[dict]:
  path = config.partition(":")[0]
  for root in (_common.REPO, os.getcwd()):  # config files import `configs.common`, as the CLI does
    if root not in sys.path:
      sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SystemExit(f"{path} defines no get_sweep(name): add one returning a list of override dicts")
  members = module.get_sweep(sweep)
  if not members or not all(isinstance(m, dict) for m in members):
    raise SystemExit(f"{path}:get_sweep({sweep!r}) must return a non-empty list of override dicts, got {members!r}")
  return members


def format_value(value) -> str:
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def member_name(overrides: dict) -> str:
  return ",".join(f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in overrides.items()) or "base"


def member_args(config: str, workdir: str, overrides: dict, shared: list[str]) -> list[str]:
  return [f"--config={config}", f"--workdir={workdir}",
          *[f"--config.{k}={format_value(v)}" for k, v in overrides.items()], *shared]


def gather(workdir: str, names: list[str], overrides: list[dict]) -> tuple[list[str], list[dict]]:
  """(columns, one row per member): its overrides, final training metrics and eval metrics."""
  from unimm.eval.evaluate import flatten  # pylint: disable=g-import-not-at-top
  keys = sorted({k for o in overrides for k in o})
  rows, eval_columns = [], []
  for name, member in zip(names, overrides):
    row = {"member": name, **{k: format_value(member.get(k, "")) for k in keys}}
    final = os.path.join(workdir, name, "final_metrics.json")
    if os.path.exists(final):
      metrics = json.load(open(final))
      row.update({k: metrics[k] for k in TRAIN_COLUMNS if k in metrics})
    else:
      row["status"] = "not finished"
    evaluation = os.path.join(workdir, name, "eval.json")
    if os.path.exists(evaluation):
      flat = {f"eval/{k}": v for k, v in flatten(json.load(open(evaluation))).items() if k != "step"}
      eval_columns += [k for k in flat if k not in eval_columns]
      row.update(flat)
    rows.append(row)
  train = [k for k in TRAIN_COLUMNS if any(k in r for r in rows)]
  status = ["status"] if any("status" in r for r in rows) else []
  return ["member", *keys, *status, *train, *eval_columns], rows


def cell(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def write_tables(workdir: str, columns: list[str], rows: list[dict]) -> tuple[str, str]:
  md = os.path.join(workdir, "sweep.md")
  with open(md, "w") as f:
    f.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    for r in rows:
      f.write("| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |\n")
  path = os.path.join(workdir, "sweep.csv")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return md, path


def member_command(args, unimm: list[str]) -> list[str]:
  if args.launcher == "local":
    return [sys.executable, "-m", "unimm.main", *unimm]
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), LAUNCHERS[args.launcher])
  return [sys.executable, script, *shlex.split(args.launcher_args), "--", *unimm]


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="FILE[:ARG], the config every member trains")
  parser.add_argument("--sweep", default=None, help="the name passed to FILE's get_sweep(name)")
  parser.add_argument("--workdir", required=True, help="members train in WORKDIR/NAME; the table lands here")
  parser.add_argument("--launcher", choices=["local", *LAUNCHERS], default="local")
  parser.add_argument("--launcher_args", default="", help="flags for the launcher (e.g. \"--nodes=8\")")
  parser.add_argument("--gather", action="store_true", help="only gather the finished members into the table")
  parser.add_argument("--dry-run", action="store_true", help="print the members' commands, run nothing")
  args, rest = parser.parse_known_args(argv)
  shared = rest[1:] if rest[:1] == ["--"] else rest
  overrides = load_sweep(args.config, args.sweep)
  names = [member_name(o) for o in overrides]
  if len(set(names)) != len(names):
    raise SystemExit(f"two sweep members have the same overrides: {names}")
  failed = []
  for name, member in zip(names, overrides):
    workdir = os.path.join(args.workdir, name)
    command = member_command(args, member_args(args.config, workdir, member, shared))
    if args.gather:
      continue
    print(f"# sweep member {name}", flush=True)
    if args.dry_run and args.launcher == "local":
      print(shlex.join(command), flush=True)
      continue
    if args.dry_run:
      command.insert(2, "--dry-run")  # the launcher prints what it would run
    if args.launcher == "local" and os.path.exists(os.path.join(workdir, "final_metrics.json")):
      print(f"# {name}: finished before; skipped", flush=True)
      continue
    if subprocess.call(command):
      failed.append(name)
  if args.dry_run:
    return 0
  os.makedirs(args.workdir, exist_ok=True)
  columns, rows = gather(args.workdir, names, overrides)
  md, csv_path = write_tables(args.workdir, columns, rows)
  print(open(md).read(), end="")
  print(f"# wrote {md} and {csv_path}" + (f"; failed: {failed}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
