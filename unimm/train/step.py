"""The train state and the one jitted train step (gradient accumulation, clipping, non-finite guard).

Freezing: `Partition(prefixes)` splits the params into the trainable ones (paths
starting with one of `prefixes`, all when empty) and the frozen rest. The step
differentiates only with respect to the trainable part, so frozen params get no
gradient computation, and the optimiser state covers only the trainable part
(no moments for frozen params).

EMA (`train.ema_decay` = d > 0): the state also holds a float32 exponential moving average of the
trainable params, sharded like them, updated after every applied update n (0-based) as
ema ← β·ema + (1 − β)·params with β = min(d, (1 + n) / (10 + n)) — the warm-up that lets the average
follow the fast early changes (TensorFlow's `num_updates` rule). Sampling and evaluation use it
(`with_ema`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any
  ema: Any = None  # float32 EMA of the trainable params (train.ema_decay > 0); None: no EMA


def ema_decay_at(decay: float, updates) -> jnp.ndarray:
  """β after `updates` applied updates: min(decay, (1 + n) / (10 + n))."""
  n = jnp.asarray(updates, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_of(params) -> Any:
  """An EMA started at `params`: float32 copies (new buffers even where the params are float32, so the step
  can donate both), boxed logical axes kept."""
  return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)


def with_ema(params, ema):
  """`params` with each parameter the EMA covers replaced by its average (in the parameter's dtype)."""
  if ema is None:
    return params
  flat = traverse_util.flatten_dict(params, sep="/")
  for path, value in traverse_util.flatten_dict(ema, sep="/").items():
    flat[path] = value.astype(flat[path].dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


@dataclasses.dataclass(frozen=True)
class Partition:
  """Which params train: those whose '/'-joined path is, or lies under, one of `prefixes` (all if empty).
  An entry with a `*` is a glob over the whole path instead (`*` crosses '/'): LMFusion trains
  "decoder/*_image/*", the image-slot copies, at any depth."""

  prefixes: tuple[str, ...] = ()

  def trains(self, path: str) -> bool:
    return not self.prefixes or any(_selects(p, path) for p in self.prefixes)

  def split(self, params) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; with no prefixes, (params, {})."""
    if not self.prefixes:
      return params, {}
    flat = traverse_util.flatten_dict(params, sep="/")
    train = {k: v for k, v in flat.items() if self.trains(k)}
    frozen = {k: v for k, v in flat.items() if not self.trains(k)}
    return traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")

  def merge(self, trainable, frozen):
    if not self.prefixes:
      return trainable
    flat = {**traverse_util.flatten_dict(trainable, sep="/"), **traverse_util.flatten_dict(frozen, sep="/")}
    return traverse_util.unflatten_dict(flat, sep="/")

  def check(self, params) -> None:
    """Raises if a prefix names no param (a typo would silently freeze everything it meant to train)."""
    paths = list(traverse_util.flatten_dict(params, sep="/"))
    for p in self.prefixes:
      if not any(Partition((p,)).trains(path) for path in paths):
        top = sorted({path.split("/")[0] for path in paths})
        raise ValueError(f"config.train.trainable entry {p!r} matches no parameter; top-level names: {top}")


def _selects(entry: str, path: str) -> bool:
  if "*" in entry:
    return fnmatch.fnmatchcase(path, entry)
  return path == entry or path.startswith(entry.rstrip("/") + "/")


def init_state(task, optimizer, rng, batch, partition: Partition = Partition(), ema: bool = False) -> TrainState:
  """A fresh state (params still boxed with their logical axes; unbox after sharding); the optimiser
  state (and the EMA, with `ema`) covers the trainable params only."""
  params = task.init(rng, batch)
  trainable = partition.split(params)[0]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(trainable),
                    ema=ema_of(trainable) if ema else None)


def split_microbatches(batch: dict, num: int) -> dict:
  """[B, ...] → [num, B/num, ...], microbatch i = rows i, i+num, … (every device keeps a share)."""
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {num} microbatches")
    return x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_train_step(task, optimizer, schedule, *, grad_accum_steps: int = 1, skip_nonfinite: bool = False,
                    partition: Partition = Partition(), after_update: bool = False, ema_decay: float = 0.0):
  """`step(state, batch, rng) → (state, metrics)`; the loss is exact under accumulation.

  Loss parts are sums normalised by whole-batch counts, so summing microbatch
  losses gives the full batch's loss and gradient. `task.loss_terms` gets the
  step (e.g. to switch a term on late); with `after_update` (the family's record
  says so), `task.after_update(params, batch, rng, step)` edits the updated params
  (e.g. restarting dead VQ codes).
  """

  def loss_fn(trainable, frozen, batch, rng, counts, step):
    sums = task.loss_terms(partition.merge(trainable, frozen), batch, rng, step)
    total, _ = task.combine(sums, counts)
    return total, sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)  # with respect to the trainable params only

  def step(state: TrainState, batch: dict, rng):
    rng = jax.random.fold_in(rng, state.step)
    counts = task.loss_counts(batch)
    trainable, frozen = partition.split(state.params)
    if grad_accum_steps == 1:
      (loss, sums), grads = grad_fn(trainable, frozen, batch, rng, counts, state.step)
    else:
      micro = split_microbatches(batch, grad_accum_steps)

      def body(carry, xs):
        mb, i = xs
        (l, s), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(rng, i), counts, state.step)
        acc_loss, acc_sums, acc_grads = carry
        return (acc_loss + l, jax.tree.map(jnp.add, acc_sums, s), jax.tree.map(jnp.add, acc_grads, g)), None

      zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(task.loss_terms, state.params,
                                                              jax.tree.map(lambda x: x[0], micro), rng,
                                                              state.step))
      zero = (jnp.zeros((), jnp.float32), zero_sums, jax.tree.map(jnp.zeros_like, trainable))
      (loss, sums, grads), _ = jax.lax.scan(body, zero, (micro, jnp.arange(grad_accum_steps)))
    _, parts = task.combine(sums, counts)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    params = partition.merge(optax.apply_updates(trainable, updates), frozen)
    if after_update:  # e.g. the VQ tokenizer restarting dead codes
      params = task.after_update(params, batch, jax.random.fold_in(rng, 1 << 30), state.step)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ema = state.ema
    if ema_decay:
      beta = ema_decay_at(ema_decay, state.step)
      ema = jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p.astype(jnp.float32), ema,
                         partition.split(params)[0])
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    if skip_nonfinite:
      kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), (params, opt_state, ema),
                          (state.params, state.opt_state, state.ema))
      new = TrainState(step=state.step + 1, params=kept[0], opt_state=kept[1], ema=kept[2])
    metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "finite": finite.astype(jnp.float32)}
    return new, metrics

  return step
