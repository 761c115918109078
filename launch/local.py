"""N processes on this machine, M fake CPU devices each: the multi-host path, run for real on one host.

    python launch/local.py --processes=2 --devices_per_process=2 -- \\
        --config=configs/transfusion/tiny.py --workdir=/tmp/run2x2

Each process is `python -m unimm.main … --coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=I` with `XLA_FLAGS=--xla_force_host_platform_device_count=M` (gloo collectives over
loopback). Logs go to WORKDIR/logs/process_I.log. When a process fails, the launcher names it and
its log, lets the others fail on their own (they abort once the coordination service misses the dead
one's heartbeats, --heartbeat_timeout seconds) and kills whatever is left after a grace period.
SIGTERM/SIGINT to the launcher go to every process (a preemption: all save the same step, then exit).
Relaunching the same command resumes from the last complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import _common



def free_port() -> int:
  try:
    import portpicker  # pylint: disable=g-import-not-at-top
    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]


def process_commands(args, unimm: list[str], port: int) -> list[tuple[dict, list[str]]]:
  """(environment additions, argv) of each process."""
  # The caller's XLA flags are kept (a dump directory, an optimisation level): the device count is added.
  xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices_per_process}"
  env = {"XLA_FLAGS": xla_flags.strip(), "JAX_PLATFORMS": "cpu"}
  out = []
  for i in range(args.processes):
    argv = [args.python, "-m", "unimm.main", *unimm, f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={args.processes}", f"--process_id={i}",
            f"--heartbeat_timeout={args.heartbeat_timeout}"]
    out.append((env, argv))
  return out


def supervise(procs: list[subprocess.Popen], logs: list[str], grace: float) -> int:
  """Waits for every process; on the first failure reports it, then reaps or kills the rest."""
  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  failed, deadline = None, None
  while any([p.poll() is None for p in procs]):  # a list: poll every process, each round
    if failed is None:
      failed = next((i for i, p in enumerate(procs) if p.returncode not in (None, 0)), None)
      if failed is not None:
        print(f"local launcher: process {failed} exited with code {procs[failed].returncode} "
              f"(log: {logs[failed]}); waiting up to {grace:.0f}s for the others to stop", file=sys.stderr,
              flush=True)
        deadline = time.time() + grace
    elif time.time() > deadline:
      for i, p in enumerate(procs):
        if p.poll() is None:
          print(f"local launcher: killing process {i}, still running {grace:.0f}s after process {failed} failed",
                file=sys.stderr, flush=True)
          p.kill()
    time.sleep(0.2)
  codes = [p.returncode for p in procs]
  if failed is None:
    failed = next((i for i, c in enumerate(codes) if c), None)
  if failed is not None:
    print(f"local launcher: exit codes {codes}; the first failure was process {failed} (log: {logs[failed]})",
          file=sys.stderr, flush=True)
    return codes[failed] if codes[failed] > 0 else 1
  return 0


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=2)
  parser.add_argument("--heartbeat_timeout", type=int, default=10,
                      help="seconds after which a silent process counts as dead (JAX's default is 100)")
  parser.add_argument("--grace", type=float, default=60.0,
                      help="seconds the others get to stop by themselves after one fails")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: pick a free one)")
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args, rest = parser.parse_known_args(argv)
  unimm = _common.unimm_args(rest)
  workdir = _common.flag_value(unimm, "workdir")
  if not workdir:
    raise SystemExit("--workdir=DIR is required")
  commands = process_commands(args, unimm, args.port or free_port())
  if args.dry_run:
    for env, command in commands:
      print(shlex.join([f"{k}={v}" for k, v in env.items()] + command))
    return 0
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  procs, logs = [], []
  for i, (env, command) in enumerate(commands):
    logs.append(os.path.join(workdir, "logs", f"process_{i}.log"))
    with open(logs[-1], "ab") as log:
      procs.append(subprocess.Popen(command, env={**os.environ, **env}, stdout=log,
                                    stderr=subprocess.STDOUT))
  print(f"local launcher: {args.processes} processes × {args.devices_per_process} devices, pids "
        f"{[p.pid for p in procs]}, logs in {os.path.join(workdir, 'logs')}", flush=True)
  return supervise(procs, logs, args.grace)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
