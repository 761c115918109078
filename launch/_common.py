"""What the launchers share: the unimm command every host runs, shell quoting, dry runs."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unimm_args(rest: list[str]) -> list[str]:
  """The arguments after `--`: the unimm command line (--config=… --workdir=… and overrides)."""
  if rest and rest[0] == "--":
    rest = rest[1:]
  if not any(a.startswith("--config=") for a in rest):
    raise SystemExit("after `--`, give the unimm arguments: -- --config=FILE --workdir=DIR [--config.x=y ...]")
  return rest


def flag_value(args: list[str], name: str) -> str | None:
  """The value of `--name=value` in `args` (the last one wins, as absl reads it)."""
  values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
  return values[-1] if values else None


def require_shared_workdir(args: list[str], what: str) -> str:
  """The run's workdir, which every host must reach: a shared mount (NFS, Lustre, a bucket mounted with
  gcsfuse at /gcs/BUCKET), never a host's own /tmp. unimm writes the workdir through the file system,
  so a bucket URL is refused with the mount to use instead."""
  workdir = flag_value(args, "workdir")
  if not workdir:
    raise SystemExit("--workdir=DIR is required; on several hosts it must be shared storage (a shared mount)")
  if "://" in workdir:
    bucket = workdir.split("://", 1)[1]
    raise SystemExit(f"--workdir={workdir}: unimm writes its workdir through the file system; mount the bucket "
                     f"on every host (gcsfuse; tpu_pod.py --bucket does it) and pass --workdir=/gcs/{bucket}")
  if workdir.startswith("/tmp") or not workdir.startswith("/"):
    raise SystemExit(f"--workdir={workdir} is not shared storage: every host of {what} writes its checkpoint "
                     "shards there and must read the same files on restart; use a shared mount "
                     "(/gcs/BUCKET/… through gcsfuse, NFS).")
  return workdir


def python_command(args: list[str], python: str = "python3") -> str:
  return shlex.join([python, "-m", "unimm.main", *args])


def run_commands(commands: list[str], dry_run: bool) -> int:
  """Prints each command (dry run) or runs them in turn, stopping at the first failure."""
  for command in commands:
    print(command, flush=True)
    if dry_run:
      continue
    code = subprocess.call(command, shell=True)
    if code:
      print(f"failed with exit code {code}: {command}", file=sys.stderr)
      return code
  return 0
