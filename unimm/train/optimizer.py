"""AdamW with linear warm-up, cosine decay, global-norm clipping and weight decay by parameter kind (optax).

Weight decay applies to what a parameter *is*, read from its '/'-joined path (the same with `scan` on
or off: scanned layers only gain a leading axis): the kernels of dense and convolution layers decay;
norm scales and biases, embedding tables, position embeddings, VQ codebooks, learned probes and
SigLIP's temperature and bias do not (common practice: GPT-2/Llama, big_vision). It is configurable as
big_vision's `wd_mults`: `config.train.wd_mults`, pairs of (regex over the path, multiplier of
`weight_decay`); the first pattern that matches (`re.fullmatch`) gives a parameter's multiplier, no
match gives 0. The default is `DEFAULT_WD_MULTS`: every `…/kernel` decays at the full rate.
"""

from __future__ import annotations

import functools
import re

from typing import TYPE_CHECKING

import jax
import optax

if TYPE_CHECKING:
  from unimm.train import settings

DEFAULT_WD_MULTS = ((r"(.*/)?kernel", 1.0),)


def learning_rate_schedule(t: "settings.TrainSettings") -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then cosine to `final_learning_rate` at `num_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=max(t.num_steps, t.warmup_steps + 1), end_value=t.final_learning_rate)


def path_name(key_path) -> str:
  """A pytree key path as a '/'-joined parameter path ('decoder/layers/attn/q/kernel'); the attribute
  keys of logical-axis boxes (`.value`) are not part of a parameter's name."""
  parts = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
  return "/".join(parts)


@functools.lru_cache(maxsize=4096)
def decay_multiplier(path: str, wd_mults: tuple) -> float:
  """The weight-decay multiplier of the parameter at `path` under `wd_mults` (see the module doc)."""
  for pattern, mult in wd_mults:
    if re.fullmatch(pattern, path):
      return float(mult)
  return 0.0


def wd_mults_of(entries) -> tuple:
  """`config.train.wd_mults` entries as a hashable tuple of (pattern, multiplier); the default rule if None."""
  if entries is None:
    return DEFAULT_WD_MULTS
  out = []
  for entry in entries:
    if len(entry) != 2:
      raise ValueError(f"config.train.wd_mults entry {entry!r}: expected (path regex, multiplier)")
    re.compile(entry[0])  # a bad pattern fails here, naming itself
    out.append((str(entry[0]), float(entry[1])))
  return tuple(out)


def decay_multipliers(params, wd_mults: tuple = DEFAULT_WD_MULTS):
  """A pytree like `params` holding each leaf's weight-decay multiplier."""
  return jax.tree_util.tree_map_with_path(lambda p, _: decay_multiplier(path_name(p), wd_mults), params)


def add_decayed_weights_by_path(weight_decay: float, wd_mults: tuple) -> optax.GradientTransformation:
  """optax.add_decayed_weights with a per-parameter multiplier from its path (0: no decay)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params):
    mults = decay_multipliers(params, wd_mults)
    return jax.tree.map(lambda u, p, m: u + (weight_decay * m) * p if m else u, updates, params, mults), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(t: "settings.TrainSettings") -> optax.GradientTransformation:
  """AdamW as optax.adamw composes it (Adam, then decoupled decay, then the learning rate)."""
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
      optax.chain(
          optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps),
          add_decayed_weights_by_path(t.weight_decay, t.wd_mults),
          optax.scale_by_learning_rate(learning_rate_schedule(t))),
  )
