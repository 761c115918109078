"""The trainer end to end (subprocesses, like a user): resume after a kill or SIGTERM, NaN guard, samples."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, SHAPES_VAE_OVERRIDES
from test_console import LOG_LINE
from unimm import console
from unimm.train import config_record

pytestmark = pytest.mark.slow


def command(data_dir, workdir, *overrides):
  return [sys.executable, "-m", "unimm.main", "--config=configs/transfusion/tiny.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--config.data.sources.shapes.builder_config=small",
          "--config.model.backbone.num_layers=1", "--config.model.backbone.dim=32",
          "--config.model.backbone.num_heads=2", "--config.model.backbone.mlp_hidden=64",
          "--config.data.batch_size=4", "--config.train.num_steps=12", "--config.train.checkpoint_every=4",
          "--config.train.log_every=1", "--config.train.sample_every=0", "--config.train.warmup_steps=2",
          "--config.train.final_eval_examples=0", *overrides]


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: (r["loss"], r["lm_loss"], r["diffusion_loss"]) for r in rows if "loss" in r}


def run(cmd, timeout=300):
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  return out


def wait_for_step(workdir, step, proc, timeout=240, checkpoint=None):
  """Waits until `step` is logged (and, if given, checkpoint step `checkpoint` is committed)."""
  path = os.path.join(workdir, "metrics.jsonl")
  committed = os.path.join(workdir, "checkpoints", str(checkpoint))  # orbax renames into place on commit
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"the run ended early: {proc.stderr.read()[-3000:]}")
    logged = os.path.exists(path) and any(json.loads(l)["step"] >= step for l in open(path) if l.strip())
    if logged and (checkpoint is None or os.path.isdir(committed)):
      return
    time.sleep(0.05)
  raise AssertionError(f"step {step} never logged (or checkpoint {checkpoint} never committed)")


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  out = run(command(data_dir, workdir, "--config.train.sample_every=12", "--config.train.sample_steps=3",
                    "--config.train.sample_prompts=3", "--config.train.eval_every=12",
                    "--config.train.eval_examples=3", "--config.train.eval_diffusion_steps=2",
                    "--config.train.final_eval_examples=3", "--config.train.final_eval_diffusion_steps=2"))
  assert out.returncode == 0, out.stderr[-4000:]
  # The run ends by evaluating its last checkpoint and printing the metrics (the README demo does).
  assert '"shapes/image_to_text/exact_match"' in out.stdout, out.stdout[-2000:]
  with open(os.path.join(workdir, "console.txt"), "w") as f:  # what a person running it saw
    f.write(out.stderr)
  return workdir


def test_uninterrupted_run_logs_learns_and_samples(uninterrupted):
  got = losses(uninterrupted)
  assert sorted(got) == list(range(1, 13))
  assert got[12][0] < got[1][0]  # the loss falls
  final = json.load(open(os.path.join(uninterrupted, "final_metrics.json")))
  assert final["step"] == 12 and final["tokens_per_s"] > 0 and final["model_flops_per_s_per_device"] > 0
  assert "skipped_records/corrupt" in final
  assert os.path.exists(os.path.join(uninterrupted, "samples", "step_0000012.png"))
  evals = [json.loads(l) for l in open(os.path.join(uninterrupted, "metrics.jsonl")) if "eval/" in l]
  assert len(evals) == 1 and evals[0]["step"] == 12
  assert 0 <= evals[0]["eval/shapes/text_to_image/accuracy"] <= 1 and evals[0]["eval/text/perplexity"] > 1
  assert os.listdir(os.path.join(uninterrupted, "tensorboard"))
  assert config_record.load_config(uninterrupted).train.num_steps == 12
  final_eval = json.load(open(os.path.join(uninterrupted, "eval.json")))
  assert final_eval["step"] == 12 and final_eval["shapes"]["examples"] == 3


def test_the_console_is_readable_and_library_info_goes_to_the_log_file(uninterrupted):
  shown = open(os.path.join(uninterrupted, "console.txt")).read()
  console_info = {f for level, f in LOG_LINE.findall(shown) if level == "I"}
  own = {f for d in console.OWN_CODE_DIRS for _, _, files in os.walk(d) for f in files}
  assert console_info and console_info <= own, shown[-4000:]  # e.g. no orbax checkpoint_manager.py
  assert "Mesh {" in shown and "train:" in shown  # unimm's own INFO, the progress bar
  with open(os.path.join(uninterrupted, "logs", "unimm.log")) as f:
    logged = f.read()
  assert ("I", "checkpoint_manager.py") in set(LOG_LINE.findall(logged)), logged[-3000:]  # routed, not lost
  assert "Mesh {" in logged


def test_kill_and_resume_gives_the_same_losses(data_dir, tmp_path, uninterrupted):
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(command(data_dir, workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  wait_for_step(workdir, 6, proc, checkpoint=4)  # async saves can lag a few steps under load
  proc.kill()  # SIGKILL: no chance to save
  proc.wait()
  assert losses(workdir).keys() >= set(range(1, 7))
  out = run(command(data_dir, workdir))
  assert out.returncode == 0, out.stderr[-4000:]
  assert "Resumed from step" in out.stderr
  assert losses(workdir) == losses(uninterrupted)


def test_sigterm_saves_and_resumes(data_dir, tmp_path, uninterrupted):
  """After SIGTERM the run saves and exits, within 30 s and doing nothing else (its final evaluation would
  overwrite eval.json from a mid-run checkpoint); the resume continues the uninterrupted run's losses."""
  workdir = str(tmp_path / "preempted")
  proc = subprocess.Popen(command(data_dir, workdir, "--config.train.final_eval_examples=3",
                                  "--config.train.async_checkpoints=True"),
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for_step(workdir, 5, proc)
  signalled = time.perf_counter()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert time.perf_counter() - signalled < 30 and not os.path.exists(os.path.join(workdir, "eval.json"))
  steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  preempted_at = max(steps)
  assert 5 <= preempted_at < 12 and "SIGTERM" in err
  out = run(command(data_dir, workdir))
  assert out.returncode == 0, out.stderr[-4000:]
  assert f"Resumed from step {preempted_at}" in out.stderr
  assert losses(workdir) == losses(uninterrupted)


def test_non_finite_loss_stops_with_the_step(data_dir, tmp_path):
  """A real divergence (the step's own guard): the run stops naming the step and leaves diverged.json;
  skipping stops too once the skips run past train.max_consecutive_skips, each one counted."""
  out = run(command(data_dir, str(tmp_path / "nan"), "--config.train.learning_rate=1e38",
                    "--config.train.grad_clip=0", "--config.train.warmup_steps=1"))
  assert out.returncode != 0
  assert "non-finite loss or gradient at step" in out.stderr
  assert os.path.exists(tmp_path / "nan" / "diverged.json")
  out = run(command(data_dir, str(tmp_path / "skip"), "--config.train.learning_rate=1e38",
                    "--config.train.grad_clip=0", "--config.train.warmup_steps=1",
                    "--config.train.skip_nonfinite=True", "--config.train.max_consecutive_skips=3"))
  assert out.returncode != 0 and "4 consecutive updates skipped" in out.stderr, out.stderr[-3000:]
  logged = [json.loads(l) for l in open(tmp_path / "skip" / "metrics.jsonl")]
  assert logged[-1]["skipped_updates_total"] == sum(r["skipped_updates"] for r in logged) >= 3


@pytest.mark.xdist_group("shapes_vae")
def test_vae_trains_and_transfusion_uses_it_frozen(data_dir, shapes_vae, tmp_path):
  rec = [r["reconstruction_loss"] for r in map(json.loads, open(os.path.join(shapes_vae, "metrics.jsonl")))]
  assert rec[-1] < rec[0]
  workdir = str(tmp_path / "latent_transfusion")
  cmd = [c.replace("tiny.py", "tiny.py:shapes_vae") for c in command(data_dir, workdir)]
  out = run(cmd + [f"--config.model.autoencoder.checkpoint={shapes_vae}/checkpoints", *SHAPES_VAE_OVERRIDES,
                   "--config.train.num_steps=4",
                   "--config.train.sample_every=4", "--config.train.sample_steps=2", "--config.train.sample_prompts=2"])
  assert out.returncode == 0, out.stderr[-4000:]
  assert sorted(losses(workdir)) == [1, 2, 3, 4]
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000004.png"))
