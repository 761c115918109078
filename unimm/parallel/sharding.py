"""The device mesh and the logical-axis rules that place parameters and activations on it.

The mesh has axes ``('data', 'fsdp', 'tensor', 'sequence')``; a config gives
their sizes (-1 = the rest of the devices). Modules name their axes logically
(`unimm/models/layers.py`); a rule set maps each logical name to mesh axes:

* data parallelism: the batch over ``data``;
* FSDP (ZeRO-3): the batch also over ``fsdp``, and every parameter's ``embed``
  axis split over ``fsdp`` (gathered per layer inside the scan);
* tensor parallelism: attention heads, the MLP hidden axis and the vocabulary
  over ``tensor``;
* sequence: activations' length over ``sequence`` (long rows).

A strategy is a mesh shape (`config.mesh`); the rules stay the same:

  data parallel        mesh.data=-1                     params replicated
  FSDP (ZeRO-3)        mesh.fsdp=-1                     params + optimiser state split on `embed`
  tensor parallel      mesh.tensor=k (k | heads)        heads, MLP hidden, vocabulary split
  sequence parallel    mesh.sequence=k (k | seq_len)    activations split along the row
  combinations         e.g. data=-1, fsdp=16, tensor=4  (what docs/scaling.md compiles at 7B)

tests/test_sharded_step.py checks each against one device on 8 fake devices.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from unimm.models import axes

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")

RULES = {
    "default": (
        # activations
        (axes.ACT_BATCH, BATCH_AXES),
        (axes.ACT_LENGTH, "sequence"),
        (axes.ACT_EMBED, None),
        (axes.ACT_HEADS, "tensor"),
        (axes.ACT_KV_HEADS, "tensor"),
        (axes.ACT_MLP, "tensor"),
        (axes.ACT_VOCAB, "tensor"),
        # parameters
        (axes.EMBED, "fsdp"),
        (axes.VOCAB, "tensor"),
        (axes.HEADS, "tensor"),
        (axes.KV_HEADS, "tensor"),
        (axes.MLP, "tensor"),
        (axes.HEAD_DIM, None),
        (axes.LAYERS, None),
        (axes.PATCH, None),
        (axes.TIME_FREQ, None),
        (axes.EMBED_IN, None),
        (axes.CONV_IN, None),  # conv stacks (U-Net patch layers, VAE) are small: replicated
        (axes.CONV_OUT, None),
        (axes.CODES, None),  # VQ codebooks are small: replicated
        (axes.CODE_DIM, None),
    ),
}


def logical_rules(sharding_config) -> tuple:
  rules = sharding_config.rules
  if isinstance(rules, str):
    if rules not in RULES:
      raise ValueError(f"unknown sharding rules {rules!r}; known: {sorted(RULES)} (or give a list of pairs)")
    return RULES[rules]
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"{num_devices} devices do not divide by the fixed mesh axes {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // fixed
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"there are {num_devices}; set one axis to -1")
  return tuple(sizes)


def num_slices(devices) -> int:
  """How many TPU slices (joined by the data-center network, DCN) the devices span; 1 elsewhere."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_config, devices=None) -> Mesh:
  """The config's mesh over `devices`. Over several TPU slices the `data` axis spans them: each slice
  holds data/slices of it (and every other axis whole), so only the gradient reduction crosses DCN."""
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)  # the logical-rules style (constraints, not explicit types)
  slices = num_slices(devices)
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  if shape[0] % slices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} over {slices} slices: the data axis spans the slices, "
                     f"so mesh.data must be a multiple of {slices} (e.g. data={slices}, fsdp=-1)")
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  ici = (shape[0] // slices, *shape[1:])
  dcn = (slices,) + (1,) * (len(shape) - 1)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over data × fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def logical_shardings(abstract_boxed, mesh: Mesh, rules):
  """Shardings for a pytree of boxed (logically partitioned) abstract values."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_boxed), mesh, rules)


def global_batch(local: dict, mesh: Mesh) -> dict:
  """This process's numpy batch → global jax arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
