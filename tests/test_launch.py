"""The launchers' dry runs (the commands each host would run) and a two-member sweep run for real."""

import csv
import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

RUN = ["--", "--config=configs/transfusion/7b.py", "--workdir=/gcs/bucket/tf7b", "--config.train.num_steps=10"]


def launch(script, *args, check=True):
  out = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_local_launcher_starts_one_process_per_index_on_one_coordinator():
  out = launch("local.py", "--processes=3", "--devices_per_process=4", "--port=12345", "--dry-run",
               "--", "--config=configs/transfusion/tiny.py", "--workdir=/tmp/x")
  lines = [shlex.split(l) for l in out.stdout.splitlines()]
  assert len(lines) == 3
  for i, argv in enumerate(lines):
    flags = next(a for a in argv if a.startswith("XLA_FLAGS="))
    assert "--xla_force_host_platform_device_count=4" in flags.split("=", 1)[1].split() and "JAX_PLATFORMS=cpu" in argv
    assert argv[argv.index("-m") + 1] == "unimm.main"
    assert {"--config=configs/transfusion/tiny.py", "--workdir=/tmp/x", "--coordinator_address=127.0.0.1:12345",
            "--num_processes=3", f"--process_id={i}"} <= set(argv)


def test_tpu_pod_runs_the_same_command_on_every_worker():
  out = launch("tpu_pod.py", "--tpu=pod", "--zone=us-east5-a", "--project=p", "--accelerator=v5p-256",
               "--create", "--setup", "--bucket=bucket", "--dry-run", *RUN)
  lines = out.stdout.splitlines()
  assert lines[0].startswith("# v5p-256: 128 chips on 32 hosts")
  create, run = shlex.split(lines[1]), shlex.split(lines[-1])
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "v5p-256" in create
  assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in run
  remote = shlex.split(next(a for a in run if a.startswith("--command=")).split("=", 1)[1])
  assert remote[remote.index("unimm.main") + 1:][:4] == [
      "--distributed=on", "--config=configs/transfusion/7b.py", "--workdir=/gcs/bucket/tf7b",
      "--config.train.num_steps=10"]
  # Setup reaches every worker too: the checkout is copied to all and installed with jax[tpu], the bucket
  # the workdir lives in is mounted on all.
  assert sum("--worker=all" in l for l in lines) == 4 and "jax[tpu]" in out.stdout
  assert "gcsfuse --implicit-dirs bucket /gcs/bucket" in lines[-2]
  for accelerator, hosts in (("v4-128", 16), ("v5litepod-256", 64), ("v6e-8", 1)):
    first = launch("tpu_pod.py", "--tpu=t", "--zone=z", "--project=p", f"--accelerator={accelerator}",
                   "--dry-run", *RUN).stdout.splitlines()[0]
    assert f" on {hosts} hosts" in first, first


def test_launchers_refuse_a_workdir_other_hosts_cannot_see():
  out = launch("slurm.py", "--nodes=2", "--dry-run", "--", "--config=c.py", "--workdir=gs://b/run", check=False)
  assert out.returncode != 0 and "--workdir=/gcs/b/run" in out.stderr, out.stderr
  for script, args in (("tpu_pod.py", ["--tpu=t", "--zone=z", "--project=p", "--accelerator=v5p-16"]),
                       ("slurm.py", ["--nodes=2"]),
                       ("xpk.py", ["--cluster=c", "--workload=w", "--device=v5p-16", "--docker_image=i"])):
    out = launch(script, *args, "--dry-run", "--", "--config=c.py", "--workdir=/tmp/run", check=False)
    assert out.returncode != 0 and "not shared storage" in out.stderr, (script, out.stderr)


def test_xpk_workload_spans_the_slices():
  out = launch("xpk.py", "--cluster=c", "--workload=tf7b", "--device=v5p-256", "--num_slices=2",
               "--docker_image=gcr.io/p/unimm", "--dry-run", *RUN)
  header, command = out.stdout.splitlines()
  assert "64 hosts" in header
  argv = shlex.split(command)
  assert argv[:3] == ["xpk", "workload", "create"]
  assert argv[argv.index("--num-slices") + 1] == "2" and argv[argv.index("--tpu-type") + 1] == "v5p-256"
  assert "--config=configs/transfusion/7b.py" in shlex.split(argv[argv.index("--command") + 1])


@pytest.mark.parametrize("per,tasks", [("gpu", 8), ("node", 1)])
def test_slurm_script_has_one_task_per_gpu_or_node(per, tasks):
  out = launch("slurm.py", "--nodes=8", "--gpus_per_node=8", f"--per={per}", "--partition=a3", "--dry-run",
               "--", "--config=configs/transfusion/7b.py", "--workdir=/shared/runs/tf7b")
  text = out.stdout
  assert f"8 nodes × {tasks} tasks = {8 * tasks} processes, 64 GPUs" in text
  assert "#SBATCH --nodes=8\n" in text and f"#SBATCH --ntasks-per-node={tasks}\n" in text
  assert "#SBATCH --gpus-per-node=8\n" in text and "#SBATCH --signal=TERM@120" in text
  srun = shlex.split(next(l for l in text.splitlines() if l.startswith("srun")))
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
  assert srun[srun.index("unimm.main") + 1:] == ["--config=configs/transfusion/7b.py", "--workdir=/shared/runs/tf7b"]
  assert ("JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in text) == (per == "node")
  assert text.rstrip().endswith("sbatch /shared/runs/tf7b/launch/sbatch.sh")


def test_sweep_submits_each_member_through_a_launcher():
  out = launch("sweep.py", "--config=configs/transfusion/tiny.py", "--sweep=lr", "--workdir=/shared/sweep",
               "--launcher=slurm", "--launcher_args=--nodes=2", "--dry-run", "--", "--config.train.num_steps=5")
  sruns = [l for l in out.stdout.splitlines() if l.startswith("srun")]
  assert len(sruns) == 3
  for lr, line in zip(("0.001", "0.003", "0.01"), sruns):
    argv = shlex.split(line)
    assert f"--workdir=/shared/sweep/learning_rate={lr}" in argv and f"--config.train.learning_rate={lr}" in argv
    assert argv[-1] == "--config.train.num_steps=5"


@pytest.mark.slow
def test_two_member_sweep_runs_and_gathers_one_table(data_dir, tmp_path):
  workdir = str(tmp_path / "sweep")
  small = ["--", f"--config.data.data_dir={data_dir}", "--config.data.sources.shapes.builder_config=small",
           "--config.model.backbone.num_layers=1", "--config.model.backbone.dim=32",
           "--config.model.backbone.num_heads=2", "--config.model.backbone.mlp_hidden=64",
           "--config.data.batch_size=4", "--config.train.num_steps=3", "--config.train.sample_every=0",
           "--config.train.final_eval_examples=1", "--config.train.final_eval_diffusion_steps=2"]
  out = launch("sweep.py", "--config=configs/transfusion/tiny.py", "--sweep=prediction", f"--workdir={workdir}",
               *small)
  rows = list(csv.DictReader(open(os.path.join(workdir, "sweep.csv"))))
  assert [r["member"] for r in rows] == ["objective=ddpm,prediction=epsilon", "objective=ddpm,prediction=v"]
  assert [r["model.prediction"] for r in rows] == ["epsilon", "v"]
  for r in rows:
    assert r["step"] == "3" and float(r["loss"]) > 0
    assert 0 <= float(r["eval/shapes/text_to_image/accuracy"]) <= 1 and float(r["eval/text/perplexity"]) > 1
  # The two members differ in what they trained (ε vs v targets give different diffusion losses).
  assert rows[0]["diffusion_loss"] != rows[1]["diffusion_loss"]
  table = open(os.path.join(workdir, "sweep.md")).read()
  assert table.startswith("| member | model.objective | model.prediction |")
  assert "| objective=ddpm,prediction=v | ddpm | v |" in table
  assert table in out.stdout
  # A rerun skips the finished members and gathers the same table.
  again = launch("sweep.py", "--config=configs/transfusion/tiny.py", "--sweep=prediction", f"--workdir={workdir}",
                 *small)
  assert again.stdout.count("finished before; skipped") == 2
  assert open(os.path.join(workdir, "sweep.md")).read() == table


def test_clusters_are_detected_from_their_environment():
  from unimm.parallel import distributed  # pylint: disable=g-import-not-at-top
  assert distributed.detected_cluster({}) is None
  step = {"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "3"}
  assert distributed.detected_cluster(step) == "SLURM"
  # An sbatch script's shell (no srun step) or a one-task step is one process, not a cluster member.
  assert distributed.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) is None
  assert distributed.detected_cluster({**step, "SLURM_STEP_NUM_TASKS": "1"}) is None
  assert distributed.detected_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == "Open MPI"
  assert distributed.detected_cluster({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}) == "JAX_COORDINATOR_ADDRESS"
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize("127.0.0.1:1234", None, 0)
  with pytest.raises(ValueError, match="must be in"):
    distributed.initialize("127.0.0.1:1234", 2, 2)
  assert distributed.initialize("127.0.0.1:1234", 1, 0) is False  # one process: nothing to join
  assert distributed.initialize(mode="off") is False
