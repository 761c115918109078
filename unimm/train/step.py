"""The train state and the one jitted train step (gradient accumulation, clipping, non-finite guard)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any


def init_state(task, optimizer, rng, batch) -> TrainState:
  """A fresh state (params still boxed with their logical axes; unbox after sharding)."""
  params = task.init(rng, batch)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def split_microbatches(batch: dict, num: int) -> dict:
  """[B, ...] → [num, B/num, ...], microbatch i = rows i, i+num, … (every device keeps a share)."""
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {num} microbatches")
    return x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_train_step(task, optimizer, schedule, *, grad_accum_steps: int = 1, skip_nonfinite: bool = False):
  """`step(state, batch, rng) → (state, metrics)`; the loss is exact under accumulation.

  Loss parts are sums normalised by whole-batch counts, so summing microbatch
  losses gives the full batch's loss and gradient. `task.loss_terms` gets the
  step (e.g. to switch a term on late); an optional `task.after_update(params,
  batch, rng, step)` edits the updated params (e.g. restarting dead VQ codes).
  """

  def loss_fn(params, batch, rng, counts, step):
    sums = task.loss_terms(params, batch, rng, step)
    total, _ = task.combine(sums, counts)
    return total, sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict, rng):
    rng = jax.random.fold_in(rng, state.step)
    counts = task.loss_counts(batch)
    if grad_accum_steps == 1:
      (loss, sums), grads = grad_fn(state.params, batch, rng, counts, state.step)
    else:
      micro = split_microbatches(batch, grad_accum_steps)

      def body(carry, xs):
        mb, i = xs
        (l, s), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), counts, state.step)
        acc_loss, acc_sums, acc_grads = carry
        return (acc_loss + l, jax.tree.map(jnp.add, acc_sums, s), jax.tree.map(jnp.add, acc_grads, g)), None

      zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(task.loss_terms, state.params,
                                                              jax.tree.map(lambda x: x[0], micro), rng,
                                                              state.step))
      zero = (jnp.zeros((), jnp.float32), zero_sums, jax.tree.map(jnp.zeros_like, state.params))
      (loss, sums, grads), _ = jax.lax.scan(body, zero, (micro, jnp.arange(grad_accum_steps)))
    _, parts = task.combine(sums, counts)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if hasattr(task, "after_update"):  # e.g. the VQ tokenizer restarting dead codes
      params = task.after_update(params, batch, jax.random.fold_in(rng, 1 << 30), state.step)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    if skip_nonfinite:
      kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), (params, opt_state), (state.params, state.opt_state))
      new = TrainState(step=state.step + 1, params=kept[0], opt_state=kept[1])
    metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "finite": finite.astype(jnp.float32)}
    return new, metrics

  return step
