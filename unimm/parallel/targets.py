"""What a config's "auto" settings become on the target it is built for.

Paper configs must fit the machines they are for from the bare command; what fits differs by target
(docs/scaling.md: a 7B step keeps every projection on a v5p-256 slice but only q, k, v on 64 H100s). A
config says so in `config.targets`, keyed by platform (tpu, gpu, cpu): `model.backbone.remat="auto"`
takes `targets.<platform>.remat`, and `train.grad_accum_steps=0` splits each device's rows into
microbatches of at most `targets.<platform>.max_rows_per_device` (0: no cap). Explicit values are kept.
The trainer resolves them for its mesh, `--mode=compile` for its --topology (GPUs compile on fake CPU
devices: the target's platform is passed), and tools that build a model without a mesh for this host.
"""

from __future__ import annotations

import jax

# Remat policies from the most memory to the least (what to try next when a step does not fit).
REMAT_BY_MEMORY = ("none", "dots", "dots_no_batch", "qkv_out_proj", "qkv_attention", "qkv_proj", "full")


def platform_of(mesh=None) -> str:
  """tpu, gpu or cpu: what the mesh's devices are (this host's default backend without a mesh)."""
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def rows_per_device(config, mesh) -> int:
  """Rows each device holds per step (the batch splits over the data and fsdp axes)."""
  return max(1, int(config.data.batch_size) // (mesh.shape["data"] * mesh.shape["fsdp"]))


def resolve_targets(config, platform: str, rows_per_device: int | None = None):
  """`config` with "auto" settings made concrete for `platform` (see the module doc); the accumulation
  only when `rows_per_device` is known (training). The config itself is not changed."""
  target = config.targets.get(platform, None) if "targets" in config else None
  remat_auto = config.model.backbone.remat == "auto"
  accum_auto = int(config.train.grad_accum_steps) <= 0 and rows_per_device is not None
  if not remat_auto and not accum_auto:
    return config
  config = config.copy_and_resolve_references()
  if remat_auto:
    if target is None or not target.get("remat"):
      raise ValueError(f"model.backbone.remat='auto' needs config.targets.{platform}.remat (the policy for "
                       f"{platform}); set it, or name a policy: {REMAT_BY_MEMORY}")
    config.model.backbone.remat = str(target.remat)
  if accum_auto:
    cap = int(target.get("max_rows_per_device", 0)) if target is not None else 0
    steps = 1
    while cap and (rows_per_device // steps > cap or rows_per_device % steps):
      steps += 1
    config.train.grad_accum_steps = steps
  return config
