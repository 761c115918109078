"""The trainer end to end (subprocesses, like a user): resume after a kill or SIGTERM, NaN guard, samples."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, SHAPES_VAE_OVERRIDES

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
  assert json.load(open(os.path.join(uninterrupted, "config.json")))["train"]["num_steps"] == 12
  final_eval = json.load(open(os.path.join(uninterrupted, "eval.json")))
  assert final_eval["step"] == 12 and final_eval["shapes"]["examples"] == 3


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
  workdir = str(tmp_path / "preempted")
  proc = subprocess.Popen(command(data_dir, workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  wait_for_step(workdir, 5, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  preempted_at = max(steps)
  assert 5 <= preempted_at < 12 and "SIGTERM" in err
  out = run(command(data_dir, workdir))
  assert out.returncode == 0, out.stderr[-4000:]
  assert f"Resumed from step {preempted_at}" in out.stderr
  assert losses(workdir) == losses(uninterrupted)


def test_a_checkpoint_never_committed_is_set_aside(data_dir, tmp_path, uninterrupted):
  """A job that died while writing step 12 (no commit marker) and one that died in orbax's temporary
  directory: the restart moves both aside and resumes from step 8, the last complete one."""
  workdir = str(tmp_path / "died_saving")
  shutil.copytree(uninterrupted, workdir)
  root = os.path.join(workdir, "checkpoints")
  os.remove(os.path.join(root, "12", "commit_success.txt"))
  os.makedirs(os.path.join(root, "16.orbax-checkpoint-tmp-1700000000", "state"))
  from unimm.train import checkpoint  # pylint: disable=g-import-not-at-top
  assert checkpoint.Checkpointer(root, async_save=False).latest_step() == 8  # readers skip it too
  out = run(command(data_dir, workdir))
  assert out.returncode == 0, out.stderr[-4000:]
  assert "Resumed from step 8." in out.stderr and "was never committed" in out.stderr
  assert sorted(n.split("-")[0] for n in os.listdir(os.path.join(root, "incomplete"))) == [
      "12", "16.orbax"]
  assert os.path.exists(os.path.join(root, "12", "commit_success.txt"))  # saved again, complete
  assert losses(workdir) == losses(uninterrupted)


def test_non_finite_loss_stops_with_the_step(data_dir, tmp_path):
  out = run(command(data_dir, str(tmp_path / "nan"), "--config.train.learning_rate=1e38",
                    "--config.train.grad_clip=0", "--config.train.warmup_steps=1"))
  assert out.returncode != 0
  assert "non-finite loss or gradient at step" in out.stderr
  out = run(command(data_dir, str(tmp_path / "skip"), "--config.train.learning_rate=1e38",
                    "--config.train.grad_clip=0", "--config.train.warmup_steps=1",
                    "--config.train.skip_nonfinite=True"))
  assert out.returncode == 0, out.stderr[-3000:]
  final = json.load(open(tmp_path / "skip" / "final_metrics.json"))
  assert final["skipped_updates"] == 1.0


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
