"""AdamW with linear warm-up, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import optax


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then cosine to `final_learning_rate` at `num_steps`."""
  t = train_config
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(t.learning_rate), warmup_steps=int(t.warmup_steps),
      decay_steps=max(int(t.num_steps), int(t.warmup_steps) + 1), end_value=float(t.final_learning_rate))


def _decay_mask(params):
  """Weight decay on matrices only (not norms' scales or other vectors)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
  t = train_config
  return optax.chain(
      optax.clip_by_global_norm(float(t.grad_clip)) if t.grad_clip else optax.identity(),
      optax.adamw(learning_rate_schedule(t), b1=float(t.b1), b2=float(t.b2), eps=float(t.eps),
                  weight_decay=float(t.weight_decay), mask=_decay_mask),
  )
