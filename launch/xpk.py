"""A GKE cluster through XPK: one workload whose pods (one per host) run the same unimm command.

    python launch/xpk.py --cluster=my-cluster --workload=tf7b --device=v5p-256 --num_slices=2 \\
        --docker_image=gcr.io/P/unimm:latest [--dry-run] -- --config=configs/transfusion/7b.py \\
        --workdir=/gcs/BUCKET/run

XPK (github.com/AI-Hypercomputer/xpk) schedules the pods of every slice and sets the environment JAX
reads (`--distributed=on`: one process per host across all slices; the data axis spans slices).
The image must hold this checkout installed (`pip install -e .` and jax for the device), and the
cluster must mount the bucket at /gcs/BUCKET in the pods (GKE's Cloud Storage FUSE CSI driver). GPU
node pools take `--device=h100-80gb-8` (8 GPUs per node, one process per node).
"""

from __future__ import annotations

import argparse
import shlex
import sys

import _common
import tpu_pod


def hosts(device: str, num_slices: int, nodes: int) -> int:
  if device.startswith(("v4-", "v5p-", "v5litepod-", "v6e-")):
    return tpu_pod.slice_hosts(device)[1] * num_slices
  return nodes * num_slices


def command(args, unimm: list[str]) -> str:
  kind = ["--tpu-type", args.device] if args.device.startswith("v") else ["--device-type", args.device,
                                                                          "--num-nodes", str(args.num_nodes)]
  return shlex.join(["xpk", "workload", "create", "--cluster", args.cluster, "--workload", args.workload, *kind,
                     "--num-slices", str(args.num_slices), "--docker-image", args.docker_image,
                     "--command", _common.python_command(["--distributed=on", *unimm])]
                    + (["--project", args.project] if args.project else [])
                    + (["--zone", args.zone] if args.zone else []))


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cluster", required=True)
  parser.add_argument("--workload", required=True)
  parser.add_argument("--device", required=True, help="v5p-256 | v6e-256 | … | h100-80gb-8")
  parser.add_argument("--num_slices", type=int, default=1)
  parser.add_argument("--num_nodes", type=int, default=1, help="GPU nodes per slice")
  parser.add_argument("--docker_image", required=True)
  parser.add_argument("--project", default="")
  parser.add_argument("--zone", default="")
  parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
  args, rest = parser.parse_known_args(argv)
  unimm = _common.unimm_args(rest)
  _common.require_shared_workdir(unimm, f"workload {args.workload}")
  print(f"# {args.device} × {args.num_slices} slices: {hosts(args.device, args.num_slices, args.num_nodes)} hosts, "
        "one process each, the same command")
  return _common.run_commands([command(args, unimm)], args.dry_run)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
