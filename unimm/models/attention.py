"""Attention over packed rows: the one function every layer calls.

The rule is DESIGN.md's (`unimm.data.packed.attention_mask`): causal, no
attention across packed documents, and — for families that read images as a
whole (Transfusion) — bidirectional inside each image. Kernels are chosen by
`implementation`:

* ``xla``: the reference; a dense boolean mask through XLA (any backend).
* ``cudnn``: the same dense mask through cuDNN's fused attention (GPU).
* ``auto``: cudnn on GPU, xla elsewhere.

Faster kernels (in-kernel masks from the ids, block skipping) drop in here,
tested against ``xla`` on random packs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimm.data.packed import attention_mask

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def resolve_implementation(implementation: str) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
  if implementation == "auto":
    return "cudnn" if jax.default_backend() == "gpu" else "xla"
  return implementation


def attend(q, k, v, segment_ids, image_ids, *, bidirectional_images: bool = True,
           implementation: str = "auto", key_segment_ids=None, key_image_ids=None, query_offset=0):
  """q [B, T, N, H], k/v [B, S, K, H] (K divides N) → [B, T, N, H].

  Without key ids, keys are the queries' own row (S = T, training). With a KV
  cache, keys are the cache's S slots with their ids and the queries sit at
  slots `query_offset + t`. Rows that may attend to nothing (padding) come out
  finite but meaningless; losses exclude them through their zero weights.
  """
  impl = resolve_implementation(implementation)
  mask = attention_mask(segment_ids, image_ids, bidirectional_images=bidirectional_images,
                        key_segment_ids=key_segment_ids, key_image_ids=key_image_ids,
                        query_offset=query_offset)[:, None]
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def reference_attention(q, k, v, segment_ids, image_ids, *, bidirectional_images: bool = True):
  """Plain float32 softmax attention with the rule's mask, for tests."""
  mask = attention_mask(segment_ids, image_ids, bidirectional_images=bidirectional_images)
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)
  v = jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum("bqnh,bknh->bnqk", q.astype(jnp.float32), k.astype(jnp.float32)) / q.shape[-1] ** 0.5
  logits = jnp.where(mask[:, None], logits, -1e30)
  return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(logits, axis=-1), v.astype(jnp.float32))
