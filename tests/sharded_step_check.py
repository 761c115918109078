"""Run as a script (8 fake CPU devices): three train steps under each sharding strategy vs one device.

    python tests/sharded_step_check.py DATA_DIR [GRAD_ACCUM [FAMILY [STRATEGY,... [MOT_PARTS]]]]  → prints JSON

STRATEGY: a name in STRATEGIES (the mesh that selects it; default fsdp_tp).

FAMILY: transfusion (default), chameleon (with a randomly initialised frozen VQ tokenizer) or janus
(stage II: the ViT frozen, so the optimiser state covers part of the params).

MOT_PARTS: comma-separated `model.backbone.mot` parts (Mixture-of-Transformers image-slot copies).
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import load_config, small_config  # pylint: disable=wrong-import-position
from unimm.data import pipeline  # pylint: disable=wrong-import-position
from unimm.parallel import sharding  # pylint: disable=wrong-import-position
from unimm.train import setup as setup_lib  # pylint: disable=wrong-import-position


# Each strategy is a mesh shape: the logical rules are fixed, the axes' sizes choose what is split.
STRATEGIES = {
    "dp": dict(data=8, fsdp=1, tensor=1, sequence=1),  # params replicated, batch split
    "fsdp": dict(data=1, fsdp=8, tensor=1, sequence=1),  # ZeRO-3: params and optimiser state split on embed
    "tp": dict(data=2, fsdp=1, tensor=4, sequence=1),  # heads, MLP hidden and vocabulary split
    "fsdp_tp": dict(data=2, fsdp=2, tensor=2, sequence=1),
    "sp": dict(data=2, fsdp=1, tensor=1, sequence=4),  # activations' length split (long rows)
    "fsdp_tp_sp": dict(data=1, fsdp=2, tensor=2, sequence=2),
}


SHARDED_INIT = "fsdp_tp_sp"  # the one strategy that runs the init on its mesh (data, FSDP, tensor, sequence at once)


def run(config, mesh_sizes, devices, batch, frozen_codec=None, compiled=False, start=None):
  """Three steps on the mesh; `start`: a host copy of the initial state to place on it instead of running
  the init there (the sharded init is checked once, on all four axes: it costs as much to compile as a step).
  Returns (last metrics, first metrics, params, specs, largest update, HLO, host copy of the initial state)."""
  metrics2 = None
  config.mesh.update(mesh_sizes)
  mesh = sharding.make_mesh(config.mesh, devices)
  setup = setup_lib.build(config, mesh, pipeline.load_tokenizer(config.data).vocab_size, frozen_codec)
  state = setup.init(jax.random.key(0)) if start is None else jax.device_put(start, setup.state_sharding)
  initial = jax.device_get(state)  # before the steps: they donate the state
  init = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(initial.params)}
  # What each device holds of each parameter (the spec names mesh axes even where their size is 1).
  specs = {jax.tree_util.keystr(p): [list(x.shape), list(x.sharding.shard_shape(x.shape)), str(x.sharding.spec)]
           for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
  global_batch = sharding.global_batch(batch, mesh)
  step, activations = setup.step, None
  if compiled:  # compiled ahead of time (to read its HLO), then run: one compile, not two
    step = setup.lower(state, global_batch, jax.random.key(1)).compile()
    activations = step.as_text()
  # Step 0 has learning rate 0 (warm-up); steps 1 and 2 move the parameters.
  for _ in range(3):
    state, metrics = step(state, global_batch, jax.random.key(1))
    metrics = jax.device_get(metrics)  # block each step (fake devices)
    if metrics2 is None:
      metrics2 = metrics
  params = {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
  update = max(float(np.abs(params[k] - init[k]).max()) for k in params)
  return metrics, metrics2, params, specs, update, activations, initial


def family_config(data_dir: str, family: str):
  """(config, frozen codec params) of the tiny config of `family` on the test data."""
  if family == "transfusion":
    return small_config(data_dir, "shapes"), None
  from unimm import families  # pylint: disable=g-import-not-at-top
  config = load_config(f"configs/{family}/tiny.py", "shapes" if family == "chameleon" else "stage2")
  config.data.data_dir = data_dir
  for spec in config.data.sources.values():
    spec.builder_config = "small"
  config.model.vision.update(width=16, depth=1, num_heads=2, mlp_dim=32)
  return config, families.random_frozen_codec(config, seed=7)


def main():
  config, frozen = family_config(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else "transfusion")
  config.model.backbone.update(num_layers=2, dim=32, num_heads=4, mlp_hidden=64, scan=True, remat="full")
  if len(sys.argv) > 5:
    config.model.backbone.mot = tuple(sys.argv[5].split(","))
  config.data.batch_size = 8
  config.train.update(learning_rate=1e-2, warmup_steps=1)
  config.train.grad_accum_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1
  batch = next(pipeline.build_pipeline(config, "train"))
  batch.pop("stats")
  strategies = sys.argv[4].split(",") if len(sys.argv) > 4 else ["fsdp_tp"]
  m1, m1b, p1, _, update, _, start = run(config, dict(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1], batch,
                                         frozen)
  out = {"metrics_1": {k: float(v) for k, v in m1.items()}, "metrics2_1": {k: float(v) for k, v in m1b.items()},
         "max_update": update, "devices": jax.device_count(), "strategies": {}}
  for name in strategies:
    mesh = STRATEGIES[name]
    own_init = name == SHARDED_INIT
    m8, m8b, p8, specs, _, hlo, initial = run(config, dict(mesh), jax.devices(), batch, frozen,
                                              compiled=mesh["sequence"] > 1, start=None if own_init else start)
    if own_init:  # the init run on the mesh draws exactly the single device's values
      out["sharded_init_max_diff"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                         for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(initial)))
    out["strategies"][name] = {
        "metrics_8": {k: float(v) for k, v in m8.items()}, "metrics2_8": {k: float(v) for k, v in m8b.items()},
        "max_param_diff": max(float(np.abs(p1[k] - p8[k]).max()) for k in p1),
        "worst_param": max(p1, key=lambda k: float(np.abs(p1[k] - p8[k]).max())),
        "specs": specs,
    }
    if hlo is not None:  # the per-device shape of the residual stream [batch, length, dim] in the compiled step
      rows, length, dim = batch["tokens"].shape[0], batch["tokens"].shape[1], config.model.backbone.dim
      local = f"f32[{rows // (mesh['data'] * mesh['fsdp'])},{length // mesh['sequence']},{dim}]"
      out["strategies"][name]["local_residual_shape"] = local
      out["strategies"][name]["local_residual_ops"] = hlo.count(local + "{")
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
