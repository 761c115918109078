"""A Cloud TPU pod slice: the same unimm command on every host, over `gcloud … tpu-vm ssh --worker=all`.

    python launch/tpu_pod.py --tpu=my-v5p --zone=us-east5-a --project=P --accelerator=v5p-256 \\
        [--create] [--setup] [--bucket=BUCKET] [--dry-run] -- --config=configs/transfusion/7b.py \
        --workdir=/gcs/BUCKET/run

--create makes the slice (queued, spot with --spot); --setup copies this checkout (`git archive HEAD`)
to every worker and installs it with jax[tpu]; --bucket mounts gs://BUCKET at /gcs/BUCKET on every
worker (gcsfuse, which the TPU VM image must have); then every worker runs `python3 -m unimm.main
--distributed=on …` (JAX reads the slice's topology from the TPU metadata: one process per host,
process 0 coordinates). The workdir must be shared (the mounted bucket): every host writes its
checkpoint shards there.
A preempted spot slice sends SIGTERM: the run saves the agreed step and exits; rerun this command
(without --create) to resume.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys

import _common

RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
           "v6e": "v2-alpha-tpuv6e"}


def slice_hosts(accelerator: str) -> tuple[int, int]:
  """(chips, hosts) of an accelerator type. v4/v5p names count TensorCores (2 per chip); v5e/v6e count
  chips. Multi-host slices have 4 chips per host."""
  match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", accelerator)
  if not match:
    raise SystemExit(f"--accelerator={accelerator}: expected v4-N, v5p-N, v5litepod-N or v6e-N")
  kind, n = match.group(1), int(match.group(2))
  chips = n // 2 if kind in ("v4", "v5p") else n
  if kind in ("v5litepod", "v6e") and chips <= 8:
    return chips, 1  # single-host slices hold up to 8 chips
  return chips, max(1, chips // 4)


def commands(args, unimm: list[str]) -> list[str]:
  kind = args.accelerator.split("-")[0]
  where = ["--zone", args.zone, "--project", args.project]
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  out = []
  if args.create:
    out.append(shlex.join(gcloud + ["create", args.tpu, *where, "--accelerator-type", args.accelerator,
                                    "--version", args.runtime or RUNTIME[kind]] + (["--spot"] if args.spot else [])))
  if args.setup:
    out.append(f"git -C {shlex.quote(args.checkout)} archive --format=tar.gz -o /tmp/unimm.tar.gz HEAD")
    out.append(shlex.join(gcloud + ["scp", "/tmp/unimm.tar.gz", f"{args.tpu}:~/unimm.tar.gz", *where,
                                    "--worker=all"]))
    install = ("rm -rf ~/unimm && mkdir -p ~/unimm && tar xzf ~/unimm.tar.gz -C ~/unimm && "
               "python3 -m pip install -q -e ~/unimm 'jax[tpu]'")
    out.append(shlex.join(gcloud + ["ssh", args.tpu, *where, "--worker=all", f"--command={install}"]))
  if args.bucket:
    mount = f"sudo mkdir -p /gcs/{args.bucket} && sudo chmod 777 /gcs/{args.bucket} && " \
            f"(mountpoint -q /gcs/{args.bucket} || gcsfuse --implicit-dirs {args.bucket} /gcs/{args.bucket})"
    out.append(shlex.join(gcloud + ["ssh", args.tpu, *where, "--worker=all", f"--command={mount}"]))
  run = f"cd ~/unimm && {_common.python_command(['--distributed=on', *unimm])} 2>&1 | tee -a ~/unimm.log"
  out.append(shlex.join(gcloud + ["ssh", args.tpu, *where, "--worker=all", f"--command={run}"]))
  return out


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tpu", required=True, help="the TPU VM (slice) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", required=True)
  parser.add_argument("--accelerator", required=True, help="e.g. v5p-256, v4-128, v5litepod-256, v6e-256")
  parser.add_argument("--runtime", default="", help="TPU software version (default by generation)")
  parser.add_argument("--create", action="store_true")
  parser.add_argument("--spot", action="store_true")
  parser.add_argument("--setup", action="store_true", help="copy this checkout to every worker and install it")
  parser.add_argument("--checkout", default=_common.REPO, help="the git checkout --setup copies")
  parser.add_argument("--bucket", default="", help="mount gs://BUCKET at /gcs/BUCKET on every worker")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args, rest = parser.parse_known_args(argv)
  unimm = _common.unimm_args(rest)
  _common.require_shared_workdir(unimm, f"TPU slice {args.tpu}")
  chips, hosts = slice_hosts(args.accelerator)
  print(f"# {args.accelerator}: {chips} chips on {hosts} hosts; the same command runs on all {hosts} workers "
        f"(one process each)")
  return _common.run_commands(commands(args, unimm), args.dry_run)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
