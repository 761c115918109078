"""Compiles the paper-size train steps for a TPU v5p-256 slice and 64 H100s; prints docs/scaling.md's table.

    python bench/compile_table.py --out=/tmp/compile [--only=transfusion_7b] [--table_only]

Each row is one `python -m unimm.main --mode=compile` (printed before it runs; its JSON lands in
OUT/NAME/compile.json). v5p-256 compiles with libtpu's TPU compiler (pip install libtpu; no TPU
needed); h100:64 with XLA:CPU on 64 fake devices (a proxy: see unimm/train/compile.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

# name → (config, targets). Each row is the bare command (config and topology only): the configs' defaults
# (FSDP over every device; remat and accumulation per target, see unimm/parallel/targets.py) must fit.
ROWS = {
    "transfusion_1.4b": ("configs/transfusion/1_4b.py", {"v5p-256": [], "h100:64": []}),
    "transfusion_7b": ("configs/transfusion/7b.py", {"v5p-256": [], "h100:64": []}),
    "transfusion_7b_mot": ("configs/transfusion/7b.py:mot", {"v5p-256": []}),  # every part untied by modality
    "chameleon_7b": ("configs/chameleon/7b.py", {"v5p-256": [], "h100:64": []}),
    # Stage II: the largest batch (512 rows), the ViT frozen.
    "janus_pro_7b_stage2": ("configs/janus/pro_7b.py:stage2", {"v5p-256": [], "h100:64": []}),
}


def command(config: str, topology: str, overrides: list[str], workdir: str) -> list[str]:
  return [sys.executable, "-m", "unimm.main", "--mode=compile", f"--config={config}", f"--topology={topology}",
          f"--workdir={workdir}", *overrides]


def table(out: str) -> str:
  lines = ["| model | target | compiler | mesh (data×fsdp×tensor×seq) | rows/device × seq | remat | attention | "
           "params | args | temps | total | device | fits | step at 50% MFU |", "|" + "---|" * 14]
  # (rows per device are per step; with accumulation, each microbatch holds rows / grad_accum_steps)
  for name, (config, targets) in ROWS.items():
    for topology in targets:
      path = os.path.join(out, f"{name}_{topology.replace(':', '_')}", "compile.json")
      if not os.path.exists(path):
        continue
      r = json.load(open(path))
      m, mem = r["mesh"], r["memory_per_device_gib"]
      mesh = "×".join(str(m[a]) for a in ("data", "fsdp", "tensor", "sequence"))
      accum = r["config"].get("grad_accum_steps", 1)
      rows = f"{r['rows_per_device']:g}" + (f" ({accum} × {r['rows_per_device'] / accum:g})" if accum > 1 else "")
      lines.append(
          f"| {name} | {topology} | {r['compiler']} | {mesh} | {rows} × {r['global_batch']['seq_len']}"
          f" | {r['config']['remat']} | {r['config'].get('attention_kernel', 'xla')} | {r['config']['params'] / 1e9:.2f}B"
          f" | {mem['arguments']:.1f} GiB | "
          f"{mem['temporaries']:.1f} GiB | {mem['total']:.1f} GiB | {r['device_memory_gib']:.0f} GiB | "
          f"{'yes' if r['fits'] else 'NO'} | {r['step_seconds_at_50pct_mfu']:.2f} s |")
  return "\n".join(lines) + "\n"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--only", default="", help="comma-separated row names (default: all)")
  parser.add_argument("--targets", default="v5p-256,h100:64")
  parser.add_argument("--table_only", action="store_true")
  args = parser.parse_args()
  failed = []
  if not args.table_only:
    for name, (config, targets) in ROWS.items():
      if args.only and name not in args.only.split(","):
        continue
      for topology, overrides in targets.items():
        if topology not in args.targets.split(","):
          continue
        workdir = os.path.join(args.out, f"{name}_{topology.replace(':', '_')}")
        cmd = command(config, topology, overrides, workdir)
        print("$ " + shlex.join(cmd[1:]).replace(sys.executable, "python"), flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
          failed.append(name + " " + topology)
          print(result.stderr[-2000:], flush=True)
  print(table(args.out))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
