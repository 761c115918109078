"""The train step compiled ahead of time for a target mesh, without that hardware.

    python -m unimm.main --mode=compile --config=configs/transfusion/7b.py --topology=v5p-256
    python -m unimm.main --mode=compile --config=configs/transfusion/7b.py --topology=h100:64

A topology is a TPU slice (`v5p-256`, `v4-128`, `v5e-256`, `v6e-256`, or `v5p:4x4x8`; `2xv5p-256`:
two slices over DCN, the data axis spanning them), compiled by
libtpu's compiler through `jax.experimental.topologies` (needs `pip install libtpu`, no TPU), or N
fake CPU devices standing in for GPUs (`h100:64`, `cpu:8`; XLA:CPU's SPMD partitioning and buffer
assignment of the same program: its memory figures are a proxy — CPU keeps some bf16 math in f32
and fuses differently). What it prints (JSON): the mesh, per-device batch, remat policy, XLA's
memory analysis per device (arguments, outputs, temporaries, and their sum less donated aliases)
against the device's memory, XLA's FLOPs per step per device, the model FLOPs per step (6N + attention,
as the trainer counts them), the step time those take at 50% MFU, and the collectives in the
compiled program (count and bytes by kind).
"""

from __future__ import annotations

import collections
import os
import re
import time

from absl import logging
import jax
import numpy as np

GiB = 2**30
# Per chip: memory (bytes) and peak dense bf16 FLOP/s (vendor figures).
HARDWARE = {
    "v4": (32 * GiB, 275e12), "v5p": (95 * GiB, 459e12), "v5e": (16 * GiB, 197e12), "v6e": (32 * GiB, 918e12),
    "h100": (80 * GiB, 989e12), "h200": (141 * GiB, 989e12), "a100": (80 * GiB, 312e12), "cpu": (None, None),
}
# Chips of a TPU slice name → physical topology (v4/v5p names count TensorCores, two per chip).
_TPU_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
           512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_TPU_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
                "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


def target_platform(kind: str) -> str:
  """The platform a chip kind is (what configs' `targets` are keyed by): h100 → gpu, v5p → tpu."""
  return "gpu" if kind in ("h100", "h200", "a100") else "cpu" if kind == "cpu" else "tpu"


def advice(config, mesh) -> list[str]:
  """What to change when a compiled step does not fit, most effective first: FSDP over every device, the
  next leaner remat policy, twice the accumulation, then what the family offers (the chunked LM loss)."""
  from unimm import families  # pylint: disable=g-import-not-at-top
  from unimm.parallel import targets  # pylint: disable=g-import-not-at-top
  out = []
  devices = int(np.prod(list(mesh.shape.values())))
  if mesh.shape["fsdp"] * mesh.shape["tensor"] * mesh.shape["sequence"] < devices:
    out.append(f"shard parameters and optimiser state over every device (FSDP): --config.mesh.data=1 "
               f"--config.mesh.fsdp=-1 (now data={mesh.shape['data']}: each of those holds a full copy)")
  order = targets.REMAT_BY_MEMORY
  remat = config.model.backbone.remat
  if remat in order and order.index(remat) + 1 < len(order):
    leaner = order[order.index(remat) + 1]
    out.append(f"keep fewer activations for the backward pass: --config.model.backbone.remat={leaner} (now "
               f"{remat}; recomputes more)")
  accum = int(config.train.grad_accum_steps)
  micro_rows = targets.rows_per_device(config, mesh) // max(accum, 1)
  if micro_rows >= 2:
    out.append(f"halve the rows each device holds at once: --config.train.grad_accum_steps={2 * max(accum, 1)} "
               f"(now {micro_rows} rows per device per microbatch)")
  out += families.of(config).memory_advice(config)  # e.g. Transfusion's chunked LM loss
  if not out:
    out.append("split the model over more devices (--config.mesh.tensor=k) or use more devices")
  return out


def parse_topology(topology: str) -> tuple[str, str, int]:
  """'v5p-256' → ('v5p', 'v5p:4x4x8', 128 chips); 'h100:64' → ('h100', 'cpu', 64). A slice count in
  front ('2xv5p-256') is for `slice_count`; the chips here are one slice's."""
  topology = topology.split("x", 1)[1] if re.match(r"\d+x[a-z]", topology) else topology
  if ":" in topology and topology.split(":")[0] in ("cpu", "h100", "h200", "a100"):
    kind, count = topology.split(":")
    return kind, "cpu", int(count)
  if ":" in topology:  # an explicit physical topology, e.g. v5p:4x4x8
    kind, shape = topology.split(":")
    return kind, topology, int(np.prod([int(x) for x in shape.split("x")]))
  match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", topology)
  if not match:
    raise ValueError(f"--topology={topology}: use a TPU slice (v5p-256, v4-128, v5e-256, v6e-256, v5p:4x4x8) "
                     "or fake CPU devices for N GPUs (h100:64, cpu:8)")
  kind, n = ("v5e" if match.group(1) == "v5litepod" else match.group(1)), int(match.group(2))
  chips = n // 2 if kind in ("v4", "v5p") else n
  table = _TPU_3D if kind in ("v4", "v5p") else _TPU_2D
  if chips not in table:
    raise ValueError(f"--topology={topology}: no known physical shape for {chips} chips; give it as {kind}:AxBxC")
  return kind, f"{kind}:{table[chips]}", chips


def slice_count(topology: str) -> int:
  """'2xv5p-256' → 2 slices joined by DCN (multislice); 1 otherwise."""
  match = re.match(r"(\d+)x[a-z]", topology)
  return int(match.group(1)) if match else 1


def target_devices(topology: str) -> tuple[str, list]:
  """(chip kind, the devices to build the mesh from) for `topology`."""
  kind, physical, count = parse_topology(topology)
  slices = slice_count(topology)
  if physical == "cpu":
    if slices > 1:
      raise ValueError(f"--topology={topology}: several slices are TPU slices (e.g. 2xv5p-256)")
    devices = jax.devices("cpu")
    if len(devices) < count:
      raise ValueError(f"--topology={topology} needs {count} CPU devices, there are {len(devices)}: set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts "
                       "(--mode=compile does this itself when it runs first)")
    return kind, devices[:count]
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Compiling touches no chip: let several compile-only processes load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    description = topologies.get_topology_desc(topology_name=physical, platform="tpu", num_slices=slices)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"--topology={topology} needs libtpu's compiler, the version matching jax "
                       f"(pip install -e '.[tpu]'; no TPU needed): {e}") from e
  return kind, list(description.devices)


def state_memory(abstract_state) -> dict[str, float]:
  """GiB per device of each part of the train state (params, opt_state, ema: 0 without one), from the
  shards its shardings give each device."""
  def gib(tree) -> float:
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree)) / GiB
  return {"params": gib(abstract_state.params), "opt_state": gib(abstract_state.opt_state),
          "ema": gib(abstract_state.ema)}


def collectives(hlo: str) -> dict:
  """{kind: {count, bytes}} of the collective ops in compiled HLO text; an op's bytes are its largest
  array (the gathered result of an all-gather, the input of a reduce-scatter), async starts counted once."""
  out = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  opcode = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for line in hlo.splitlines():
    if " = " not in line:
      continue
    result = line.split(" = ", 1)[1]
    match = opcode.search(result)
    if not match:
      continue
    sizes = [_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
             for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result[:match.start()]) if dtype in _DTYPE_BYTES]
    out[match.group(1)]["count"] += 1
    out[match.group(1)]["bytes"] += max(sizes, default=0)
  return dict(out)


def compile_train_step(config, topology: str, hlo_path: str | None = None) -> dict:
  """Lowers and compiles `config`'s train step for `topology`; returns the report (see the module doc).
  `hlo_path`: where to write the compiled (partitioned, per-device) HLO text."""
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  from unimm import families  # pylint: disable=g-import-not-at-top
  from unimm.models import attention, backbone  # pylint: disable=g-import-not-at-top
  from unimm.parallel import sharding  # pylint: disable=g-import-not-at-top
  from unimm.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  kind, devices = target_devices(topology)
  mesh = sharding.make_mesh(config.mesh, devices)
  # A declared vocabulary needs no tokenizer on this machine (families.text_vocabulary).
  vocab = None if int(config.model.vocab_size) else pipeline.load_tokenizer(config.data).vocab_size
  # Frozen codecs (VAE, VQ) with random weights: their shapes and cost are what compiling needs.
  codec = families.random_frozen_codec(config)
  setup = setup_lib.build(config, mesh, vocab, codec, platform=target_platform(kind))
  config = setup.config  # "auto" settings resolved for the target
  rows, length = setup.data.batch_size, setup.data.seq_len
  batch = setup.task.dummy_batch(rows, length, setup.data.layout.image_shape)
  batch_sharding = sharding.batch_sharding(mesh)
  abstract_batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=batch_sharding)
                    for k, v in batch.items()}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  t0 = time.time()
  lowered = setup.lower(setup.abstract_state, abstract_batch, rng)
  t1 = time.time()
  compiled = lowered.compile()
  t2 = time.time()
  logging.info("Lowered in %.0fs, compiled in %.0fs.", t1 - t0, t2 - t1)
  memory = compiled.memory_analysis()
  hlo = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(hlo)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  device_memory, peak = HARDWARE.get(kind, (None, None))
  per_device = {
      "arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
      "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes,
      "generated_code": memory.generated_code_size_in_bytes,
  }
  per_device["total"] = (per_device["arguments"] + per_device["outputs"] + per_device["temporaries"]
                         - per_device["aliased"])
  tokens = rows * length
  model_flops = setup_lib.flops_per_token(setup, config) * tokens
  b = config.model.backbone
  with jax.set_mesh(mesh):  # what `auto` picks when traced for this mesh's platform
    kernel = attention.resolve_implementation(
        b.attention, length=length, head_dim=backbone.BackboneConfig.from_config(b).head_size,
        sequence_sharded=mesh.shape["sequence"] > 1)
  report = {
      "config": {"family": config.model.family, "layers": int(b.num_layers), "dim": int(b.dim),
                 "params": setup.total_params, "matmul_params": setup.matmul_params, "remat": b.remat,
                 "scan": bool(b.scan), "dtype": b.dtype, "grad_accum_steps": setup.train.grad_accum_steps,
                 "attention": b.attention, "attention_kernel": kernel},
      "topology": topology, "device_kind": kind, "devices": len(devices), "slices": sharding.num_slices(devices),
      "compiler": "XLA:CPU (proxy)" if devices[0].platform == "cpu" else f"XLA:TPU ({devices[0].device_kind})",
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "global_batch": {"rows": rows, "seq_len": length, "tokens": tokens},
      "rows_per_device": rows / (mesh.shape["data"] * mesh.shape["fsdp"]),
      "memory_per_device_gib": {k: v / GiB for k, v in per_device.items()},
      # What the train state holds per device (within `arguments`): params, Adam moments, the EMA.
      "state_per_device_gib": state_memory(setup.abstract_state),
      "device_memory_gib": device_memory / GiB if device_memory else None,
      "fits": per_device["total"] <= device_memory if device_memory else None,
      "if_it_does_not_fit": (advice(config, mesh)
                             if device_memory and per_device["total"] > device_memory else []),
      # XLA's cost analysis counts a while loop's body once: with scan over layers this is about one
      # layer's FLOPs plus the rest, not the step's. The model FLOPs below are the step's.
      "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
      "model_flops_per_step": model_flops,
      "step_seconds_at_50pct_mfu": model_flops / (len(devices) * peak * 0.5) if peak else None,
      "collectives": collectives(hlo),
      "seconds": {"lower": t1 - t0, "compile": t2 - t1},
  }
  return report
