"""Attention over packed rows: the one function every layer calls.

The rule is docs/design.md's (`unimm.data.packed.attention_mask`): causal, no
attention across packed documents, and — for families that read images as a
whole (Transfusion) — bidirectional inside each image. Kernels are chosen by
`implementation` (`config.model.backbone.attention`):

* ``xla``: the reference; a dense boolean mask through XLA (any backend).
* ``cudnn``: the same dense mask through cuDNN's fused attention (GPU). Fast for
  a causal mask, ~2.8× slower with the mixed one (a dense mask is read per tile).
* ``pallas``: `unimm.kernels.mixed_flash` — flash attention in Pallas/Triton
  with the mask computed in-kernel from the ids and the blocks nobody sees
  skipped (GPU; on CPU it runs interpreted, for tests).
* ``pallas_atomic``: the same kernel with FlashAttention-2's backward, dQ
  accumulated by atomic adds (5 matmuls per visible tile pair instead of 7),
  at the price of gradients that are not bit-reproducible on a GPU: a resumed
  run no longer repeats its loss curve exactly (`unimm.kernels.mixed_flash`).
* ``splash``: `unimm.kernels.splash` — TPU splash attention with a per-row
  dynamic mask (TPU; interpreted on CPU).
* ``auto``: cudnn on GPU, splash on TPU, xla on CPU — on TPU for training rows
  whose shapes splash takes (else xla). GPU picks cuDNN with the dense mask, the
  path that has run on a GPU (the 0.37B model measured 22% MFU with it on an
  H200); the Pallas kernel has only been lowered to Triton IR on CPU, so it is
  chosen by name (``pallas``) until a GPU run shows it compiles, matches the
  reference and is faster. With a KV cache (decoding) the dense-mask paths
  serve: a few queries against the cache.

Under a mesh the kernels run per shard (`shard_map`): rows split over the batch
axes, heads over `tensor`; a sharded sequence axis needs every key, so `auto`
uses the dense-mask path there and an explicit kernel is refused.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm.data.packed import attention_mask
from unimm.models import axes

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "pallas_atomic", "splash")
KERNEL_BACKENDS = {"pallas": "gpu", "pallas_atomic": "gpu", "splash": "tpu"}
# What `auto` runs per platform for training rows; the dense-mask path where it is None or cannot serve.
AUTO_KERNELS = {"tpu": "splash"}


def kernel_takes(implementation: str, length: int, head_dim: int) -> bool:
  """Whether the kernel's block constraints admit these shapes (with its default blocks)."""
  if implementation in ("pallas", "pallas_atomic"):
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and length % 128 == 0
  if implementation == "splash":
    return length % 128 == 0  # unimm.kernels.splash picks a block (512, 256 or 128) that divides it
  return True


def target_platform() -> str:
  """gpu, tpu or cpu: the platform of the mesh being traced for (compiling for a TPU slice on a CPU host
  picks the TPU kernel), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  platform = getattr(device, "platform", None) or jax.default_backend()
  return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def resolve_implementation(implementation: str, *, length: int = 0, head_dim: int = 0, decode: bool = False,
                           sequence_sharded: bool = False) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
  backend = target_platform()
  dense = "cudnn" if backend == "gpu" else "xla"
  if implementation == "auto":
    kernel = AUTO_KERNELS.get(backend)
    if kernel is None or decode or sequence_sharded or not kernel_takes(kernel, length, head_dim):
      return dense
    return kernel
  if implementation in KERNEL_BACKENDS and (decode or sequence_sharded):
    raise ValueError(f"attention={implementation!r} runs training rows with the whole sequence on each device; "
                     f"{'decoding with a KV cache' if decode else 'a sharded sequence axis (mesh.sequence > 1)'} "
                     "needs attention='auto' (or 'xla'/'cudnn')")
  return implementation


def _mesh_specs():
  """(mesh, the logical specs of q and k/v) when tracing under a mesh with logical rules; else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  specs = tuple(nn.logical_to_mesh_axes(names) for names in (
      (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, None),
      (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_KV_HEADS, None)))
  return mesh, specs


def _axes_size(mesh, axes) -> int:
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  return n


def _kernel_specs(mesh_specs, q, k):
  """shard_map specs for (q, k, v, seg, img) and the output: rows over the batch axes, heads over
  `tensor`, the sequence whole. An axis that does not divide its dimension (a one-row init batch over
  fsdp, 2 key heads over tensor=4) is dropped: that dimension is computed whole on every device."""
  mesh, (q_spec, kv_spec) = mesh_specs
  batch = q_spec[0] if q.shape[0] % _axes_size(mesh, q_spec[0]) == 0 else None
  heads = q_spec[2] if (q_spec[2] == kv_spec[2] and q.shape[2] % _axes_size(mesh, q_spec[2]) == 0
                        and k.shape[2] % _axes_size(mesh, kv_spec[2]) == 0) else None
  qkv = jax.sharding.PartitionSpec(batch, None, heads, None)
  ids = jax.sharding.PartitionSpec(batch, None)
  return (qkv, qkv, qkv, ids, ids), qkv


def _sequence_sharded(mesh_specs) -> bool:
  if mesh_specs is None:
    return False
  mesh, (q_spec, _) = mesh_specs
  return _axes_size(mesh, q_spec[1]) > 1


def _kernel(implementation: str, bidirectional_images: bool):
  interpret = target_platform() != KERNEL_BACKENDS[implementation]  # CPU: the same kernel, interpreted
  if implementation in ("pallas", "pallas_atomic"):
    from unimm.kernels import mixed_flash  # pylint: disable=g-import-not-at-top
    return lambda q, k, v, seg, img: mixed_flash.mixed_flash_attention(
        q, k, v, seg, img, bidirectional_images, interpret=interpret, atomic_dq=implementation == "pallas_atomic")
  from unimm.kernels import splash  # pylint: disable=g-import-not-at-top
  return lambda q, k, v, seg, img: splash.splash_mixed_attention(
      q, k, v, seg, img, bidirectional_images=bidirectional_images, interpret=interpret)


def attend(q, k, v, segment_ids, image_ids, *, bidirectional_images: bool = True,
           implementation: str = "auto", key_segment_ids=None, key_image_ids=None, query_offset=0):
  """q [B, T, N, H], k/v [B, S, K, H] (K divides N) → [B, T, N, H].

  Without key ids, keys are the queries' own row (S = T, training). With a KV
  cache, keys are the cache's S slots with their ids and the queries sit at
  slots `query_offset + t`. Rows that may attend to nothing (padding) come out
  finite but meaningless; losses exclude them through their zero weights.
  """
  decode = key_segment_ids is not None
  mesh_specs = _mesh_specs()
  impl = resolve_implementation(implementation, length=q.shape[1], head_dim=q.shape[-1], decode=decode,
                                sequence_sharded=_sequence_sharded(mesh_specs))
  if impl in KERNEL_BACKENDS:
    kernel = _kernel(impl, bidirectional_images)
    if mesh_specs is not None:
      in_specs, out_spec = _kernel_specs(mesh_specs, q, k)
      kernel = jax.shard_map(kernel, mesh=mesh_specs[0], in_specs=in_specs, out_specs=out_spec, check_vma=False)
    return kernel(q, k, v, segment_ids, image_ids)
  mask = attention_mask(segment_ids, image_ids, bidirectional_images=bidirectional_images,
                        key_segment_ids=key_segment_ids, key_image_ids=key_image_ids,
                        query_offset=query_offset)[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def reference_attention(q, k, v, segment_ids, image_ids, *, bidirectional_images: bool = True):
  """Plain float32 softmax attention with the rule's mask, for tests."""
  mask = attention_mask(segment_ids, image_ids, bidirectional_images=bidirectional_images)
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)
  v = jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum("bqnh,bknh->bnqk", q.astype(jnp.float32), k.astype(jnp.float32)) / q.shape[-1] ** 0.5
  logits = jnp.where(mask[:, None], logits, -1e30)
  return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(logits, axis=-1), v.astype(jnp.float32))
