"""The sharded train state and the one jitted step, built from a config on a mesh.

Kept free of the data pipeline's imports so benchmarks and compile-only tools
can build a step anywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from unimm import families
from unimm.data import layout
from unimm.data.settings import DataSettings
from unimm.models import backbone
from unimm.parallel import sharding, targets
from unimm.train import optimizer as optimizer_lib, settings, step as step_lib


@dataclasses.dataclass
class Setup:
  """Everything the loop (and tests) need to run sharded steps."""

  task: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  state_sharding: Any
  abstract_state: Any  # unboxed ShapeDtypeStructs carrying the shardings (for restore)
  init: Callable  # rng → sharded TrainState
  step: Callable  # (state, global batch, rng) → (state, metrics), jitted and donating
  lower: Callable  # the same arguments, abstract or concrete → jax Lowered (`.compile()`: ahead of time)
  matmul_params: int  # in the per-token matmuls a token uses (the FLOP count's N): no MoT image-slot copies
  total_params: int
  train: settings.TrainSettings  # `config.train` parsed (its "auto" settings resolved)
  data: DataSettings  # `config.data` parsed
  config: Any = None  # the config as built: its "auto" settings resolved for the target


def abstract_params(config, vocab_size: int | None):
  """`config`'s model params as boxed ShapeDtypeStructs (logical axes kept), traced with `eval_shape`:
  no weights are made (the frozen codec's neither), so a 7B config takes seconds on a laptop."""
  codec = jax.eval_shape(lambda: families.random_frozen_codec(config))

  def init(codec, rng):
    task = families.build_task(config, vocab_size, frozen_codec=codec)
    return task.init(rng, task.dummy_batch(1, int(config.data.seq_len), layout.image_shape_of(config.data)))

  return jax.eval_shape(init, codec, jax.random.key(0))


def build(config, mesh, vocab_size: int | None, frozen_codec=None, platform: str | None = None) -> Setup:
  """The sharded state and step of `config` on `mesh` (its "auto" settings resolved for `platform`, by
  default the mesh's: see `unimm.parallel.targets`); `vocab_size`: the ids the tokenizer emits."""
  config = targets.resolve_targets(config, platform or targets.platform_of(mesh), targets.rows_per_device(config, mesh))
  task = families.build_task(config, vocab_size, frozen_codec=frozen_codec)
  rules = sharding.logical_rules(config.sharding)
  train, data = settings.TrainSettings.from_config(config.train), DataSettings.from_config(config.data)
  optimizer = optimizer_lib.make_optimizer(train)
  schedule = optimizer_lib.learning_rate_schedule(train)
  init_batch = task.dummy_batch(1, data.seq_len, data.layout.image_shape)
  partition = step_lib.Partition(train.trainable)
  family = families.of(config)

  def init_boxed(rng, batch):  # the batch is an argument so tracing never sees constants
    return step_lib.init_state(task, optimizer, rng, batch, partition, ema=train.ema_decay > 0)

  key = jax.random.key(0)  # made outside the mesh: a compile-only mesh (TPU topology) has no live devices
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_boxed = jax.eval_shape(init_boxed, key, init_batch)
    state_sharding = sharding.logical_shardings(abstract_boxed, mesh, rules)
  partition.check(abstract_boxed.params)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(abstract_boxed), state_sharding)
  init = jax.jit(lambda rng, batch: nn.meta.unbox(init_boxed(rng, batch)), out_shardings=state_sharding)
  train_step = step_lib.make_train_step(task, optimizer, schedule,
                                        grad_accum_steps=train.grad_accum_steps,
                                        skip_nonfinite=train.skip_nonfinite, partition=partition,
                                        after_update=family.after_update, ema_decay=train.ema_decay)
  replicated = NamedSharding(mesh, P())
  batch_sharding = sharding.batch_sharding(mesh)
  jitted = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding, replicated),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)

  def run_step(state, batch, rng):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(state, batch, rng)

  def lower(state, batch, rng):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted.lower(state, batch, rng)

  def run_init(rng):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return init(rng, init_batch)

  sizes = [(optimizer_lib.path_name(path), int(np.prod(x.shape)))
           for path, x in jax.tree_util.tree_leaves_with_path(abstract.params)]
  return Setup(task=task, mesh=mesh, rules=rules, state_sharding=state_sharding, abstract_state=abstract,
               init=run_init, step=run_step, lower=lower,
               matmul_params=sum(n for path, n in sizes
                                 if family.is_matmul_param(path) and not backbone.is_image_copy(path)),
               total_params=sum(n for _, n in sizes), train=train, data=data, config=config)


def flops_per_token(setup: Setup, config) -> float:
  """Model FLOPs per trained token, as the family counts them (`Family.flops_per_token`; by default 6·N
  for the N parameters in per-token matmuls — not the embedding tables, a per-image encoder such as
  Janus's ViT, nor the frozen codecs — plus the attention scores and values)."""
  return families.of(config).flops_per_token(config, setup.matmul_params)
