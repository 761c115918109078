"""--mode=compile: the train step compiled ahead of time for a mesh this machine does not have."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from unimm.train import compile as compile_lib


def compile_report(tmp_path, *args):
  out = subprocess.run([sys.executable, "-m", "unimm.main", "--mode=compile", f"--workdir={tmp_path}", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  report = json.load(open(os.path.join(tmp_path, "compile.json")))
  assert json.loads(out.stdout[out.stdout.index("{"):]) == report
  return report


def test_topologies_parse_to_chips_and_physical_shapes():
  assert compile_lib.parse_topology("v5p-256") == ("v5p", "v5p:4x4x8", 128)
  assert compile_lib.parse_topology("v4-128") == ("v4", "v4:4x4x4", 64)
  assert compile_lib.parse_topology("v5e-256") == ("v5e", "v5e:16x16", 256)
  assert compile_lib.parse_topology("v5p:2x2x1") == ("v5p", "v5p:2x2x1", 4)
  assert compile_lib.parse_topology("h100:64") == ("h100", "cpu", 64)
  assert compile_lib.parse_topology("2xv5p-256") == ("v5p", "v5p:4x4x8", 128)
  assert (compile_lib.slice_count("2xv5p-256"), compile_lib.slice_count("v5p-256")) == (2, 1)
  with pytest.raises(ValueError, match="use a TPU slice"):
    compile_lib.parse_topology("tpu-9000")


def test_a_step_that_does_not_fit_says_what_to_change():
  import types  # pylint: disable=g-import-not-at-top
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  config = load_config("configs/transfusion/160m.py")
  config.mesh.update(data=-1, fsdp=1)  # pure data parallelism, 16 rows a device
  mesh = types.SimpleNamespace(shape={"data": 16, "fsdp": 1, "tensor": 1, "sequence": 1})
  advice = compile_lib.advice(config, mesh)
  assert "--config.mesh.data=1 --config.mesh.fsdp=-1" in advice[0]
  assert "--config.model.backbone.remat=qkv_out_proj" in advice[1]  # the next leaner than dots_no_batch
  assert "--config.train.grad_accum_steps=2" in advice[2] and "--config.model.lm_loss_chunk" in advice[3]
  config.model.backbone.remat, config.train.grad_accum_steps, config.model.lm_loss_chunk = "full", 16, 512
  mesh.shape.update(data=1, fsdp=16)
  assert compile_lib.advice(config, mesh) == [
      "split the model over more devices (--config.mesh.tensor=k) or use more devices"]


def test_collectives_are_counted_from_hlo_text():
  hlo = """
  %all-gather-start.3 = (bf16[4,128]{1,0}, /*index=1*/bf16[16,128]{1,0}) all-gather-start(bf16[4,128]{1,0} %p)
  %all-gather-done.3 = bf16[16,128]{1,0} all-gather-done(%all-gather-start.3)
  %all-reduce.1 = f32[1024]{0} all-reduce(f32[1024]{0} %g), to_apply=%add
  %reduce-scatter.2 = bf16[8,64]{1,0} reduce-scatter(bf16[32,64]{1,0} %h), dimensions={0}
  %x = f32[8]{0} add(f32[8] %a, f32[8] %b)"""
  assert compile_lib.collectives(hlo) == {
      "all-gather": {"count": 1, "bytes": 16 * 128 * 2}, "all-reduce": {"count": 1, "bytes": 4096},
      "reduce-scatter": {"count": 1, "bytes": 8 * 64 * 2}}


@pytest.mark.slow
def test_compile_for_eight_fake_devices_reports_memory_flops_and_collectives(data_dir, tmp_path):
  r = compile_report(tmp_path, "--config=configs/transfusion/tiny.py", "--topology=cpu:8",
                     f"--config.data.data_dir={data_dir}", "--config.data.sources.shapes.builder_config=small",
                     "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                     "--config.train.ema_decay=0.999")
  assert r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
  assert r["rows_per_device"] == 16 / 4 and r["compiler"] == "XLA:CPU (proxy)"
  memory, params = r["memory_per_device_gib"], r["config"]["params"]
  # The state is split 4 ways at least (fsdp × tensor on the big matrices): params, two Adam moments and
  # the EMA, all in f32, each sharded like the params.
  state = 4 * 4 * params / 2**30
  parts = r["state_per_device_gib"]
  assert parts["ema"] == pytest.approx(parts["params"])
  assert parts["opt_state"] == pytest.approx(2 * parts["params"], rel=1e-3)  # and Adam's step count
  assert state / 8 < sum(parts.values()) <= memory["arguments"]
  assert state / 8 < memory["arguments"] < state / 2, (memory["arguments"], state)
  assert memory["aliased"] > 0.9 * state / 8  # the donated state is updated in place
  assert memory["total"] == pytest.approx(memory["arguments"] + memory["outputs"] + memory["temporaries"]
                                          - memory["aliased"])
  # XLA's count of the partitioned program's FLOPs, times 8 devices, is the model's 6N + attention count
  # within what the counting leaves out (norms, softmax, the patch layers) or adds (no remat here).
  ratio = r["xla_flops_per_device"] * 8 / r["model_flops_per_step"]
  assert 0.8 < ratio < 1.5, ratio
  # FSDP gathers parameters; gradients are reduced.
  assert r["collectives"]["all-gather"]["count"] > 0 and r["collectives"]["all-reduce"]["count"] > 0


def test_over_two_slices_the_data_axis_spans_them():
  """Multislice: each slice holds data/slices of the data axis and all of the others (only the gradient
  reduction crosses the data-center network)."""
  import ml_collections as mlc  # pylint: disable=g-import-not-at-top
  from unimm.parallel import sharding  # pylint: disable=g-import-not-at-top
  _, devices = compile_lib.target_devices("2xv5p-8")  # libtpu's topology: 2 slices × 4 chips
  assert sharding.num_slices(devices) == 2
  mesh = sharding.make_mesh(mlc.ConfigDict(dict(data=2, fsdp=-1, tensor=1, sequence=1)), devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
  for i in range(2):
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}
  with pytest.raises(ValueError, match="multiple of 2"):
    sharding.make_mesh(mlc.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1)), devices)


@pytest.mark.slow
def test_compile_for_two_tpu_slices_with_libtpu(data_dir, tmp_path):
  """libtpu's compiler (the test extras install it) compiles for two v5p-8 slices without a TPU."""
  r = compile_report(tmp_path, "--config=configs/transfusion/tiny.py", "--topology=2xv5p-8",
                     f"--config.data.data_dir={data_dir}", "--config.data.sources.shapes.builder_config=small",
                     "--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.model.backbone.dtype=bfloat16",
                     "--config.model.backbone.attention=auto")
  assert r["config"]["attention_kernel"] == "splash"  # traced for TPU slices: the splash kernel, per shard
  assert r["slices"] == 2 and r["devices"] == 8 and r["mesh"]["data"] == 2 and r["mesh"]["fsdp"] == 4
  assert r["compiler"].startswith("XLA:TPU") and r["device_memory_gib"] == 95 and r["fits"] is True
  assert r["rows_per_device"] == 16 / 8
  assert r["step_seconds_at_50pct_mfu"] == pytest.approx(r["model_flops_per_step"] / (8 * 459e12 * 0.5))
  # No scan in the tiny config: XLA's FLOP count covers the whole step (bf16 here, as on a pod).
  assert 0.5 < r["xla_flops_per_device"] * 8 / r["model_flops_per_step"] < 2.0
  np.testing.assert_array_less(0, [r["memory_per_device_gib"][k] for k in ("arguments", "temporaries")])
  assert sum(c["count"] for c in r["collectives"].values()) > 0
