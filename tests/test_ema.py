"""EMA of the weights (`train.ema_decay`): the step's average against a float64 NumPy recurrence, over the
trainable params only, held back with a skipped update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unimm.train import step as step_lib


class QuadraticTask:
  """loss = Σ (params − target)² over two params: plain numbers to follow by hand."""

  def init(self, rng, batch):
    del batch
    a, b = jax.random.split(rng)
    return {"a": jax.random.normal(a, (3,)), "b": jax.random.normal(b, (2,))}

  def loss_terms(self, params, batch, rng, step):
    del rng, step
    return {"loss": sum(jnp.sum((params[k] - batch[k]) ** 2) for k in ("a", "b"))}

  def loss_counts(self, batch):
    del batch
    return {}

  def combine(self, sums, counts):
    del counts
    return sums["loss"], {}


def run(decay: float, batches: list[dict], trainable=(), skip_nonfinite=False):
  task, optimizer = QuadraticTask(), optax.sgd(0.1)
  partition = step_lib.Partition(trainable)
  state = step_lib.init_state(task, optimizer, jax.random.key(0), None, partition, ema=True)
  step = jax.jit(step_lib.make_train_step(task, optimizer, lambda s: 0.1, partition=partition, ema_decay=decay,
                                          skip_nonfinite=skip_nonfinite))
  params = [jax.device_get(state.params)]
  for batch in batches:
    state, _ = step(state, batch, jax.random.key(1))
    params.append(jax.device_get(state.params))
  return state, params


def numpy_ema(decay: float, params: list[dict], keys) -> dict:
  """ema₀ = p₀; after update n (0-based): β = min(decay, (1 + n) / (10 + n)), ema ← β·ema + (1 − β)·pₙ₊₁."""
  ema = {k: np.asarray(params[0][k], np.float64) for k in keys}
  for n, p in enumerate(params[1:]):
    beta = min(decay, (1 + n) / (10 + n))
    ema = {k: beta * ema[k] + (1 - beta) * np.asarray(p[k], np.float64) for k in keys}
  return ema


def targets(count: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{"a": rng.normal(size=3).astype(np.float32), "b": rng.normal(size=2).astype(np.float32)}
          for _ in range(count)]


def test_ema_follows_the_warm_up_rule():
  state, params = run(0.5, targets(6))  # β: 0.1, 0.18, 0.25, 0.31, 0.36, then the cap 0.5 from n = 8 on
  want = numpy_ema(0.5, params, ("a", "b"))
  for k in ("a", "b"):
    assert state.ema[k].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(state.ema[k]), want[k], rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(state.ema["a"]), params[-1]["a"])  # an average, not the last weights
  assert float(step_lib.ema_decay_at(0.999, 0)) == np.float32(0.1)
  assert float(step_lib.ema_decay_at(0.5, 100)) == 0.5


def test_ema_covers_the_trainable_params_and_a_skipped_update_leaves_it():
  batches = targets(3)
  batches.insert(2, {"a": np.full(3, np.nan, np.float32), "b": np.zeros(2, np.float32)})  # non-finite: skipped
  state, params = run(0.9, batches, trainable=("a",), skip_nonfinite=True)
  assert set(state.ema) == {"a"}  # frozen params need no average
  kept = params[:3] + params[4:]  # the skipped update changed nothing, and the EMA did not move either
  np.testing.assert_array_equal(params[3]["a"], params[2]["a"])
  want = numpy_ema(0.9, kept, ("a",))
  # The skip still counts as an update for the warm-up (the step counter moves): follow it by hand.
  ema = np.asarray(kept[0]["a"], np.float64)
  for n, p in zip((0, 1, 3), kept[1:]):
    beta = min(0.9, (1 + n) / (10 + n))
    ema = beta * ema + (1 - beta) * np.asarray(p["a"], np.float64)
  np.testing.assert_allclose(np.asarray(state.ema["a"]), ema, rtol=1e-6, atol=1e-6)
  assert not np.allclose(ema, want["a"])  # the hand recurrence is the one that knows about the skip
  merged = step_lib.with_ema(params[-1], state.ema)
  np.testing.assert_allclose(merged["a"], np.asarray(state.ema["a"]))
  np.testing.assert_array_equal(merged["b"], params[-1]["b"])
