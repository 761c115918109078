"""Flash attention for the mixed mask in Pallas (Triton on GPU), forward and backward.

The mask is computed inside the kernel from the ids — the attention rule of docs/design.md
``seg[q] == seg[k] != 0 and (k <= q or img[q] == img[k] != 0)`` — so nothing
T×T ever touches memory, and blocks no query of a block can see are never
visited. Which blocks those are comes from O(T) spans computed beforehand
(`visible_spans`): the keys a query may see lie in ``[first position of its
document, max(q, last position of its image)]`` and the queries that see a key
in ``[min(k, first position of its image), last position of its document]``.
The spans hold for any ids (they use first/last occurrences, not contiguity),
so skipping never drops a visible key; for packed rows they are tight, which
makes a text-only row cost what causal flash attention costs and an image add
only its own square. Inside the visited range, a tile whose queries all see all
its keys (one document, keys before the queries or all one image: most tiles,
told from the ids' min/max per block) skips the mask arithmetic.

The algorithm is FlashAttention-2's: the forward loops over key blocks with an
online softmax (base 2) and saves the log-sum-exp. The backward runs one program
per key block that accumulates dK/dV over the query blocks that see it; dQ is
made one of two ways (block_q == block_k there):

* deterministic (the default): the same program then accumulates dQ of its own
  query block over the key blocks those queries see, recomputing P and dS: 7
  matmuls per visible tile pair, every sum in a fixed order, so a resumed run
  repeats its loss curve bit for bit;
* `atomic_dq=True` (FlashAttention-2's): each tile's dS·K is added to dQ in
  float32 with atomic adds while dK/dV accumulate: 5 matmuls per tile pair, but
  the order of the adds is the GPU's, so gradients (and a run) differ in their
  last bits from run to run. Selected as attention implementation
  `pallas_atomic`; which is faster is for a GPU to measure (bench/attention.py).

Grouped-query attention maps query head n to key head n // (N / K); dK/dV are
summed over the group outside the kernel. `interpret=True` runs the same
kernels on CPU (tests), where the atomic adds are plain adds in grid order.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from unimm.kernels import RESIDUALS

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: an all-masked block must not produce inf - inf
LOG2_E = math.log2(math.e)


def visible_spans(segment_ids, image_ids, *, bidirectional_images: bool = True):
  """Per query the key range [lo, hi) it may see; per key the query range that may see it.

  Returns (kv_lo, kv_hi, q_lo, q_hi), int32 [B, T]. Padding (segment 0) gets the
  empty range [T, 0), so a block of padding visits nothing.
  """
  length = segment_ids.shape[-1]

  def row(seg, img):
    pos = jnp.arange(length, dtype=jnp.int32)
    first_seg = jax.ops.segment_min(pos, seg, num_segments=length + 1)[seg]
    last_seg = jax.ops.segment_max(pos, seg, num_segments=length + 1)[seg]
    in_image = (img != 0) & bidirectional_images
    first_img = jax.ops.segment_min(pos, img, num_segments=length + 1)[img]
    last_img = jax.ops.segment_max(pos, img, num_segments=length + 1)[img]
    kv_lo, kv_hi = first_seg, jnp.where(in_image, jnp.maximum(pos, last_img), pos) + 1
    q_lo, q_hi = jnp.where(in_image, jnp.minimum(pos, first_img), pos), last_seg + 1
    pad = seg == 0
    empty_lo, empty_hi = jnp.int32(length), jnp.int32(0)
    return (jnp.where(pad, empty_lo, kv_lo), jnp.where(pad, empty_hi, kv_hi),
            jnp.where(pad, empty_lo, q_lo), jnp.where(pad, empty_hi, q_hi))

  return jax.vmap(row)(segment_ids.astype(jnp.int32), image_ids.astype(jnp.int32))


def _block_range(lo_ref, hi_ref, block: int):
  """The blocks [first, last) covering the union of the per-position ranges in a block."""
  lo, hi = jnp.min(lo_ref[...]), jnp.max(hi_ref[...])
  return lax.div(lo, block), lax.div(hi + block - 1, block)


def _ids_summary(seg, img):
  """(min, max) of a block's segment and image ids: enough to tell a tile every query fully sees."""
  return jnp.min(seg), jnp.max(seg), jnp.min(img), jnp.max(img)


def _tile_is_full(q_ids, q_first, k_ids, k_last, bidirectional_images: bool):
  """Whether every query of the tile sees every key: one document throughout, and the keys all at or
  before the first query (or everything one image). Such tiles (most of them) skip the mask."""
  q_seg_lo, q_seg_hi, q_img_lo, q_img_hi = q_ids
  k_seg_lo, k_seg_hi, k_img_lo, k_img_hi = k_ids
  one_document = (q_seg_lo == q_seg_hi) & (q_seg_lo != 0) & (k_seg_lo == q_seg_lo) & (k_seg_hi == q_seg_lo)
  seen = k_last <= q_first
  if bidirectional_images:
    seen = seen | ((q_img_lo == q_img_hi) & (q_img_lo != 0) & (k_img_lo == q_img_lo) & (k_img_hi == q_img_lo))
  return one_document & seen


def _mask(q_seg, q_img, q_pos, k_seg, k_img, k_pos, bidirectional_images: bool):
  """the attention rule (docs/design.md) on one [bq, bk] tile."""
  allowed = k_pos[None, :] <= q_pos[:, None]
  if bidirectional_images:
    allowed = allowed | ((q_img[:, None] == k_img[None, :]) & (q_img[:, None] != 0))
  return (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] != 0) & allowed


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, img_ref, kv_lo_ref, kv_hi_ref, o_ref, lse_ref, *,
                    scale: float, block_q: int, block_k: int, bidirectional_images: bool):
  i = pl.program_id(0)
  q = q_ref[...]
  q_pos = i * block_q + jnp.arange(block_q)
  q_slice = pl.ds(i * block_q, block_q)
  q_seg, q_img = seg_ref[q_slice], img_ref[q_slice]
  q_ids = _ids_summary(q_seg, q_img)
  qk_scale = scale * LOG2_E  # exp2 below: e^x = 2^(x·log2 e)

  def body(j, carry):
    acc, m_prev, l_prev = carry
    k_slice = pl.ds(j * block_k, block_k)
    k, v = k_ref[k_slice, :], v_ref[k_slice, :]
    k_seg, k_img = seg_ref[k_slice], img_ref[k_slice]
    s = plgpu.dot(q, k, trans_b=True) * qk_scale

    def every_key():
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
      return jnp.exp2(s - m_next[:, None]), m_next

    def some_keys():
      mask = _mask(q_seg, q_img, q_pos, k_seg, k_img, j * block_k + jnp.arange(block_k), bidirectional_images)
      masked = jnp.where(mask, s, MASKED)
      m_next = jnp.maximum(m_prev, jnp.max(masked, axis=1))
      return jnp.where(mask, jnp.exp2(masked - m_next[:, None]), 0.0), m_next

    full = _tile_is_full(q_ids, i * block_q, _ids_summary(k_seg, k_img), j * block_k + block_k - 1,
                         bidirectional_images)
    p, m_next = lax.cond(full, every_key, some_keys)
    correction = jnp.exp2(m_prev - m_next)
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_next, l_prev * correction + jnp.sum(p, axis=1)

  first, last = _block_range(kv_lo_ref, kv_hi_ref, block_k)
  acc = jnp.zeros((block_q, q.shape[-1]), jnp.float32)
  m = jnp.full((block_q,), MASKED, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = lax.fori_loop(first, last, body, (acc, m, l))
  seen = l > 0  # rows with no visible key (padding) come out 0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log2(l_safe), 0.0)  # base 2


def _backward_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, img_ref,
                     kv_lo_ref, kv_hi_ref, q_lo_ref, q_hi_ref, *out_refs,
                     scale: float, block: int, bidirectional_images: bool, atomic_dq: bool):
  # atomic_dq: out_refs start with the zeros dQ is accumulated into (aliased to the dQ output, [T, H] f32).
  dq_ref, dk_ref, dv_ref = out_refs[-3:]
  j = pl.program_id(2)
  own = pl.ds(j * block, block)
  own_seg, own_img = seg_ref[own], img_ref[own]
  qk_scale = scale * LOG2_E

  def tile(q, k, v, do, lse, delta, q_ids, k_ids, q_block, k_block):
    """P and dS of one [block, block] tile (the mask only where the tile is not fully visible)."""
    p = jnp.exp2(plgpu.dot(q, k, trans_b=True) * qk_scale - lse[:, None])
    q_pos, k_pos = q_block * block + jnp.arange(block), k_block * block + jnp.arange(block)
    full = _tile_is_full(_ids_summary(*q_ids), q_block * block, _ids_summary(*k_ids), k_block * block + block - 1,
                         bidirectional_images)
    p = lax.cond(full, lambda: p, lambda: jnp.where(_mask(*q_ids, q_pos, *k_ids, k_pos, bidirectional_images), p, 0.0))
    dp = plgpu.dot(do, v, trans_b=True)
    return p, p * (dp - delta[:, None]) * scale

  # dK, dV of key block j: over the query blocks that see it.
  k, v = k_ref[own, :], v_ref[own, :]

  def over_queries(i, carry):
    dk, dv = carry
    sl = pl.ds(i * block, block)
    q, do = q_ref[sl, :], do_ref[sl, :]
    p, ds = tile(q, k, v, do, lse_ref[sl], delta_ref[sl], (seg_ref[sl], img_ref[sl]), (own_seg, own_img), i, j)
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
    if atomic_dq:
      plgpu.atomic_add(dq_ref, (sl, slice(None)), plgpu.dot(ds.astype(k.dtype), k))
    return dk, dv

  zeros = jnp.zeros((block, k.shape[-1]), jnp.float32)
  first, last = _block_range(q_lo_ref, q_hi_ref, block)
  dk, dv = lax.fori_loop(first, last, over_queries, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  if atomic_dq:
    return

  # dQ of query block j: over the key blocks its queries see.
  q, do, lse, delta = q_ref[own, :], do_ref[own, :], lse_ref[own], delta_ref[own]

  def over_keys(i, dq):
    sl = pl.ds(i * block, block)
    kb, vb = k_ref[sl, :], v_ref[sl, :]
    _, ds = tile(q, kb, vb, do, lse, delta, (own_seg, own_img), (seg_ref[sl], img_ref[sl]), j, i)
    return dq + plgpu.dot(ds.astype(kb.dtype), kb)

  first, last = _block_range(kv_lo_ref, kv_hi_ref, block)
  dq = lax.fori_loop(first, last, over_keys, zeros)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _check(q, k, block_q, block_k, block_backward):
  _, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if k.shape[1] != length:
    raise ValueError(f"mixed flash attention is for training rows (keys = queries): {k.shape[1]} keys, "
                     f"{length} queries; decoding with a KV cache uses the xla/cudnn path")
  if heads % kv_heads:
    raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
  if head_dim < 16 or head_dim & (head_dim - 1):
    raise ValueError(f"head_dim {head_dim}: the Pallas kernel needs a power of two ≥ 16; use attention='xla'")
  for name, b in (("block_q", block_q), ("block_k", block_k), ("block_backward", block_backward)):
    if b & (b - 1):
      raise ValueError(f"{name}={b} (the sequence length {length} when shorter): Triton blocks are powers of "
                       "two; pad the rows to a multiple of 128 or use attention='xla'")
    if length % b:
      raise ValueError(f"sequence length {length} is not a multiple of {name}={b}; pick a length that is "
                       "(a multiple of 128 works with the defaults) or attention='xla'")


def _blocks(length: int, block_q: int, block_k: int, block_backward: int):
  return min(block_q, length), min(block_k, length), min(block_backward, length)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11, 12))
def mixed_flash_attention(q, k, v, segment_ids, image_ids, bidirectional_images: bool = True,
                          block_q: int = 128, block_k: int = 64, block_backward: int = 64,
                          num_warps: int | None = None, num_stages: int = 2, interpret: bool = False,
                          atomic_dq: bool = False):
  """q [B, T, N, H], k/v [B, T, K, H], ids [B, T] → [B, T, N, H] under the attention rule (docs/design.md).

  Rows with no visible key (padding) come out 0. `atomic_dq`: the backward's dQ by atomic adds (see the
  module docstring: fewer matmuls, not bit-reproducible on a GPU).
  """
  return _forward(q, k, v, segment_ids, image_ids, bidirectional_images, block_q, block_k, block_backward,
                  num_warps, num_stages, interpret, atomic_dq)[0]


def _forward(q, k, v, segment_ids, image_ids, bidirectional_images, block_q, block_k, block_backward,
             num_warps, num_stages, interpret, atomic_dq):
  del atomic_dq  # the backward's
  batch, length, heads, head_dim = q.shape
  block_q, block_k, block_backward = _blocks(length, block_q, block_k, block_backward)
  _check(q, k, block_q, block_k, block_backward)
  group = heads // k.shape[2]
  segment_ids, image_ids = segment_ids.astype(jnp.int32), image_ids.astype(jnp.int32)
  kv_lo, kv_hi, _, _ = visible_spans(segment_ids, image_ids, bidirectional_images=bidirectional_images)
  row = pl.BlockSpec((None, length), lambda i, b, n: (b, 0))
  q_block = pl.BlockSpec((None, block_q), lambda i, b, n: (b, i))
  kv = pl.BlockSpec((None, length, None, head_dim), lambda i, b, n: (b, 0, n // group, 0))
  kernel = functools.partial(_forward_kernel, scale=head_dim ** -0.5, block_q=block_q, block_k=block_k,
                             bidirectional_images=bidirectional_images)
  out, lse = pl.pallas_call(
      kernel,
      grid=(length // block_q, batch, heads),
      in_specs=[pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)), kv, kv,
                row, row, q_block, q_block],
      out_specs=[pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
                 pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
      compiler_params=_compiler_params(num_warps or (4 if head_dim <= 64 else 8), num_stages, interpret),
      interpret=interpret,
      name="mixed_flash_forward",
  )(q, k, v, segment_ids, image_ids, kv_lo, kv_hi)
  # Named (the output itself too: the next projection's backward needs it), so remat policy
  # `qkv_attention` can keep them instead of running this kernel again in the backward pass.
  out, lse = checkpoint_name(out, RESIDUALS), checkpoint_name(lse, RESIDUALS)
  return out, (q, k, v, segment_ids, image_ids, out, lse)


def _backward(bidirectional_images, block_q, block_k, block_backward, num_warps, num_stages, interpret,
              atomic_dq, residuals, d_out):
  q, k, v, segment_ids, image_ids, out, lse = residuals
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  _, _, block = _blocks(length, block_q, block_k, block_backward)
  d_out = d_out.astype(q.dtype)
  # D_i = dO_i · O_i, the softmax backward's row term; XLA fuses this reduction.
  delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32))
  spans = visible_spans(segment_ids, image_ids, bidirectional_images=bidirectional_images)
  row = pl.BlockSpec((None, length), lambda b, n, j: (b, 0))
  own = pl.BlockSpec((None, block), lambda b, n, j: (b, j))
  full_q = pl.BlockSpec((None, length, None, head_dim), lambda b, n, j: (b, 0, n, 0))
  full_kv = pl.BlockSpec((None, length, None, head_dim), lambda b, n, j: (b, 0, n // group, 0))
  stats = pl.BlockSpec((None, None, length), lambda b, n, j: (b, n, 0))
  out_block = pl.BlockSpec((None, block, None, head_dim), lambda b, n, j: (b, j, n, 0))
  kernel = functools.partial(_backward_kernel, scale=head_dim ** -0.5, block=block,
                             bidirectional_images=bidirectional_images, atomic_dq=atomic_dq)
  inputs = [q, k, v, d_out, lse, delta, segment_ids, image_ids, *spans]
  in_specs = [full_q, full_kv, full_kv, full_q, stats, stats, row, row, own, own, own, own]
  # dQ: its own query block per program, in q's dtype; or (atomic) the whole row's in float32, every
  # program adding into it, starting from zeros. dK/dV per query head, summed over each group below.
  dq_spec, dq_shape = out_block, jax.ShapeDtypeStruct(q.shape, q.dtype)
  if atomic_dq:
    dq_spec, dq_shape = full_q, jax.ShapeDtypeStruct(q.shape, jnp.float32)
    inputs.append(jnp.zeros(q.shape, jnp.float32))
    in_specs.append(full_q)
  dq, dk, dv = pl.pallas_call(
      kernel,
      grid=(batch, heads, length // block),
      in_specs=in_specs,
      out_specs=[dq_spec, out_block, out_block],
      out_shape=[dq_shape, jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(q.shape, jnp.float32)],
      input_output_aliases={len(inputs) - 1: 0} if atomic_dq else {},
      compiler_params=_compiler_params(num_warps or (4 if block * block < 128 * 128 else 8), num_stages,
                                       interpret),
      interpret=interpret,
      name="mixed_flash_backward_atomic_dq" if atomic_dq else "mixed_flash_backward",
  )(*inputs)
  dq = dq.astype(q.dtype)
  dk = dk.reshape(batch, length, kv_heads, group, head_dim).sum(3).astype(k.dtype)
  dv = dv.reshape(batch, length, kv_heads, group, head_dim).sum(3).astype(v.dtype)
  return dq, dk, dv, None, None


def _compiler_params(num_warps: int, num_stages: int, interpret: bool):
  if interpret:
    return None
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


mixed_flash_attention.defvjp(_forward, _backward)
