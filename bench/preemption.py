"""Seconds from SIGTERM to exit of a training run (the preemption path: save and exit, nothing else); prints JSON.

    python bench/preemption.py                                  # the README demo's config, shapes/small
    python bench/preemption.py --config=configs/chameleon/tiny.py --after_step=20

Starts `python -m unimm.main` on a fresh workdir, waits until `--after_step` is logged, sends SIGTERM and
times the exit (the async save of that step included). Also reports the exit status, the checkpoints on
disk and whether an `eval.json` was written (a preempted run must not evaluate).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logged_step(workdir: str) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return max((json.loads(line)["step"] for line in f if line.strip().endswith("}")), default=0)
  except OSError:
    return 0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/transfusion/tiny.py")
  parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "unimm_bench_data"))
  parser.add_argument("--builder_config", default="small", help="the embedded shapes dataset's size")
  parser.add_argument("--after_step", type=int, default=30)
  args = parser.parse_args()
  workdir = tempfile.mkdtemp(prefix="unimm_preemption_")
  cmd = [sys.executable, "-m", "unimm.main", f"--config={args.config}", f"--workdir={workdir}",
         f"--config.data.data_dir={args.data_dir}", f"--config.data.sources.shapes.builder_config={args.builder_config}",
         "--config.train.log_every=1"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  while logged_step(workdir) < args.after_step:
    if proc.poll() is not None:
      raise SystemExit(f"the run ended before step {args.after_step}: {proc.stderr.read()[-3000:]}")
    time.sleep(0.1)
  signalled = time.perf_counter()
  proc.send_signal(signal.SIGTERM)
  proc.communicate()
  seconds = time.perf_counter() - signalled
  checkpoints = os.path.join(workdir, "checkpoints")
  print(json.dumps({
      "config": args.config, "signalled_after_step": logged_step(workdir), "seconds_to_exit": round(seconds, 2),
      "returncode": proc.returncode, "checkpoints": sorted(n for n in os.listdir(checkpoints) if n.isdigit()),
      "eval_json_written": os.path.exists(os.path.join(workdir, "eval.json")), "workdir": workdir}))


if __name__ == "__main__":
  main()
