"""The mixed mask through TPU splash attention (Pallas/Mosaic), forward and backward.

Splash takes a mask per head and skips the blocks it rules out. The mixed rule
depends on the row (where its documents and images are), so each row gets a
dynamic mask built from its ids — the attention rule of docs/design.md, exactly — and its own
block-sparsity tables (splash's `process_dynamic_mask`, on device, O(T²) bits
per row: 16 MiB at T=4096, next to the T×T×heads float scores XLA would hold).
One mask serves every head. Padding queries see only themselves (splash would
divide by zero on an empty row); their outputs are meaningless and unused, as
on the xla path. `interpret=True` runs the Mosaic kernels on CPU (tests).
"""

from __future__ import annotations

import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
import jax.numpy as jnp

from unimm.data.packed import attention_mask
from unimm.kernels import RESIDUALS


def _mask(segment_ids, image_ids, bidirectional_images: bool):
  mask = attention_mask(segment_ids, image_ids, bidirectional_images=bidirectional_images)
  padding_self = (segment_ids == 0)[..., :, None] & jnp.eye(segment_ids.shape[-1], dtype=bool)
  return mask | padding_self


def block_for(length: int, block: int = 512) -> int:
  """The largest multiple of 128 that is at most `block` and divides `length` (splash tiles rows by it);
  0 if none does (the length is not a multiple of 128)."""
  for b in range(min(block, length) // 128 * 128, 0, -128):
    if length % b == 0:
      return b
  return 0


def _block_sizes(b: int) -> splash.BlockSizes:
  return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def _row_kernel(mask, block_sizes, interpret):
  kernel = splash.make_splash_mha(mask[None], block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                  residual_checkpoint_name=RESIDUALS, interpret=interpret)
  # Built under jit, the mask infos' `is_dynamic_mask` flag becomes a traced bool that the kernel's
  # __call__ then branches on; it is a Python fact here.
  flag = lambda info: None if info is None else info._replace(is_dynamic_mask=True)  # pylint: disable=protected-access
  return splash.SplashAttentionKernel(flag(kernel.fwd_mask_info), flag(kernel.dq_mask_info),
                                      flag(kernel.dkv_mask_info), **kernel.kwargs)


def splash_mixed_attention(q, k, v, segment_ids, image_ids, *, bidirectional_images: bool = True,
                           block: int = 512, interpret: bool = False):
  """q [B, T, N, H], k/v [B, T, K, H] (K divides N), ids [B, T] → [B, T, N, H]. Tiles of the largest
  multiple of 128 up to `block` that divides T (T = 640 runs in blocks of 128)."""
  length, head_dim = q.shape[1], q.shape[3]
  if k.shape[1] != length:
    raise ValueError(f"splash attention here is for training rows (keys = queries): {k.shape[1]} keys, "
                     f"{length} queries; decoding with a KV cache uses the xla path")
  b = block_for(length, block)
  if not b:
    raise ValueError(f"sequence length {length}: TPU splash tiles rows in blocks of a multiple of 128, so the "
                     "length must be a multiple of 128; use attention='xla' (or set data.seq_len to one)")
  block_sizes = _block_sizes(b)
  mask = _mask(segment_ids, image_ids, bidirectional_images)

  def row(q, k, v, mask):  # [N, T, H] per row, as splash wants
    return _row_kernel(mask, block_sizes, interpret)(q, k, v)

  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.vmap(row)(heads_first(q * head_dim ** -0.5), heads_first(k), heads_first(v), mask)
  return heads_first(out)
