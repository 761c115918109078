"""Where generation runs: the training mesh and logical rules, so a large model samples sharded.

Parameters are placed by the same logical names as in training (FSDP, tensor
parallel), generation batches are padded to a multiple of the batch axes' size
(data × fsdp) and split over them, and the KV cache is allocated sharded: rows
over the batch axes, key/value heads over `tensor`. On one device this is a
1-device mesh and changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from unimm.parallel import sharding


@dataclasses.dataclass(frozen=True)
class Placement:
  mesh: jax.sharding.Mesh
  rules: tuple

  @classmethod
  def from_config(cls, config, devices=None) -> "Placement":
    """The mesh and rules of `config` (as training builds them) over `devices` (default: all)."""
    return cls(sharding.make_mesh(config.mesh, devices), sharding.logical_rules(config.sharding))

  @classmethod
  def single_device(cls) -> "Placement":
    one = {a: 1 for a in sharding.MESH_AXES}
    return cls(sharding.make_mesh(one, jax.devices()[:1]), sharding.RULES["default"])

  @property
  def batch_multiple(self) -> int:
    """Rows a generation batch is padded to a multiple of."""
    return int(np.prod([self.mesh.shape[a] for a in sharding.BATCH_AXES]))

  @contextlib.contextmanager
  def context(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def params(self, model, params):
    """`params` (host or any device) placed by the model's logical parameter names."""
    def boxed_init():
      return model.init(jax.random.key(0), *model.dummy_inputs(1, 1))["params"]
    with self.context():
      boxed = jax.eval_shape(boxed_init)
      shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
    return jax.device_put(nn.meta.unbox(params), nn.meta.unbox(shardings))

  @property
  def batch_sharding(self) -> NamedSharding:
    """Arrays with a leading batch axis: split over the batch axes."""
    return NamedSharding(self.mesh, P(sharding.BATCH_AXES))

  def rows(self, batch):
    """A pytree (`packed.Rows`, a dict) of numpy arrays with a leading batch axis → jax arrays split over the
    batch axes."""
    return jax.tree.map(lambda v: jax.device_put(np.asarray(v), self.batch_sharding), batch)

  def cache_sharding(self, shape: jax.ShapeDtypeStruct, batch_axis: int | None):
    """Cache leaves: rows over the batch axes; key/value heads (axis batch+2) over `tensor` when it divides."""
    spec = [None] * len(shape.shape)
    if batch_axis is None:
      return NamedSharding(self.mesh, P(*spec))
    if shape.shape[batch_axis] % self.batch_multiple == 0:
      spec[batch_axis] = sharding.BATCH_AXES
    heads = batch_axis + 2
    if len(shape.shape) == batch_axis + 4 and shape.shape[heads] % self.mesh.shape["tensor"] == 0:
      spec[heads] = "tensor"
    return NamedSharding(self.mesh, P(*spec))


def pad_to_multiple(items: list, multiple: int, filler) -> list:
  """`items` with `filler` appended until its length divides by `multiple` (outputs for fillers are dropped)."""
  return items + [filler] * (-len(items) % multiple)
