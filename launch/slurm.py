"""A SLURM GPU cluster: an sbatch script whose `srun` starts the same unimm command in every task.

    python launch/slurm.py --nodes=8 --gpus_per_node=8 [--per=gpu|node] [--partition=P] [--time=48:00:00] \\
        [--dry-run] -- --config=configs/transfusion/7b.py --workdir=/shared/runs/tf7b

One process per GPU (default: `--ntasks-per-node=G`, JAX gives each task the GPU of its SLURM_LOCALID)
or per node (one task sees all G GPUs through JAX_LOCAL_DEVICE_IDS). JAX reads the coordinator
(first node of the job), process count and id from SLURM's environment (`--distributed=auto`
detects the job). `srun --kill-on-bad-exit=1` stops every task when one fails; `--signal=TERM@120`
sends SIGTERM two minutes before the time limit, so the run saves the agreed step and `--requeue`
brings it back to resume. The workdir must be on storage every node mounts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

import _common

# XLA flags MaxText sets on GPU clusters (latency-hiding scheduler; collectives overlapped with compute).
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false "
                 "--xla_gpu_enable_highest_priority_async_stream=true "
                 "--xla_gpu_all_reduce_combine_threshold_bytes=134217728 "
                 "--xla_gpu_all_gather_combine_threshold_bytes=134217728 "
                 "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864")


def tasks_per_node(args) -> int:
  return args.gpus_per_node if args.per == "gpu" else 1


def script(args, unimm: list[str], workdir: str) -> str:
  lines = ["#!/bin/bash", f"#SBATCH --job-name={args.job_name}", f"#SBATCH --nodes={args.nodes}",
           f"#SBATCH --ntasks-per-node={tasks_per_node(args)}", f"#SBATCH --gpus-per-node={args.gpus_per_node}",
           f"#SBATCH --cpus-per-task={args.cpus_per_node // tasks_per_node(args)}", f"#SBATCH --time={args.time}",
           f"#SBATCH --output={workdir}/logs/slurm-%j.out", "#SBATCH --signal=TERM@120", "#SBATCH --requeue",
           "#SBATCH --exclusive"]
  lines += [f"#SBATCH --partition={args.partition}"] if args.partition else []
  lines += [f"#SBATCH --account={args.account}"] if args.account else []
  lines += ["", "set -euo pipefail", f"cd {shlex.quote(os.path.abspath(args.checkout))}",
            f"export XLA_FLAGS={shlex.quote(GPU_XLA_FLAGS)}", "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"]
  if args.per == "node":
    lines.append(f"export JAX_LOCAL_DEVICE_IDS={','.join(str(i) for i in range(args.gpus_per_node))}")
  lines.append("srun --kill-on-bad-exit=1 " + _common.python_command(unimm))
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nodes", type=int, required=True)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--cpus_per_node", type=int, default=96)
  parser.add_argument("--per", choices=["gpu", "node"], default="gpu", help="one process per GPU or per node")
  parser.add_argument("--partition", default="")
  parser.add_argument("--account", default="")
  parser.add_argument("--time", default="48:00:00")
  parser.add_argument("--job_name", default="unimm")
  parser.add_argument("--checkout", default=_common.REPO, help="this repository, on shared storage")
  parser.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command")
  args, rest = parser.parse_known_args(argv)
  unimm = _common.unimm_args(rest)
  workdir = _common.require_shared_workdir(unimm, f"a {args.nodes}-node job")
  text = script(args, unimm, workdir)
  path = os.path.join(workdir, "launch", "sbatch.sh")
  print(f"# {args.nodes} nodes × {tasks_per_node(args)} tasks = {args.nodes * tasks_per_node(args)} processes, "
        f"{args.nodes * args.gpus_per_node} GPUs; script {path}:")
  print(text)
  if args.dry_run:
    print(f"sbatch {path}")
    return 0
  os.makedirs(os.path.dirname(path), exist_ok=True)
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return subprocess.call(["sbatch", path])


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
