"""Multi-host training for real on one machine: 2 processes × 2 fake CPU devices (jax.distributed over
loopback, gloo collectives) through `launch/local.py`, against 1 process × 4 devices; a killed process;
SIGTERM on one host."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

STEPS = 30


def unimm_args(data_dir, workdir):
  # data.shards=2: the global batch is the two shards' rows whether one process or two pack them.
  return ["--config=configs/transfusion/tiny.py", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          "--config.data.sources.shapes.builder_config=small", "--config.data.shards=2",
          "--config.model.backbone.num_layers=1", "--config.model.backbone.dim=32",
          "--config.model.backbone.num_heads=2", "--config.model.backbone.mlp_hidden=64",
          "--config.data.batch_size=4", f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=3",
          "--config.train.log_every=1", "--config.train.sample_every=0", "--config.train.warmup_steps=2",
          "--config.train.final_eval_examples=0"]


def launcher(data_dir, workdir):
  return [sys.executable, os.path.join(REPO, "launch", "local.py"), "--processes=2", "--devices_per_process=2",
          "--heartbeat_timeout=5", "--grace=60", "--", *unimm_args(data_dir, workdir)]


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return rows


def losses(workdir):
  return {r["step"]: (r["loss"], r["grad_norm"]) for r in metrics(workdir) if "loss" in r}


def assert_same_losses(got, want):
  assert got.keys() == want.keys()
  for step in want:
    for a, b in zip(got[step], want[step]):
      assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (step, got[step], want[step])


def log(workdir, index):
  with open(os.path.join(workdir, "logs", f"process_{index}.log"), errors="replace") as f:
    return f.read()


def start(cmd):
  """Starts the launcher; returns (process, the children's pids from its first line)."""
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  assert "pids" in line, line + proc.stderr.read()[-3000:]
  pids = json.loads(line.split("pids ", 1)[1].split("]", 1)[0] + "]")
  return proc, pids


def wait_for_step(workdir, step, proc, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"the run ended early: {proc.stderr.read()[-3000:]}")
    if os.path.exists(path) and any(r["step"] >= step for r in metrics(workdir)):
      return
    time.sleep(0.05)
  raise AssertionError(f"step {step} never logged")


def wait_for_log(workdir, index, text, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"the run ended early: {proc.stderr.read()[-3000:]}")
    if os.path.exists(os.path.join(workdir, "logs", f"process_{index}.log")) and text in log(workdir, index):
      return
    time.sleep(0.05)
  raise AssertionError(f"process {index} never logged {text!r}")


def committed_steps(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(root)
                if d.isdigit() and os.path.exists(os.path.join(root, d, "commit_success.txt")))


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
  """The reference: 1 process × 4 devices on the same global batches."""
  workdir = str(tmp_path_factory.mktemp("one_process"))
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "unimm.main", *unimm_args(data_dir, workdir)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return losses(workdir)


def test_two_processes_train_like_one_through_a_kill_and_a_preemption(data_dir, tmp_path, one_process):
  """One run, three launches of 2 processes × 2 devices: process 1 is killed (SIGKILL) → both restart and
  resume; process 0 alone gets SIGTERM → both save the same step and exit cleanly → both restart and
  finish with the losses, step for step, of an uninterrupted 1 process × 4 devices run."""
  workdir = str(tmp_path / "faults")
  proc, pids = start(launcher(data_dir, workdir))
  wait_for_step(workdir, 7, proc)
  os.kill(pids[1], signal.SIGKILL)
  killed_at = time.time()
  _, err = proc.communicate(timeout=120)
  # The survivor stopped by itself, soon (heartbeat timeout 5 s), naming the cause; nothing hung.
  assert proc.returncode != 0
  assert time.time() - killed_at < 45, time.time() - killed_at
  assert "the first failure was process 1" in err and "killing process" not in err, err[-3000:]
  assert "JAX distributed service detected fatal errors" in log(workdir, 0), log(workdir, 0)[-3000:]
  last = committed_steps(workdir)[-1]
  assert 3 <= last < STEPS

  proc, pids = start(launcher(data_dir, workdir))
  for index in (0, 1):
    wait_for_log(workdir, index, f"Resumed from step {last}.", proc)
  os.kill(pids[0], signal.SIGTERM)  # only process 0 hears it (its handler is up since jax.distributed started)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:] + log(workdir, 0)[-3000:]
  saved = []
  for index in (0, 1):
    text = log(workdir, index)
    saved.append(int(text.split("SIGTERM: saved a checkpoint at step ", 1)[1].split(";", 1)[0]))
  assert saved[0] == saved[1] and last < saved[0] < STEPS, (saved, last)
  assert committed_steps(workdir)[-1] == saved[0]

  out = subprocess.run(launcher(data_dir, workdir), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:] + log(workdir, 0)[-3000:]
  assert f"Resumed from step {saved[0]}." in log(workdir, 1)
  assert "Process 1 of 2; 2 local of 4 devices" in log(workdir, 1)
  assert_same_losses(losses(workdir), one_process)
  # Only process 0 logs: each step once.
  assert [r["step"] for r in metrics(workdir)] == list(range(1, STEPS + 1))
  # Both processes wrote their part of every checkpoint: array shards and their data iterator's state.
  last = os.path.join(workdir, "checkpoints", str(STEPS))
  assert sorted(os.listdir(os.path.join(last, "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(os.path.join(last, "state")))
