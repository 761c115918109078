"""The shared transformer: a Llama-style decoder over packed multimodal rows.

RMSNorm, RoPE at the row's per-document positions (optionally scaled: linear,
Llama 3's), SwiGLU, optional QK-norm, grouped-query attention, no biases but
optional q/k/v ones (Qwen2). Chameleon's stability switches are here
too: QK-norm, dropout on each residual branch (active when the caller passes a
``dropout`` rng), and the Swin-style norm order ``h = x + norm(attn(x)); out =
h + norm(ffn(h))`` instead of pre-norm. Layers run under `nn.scan` (compile time
flat in depth) with a configurable remat policy. It consumes embeddings, not
token ids: each family decides what fills each slot (token embeddings, image
patches, codes) and what its outputs mean.

Modality-specific weights (Mixture-of-Transformers, Liang et al. 2024; LMFusion,
Shi et al. 2024): `mot` names the parts that get a second copy for image slots
(`image_ids > 0`) — "qkv", "out", "mlp", "norms" (every RMSNorm, the final one
and QK-norm's included). The copy is a sibling module named `<name>_image`
with the same logical axes (so it shards like its text twin), and each position
takes its own modality's output; attention stays one global attention over the
packed row. Both copies run on every position and the output is selected (exact;
the untied matmuls cost twice their active FLOPs in hardware), while the model
FLOPs count each token's copy only (`is_image_copy`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from unimm.kernels import RESIDUALS
from unimm.models import attention, axes, layers, settings

REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    # Keep projections (no batch dims in their dot), recompute attention scores.
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep only the named activations (checkpoint_name in Attention): less memory, the MLP recomputed.
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "qkv_out_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj",
                                                                  "out_proj"),
    # With a kernel (attention pallas/splash): also keep its output and log-sum-exp, so the backward
    # runs the kernel's backward only, not its forward again.
    "qkv_attention": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj",
                                                                   RESIDUALS),
}


MOT_PARTS = ("qkv", "out", "mlp", "norms")
QK_NORM_KINDS = ("rms", "head_layernorm")
IMAGE_COPY = "_image"  # the suffix of a module's image-slot copy


def is_image_copy(path: str) -> bool:
  """Whether the parameter at '/'-joined `path` lies in an image-slot copy (a token uses it or its twin)."""
  return any(part.endswith(IMAGE_COPY) for part in path.split("/")[:-1])


# The modules each untied part copies (at any depth of a backbone's params: scanned or per-layer).
PART_MODULES = {"qkv": ("q", "k", "v"), "out": ("o",), "mlp": ("mlp",),
                "norms": ("attn_norm", "mlp_norm", "q_norm", "k_norm", "final_norm")}


def with_image_copies(params: dict, parts) -> dict:
  """A backbone's params with each untied part's missing image copy set to its text weights (LMFusion's
  init: a pretrained LM's weights serve both modalities at step 0, then the image copy trains)."""
  names = {name for part in parts for name in PART_MODULES[part]}
  out = {}
  for key, value in params.items():
    out[key] = with_image_copies(value, parts) if isinstance(value, dict) else value
  for key in list(out):
    if key in names and isinstance(out[key], dict) and key + IMAGE_COPY not in out:
      out[key + IMAGE_COPY] = out[key]  # arrays are immutable: the copy diverges once it trains
  return out


def by_modality(make, name: str, untied: bool, is_image, *inputs):
  """`make(name)(*inputs)`; when `untied`, image slots (is_image [B, T]) take `make(name + "_image")`'s output."""
  out = make(name)(*inputs)
  if not untied:
    return out
  image_out = make(name + IMAGE_COPY)(*inputs)
  return jnp.where(is_image.reshape(is_image.shape + (1,) * (out.ndim - is_image.ndim)), image_out, out)


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  num_layers: int
  dim: int
  num_heads: int
  num_kv_heads: int = 0  # 0 = num_heads (plain multi-head attention)
  head_dim: int = 0  # 0 = dim // num_heads
  mlp_hidden: int = 0  # 0 = Llama's 8/3·dim rounded up to 256
  qk_norm: bool = False
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  dtype: str = "bfloat16"  # compute dtype; params stay float32
  remat: str = "dots_no_batch"
  scan: bool = True
  # The attention rule of docs/design.md; families that predict image codes in order switch it off.
  bidirectional_images: bool = True
  attention: str = "auto"
  dropout: float = 0.0  # on the attention and MLP branches, in training (a "dropout" rng is given)
  norm_order: str = "pre"  # pre: x + f(norm(x)) (Llama) | swin: x + norm(f(x)) (Chameleon-7B/34B)
  mot: tuple[str, ...] = ()  # parts with an image-slot copy (Mixture-of-Transformers): of MOT_PARTS; (): dense
  qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
  # QK-norm's kind: rms (an RMSNorm over head_dim shared by the heads, unimm's) | head_layernorm (a LayerNorm
  # per head with its own scale and bias [heads, head_dim], Chameleon's)
  qk_norm_kind: str = "rms"
  rope_scaling: str = "none"  # none | linear | llama3 (layers.RopeScaling, Hugging Face's definitions)
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192

  @classmethod
  def from_config(cls, cfg) -> "BackboneConfig":
    out = settings.from_config(cls, cfg, "config.model.backbone")
    if out.norm_order not in ("pre", "swin"):
      raise ValueError(f"backbone.norm_order {out.norm_order!r}; expected 'pre' or 'swin'")
    out = dataclasses.replace(out, mot=tuple(out.mot))
    if out.qk_norm_kind not in QK_NORM_KINDS:
      raise ValueError(f"backbone.qk_norm_kind {out.qk_norm_kind!r}; expected one of {QK_NORM_KINDS}")
    _ = out.rope  # an unknown scaling is refused here, not at the first trace
    unknown = [p for p in out.mot if p not in MOT_PARTS]
    if unknown:
      raise ValueError(f"config.model.backbone.mot={out.mot}: unknown parts {unknown}; expected a subset of "
                       f"{MOT_PARTS} (() for shared weights)")
    return out

  def untied(self, part: str) -> bool:
    return part in self.mot

  @property
  def rope(self) -> layers.RopeScaling:
    return layers.RopeScaling(self.rope_scaling, float(self.rope_scaling_factor), float(self.rope_low_freq_factor),
                              float(self.rope_high_freq_factor), int(self.rope_original_max_positions))

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.dim // self.num_heads

  @property
  def hidden(self) -> int:
    return self.mlp_hidden or layers.mlp_hidden(self.dim)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


class Attention(nn.Module):
  """Self-attention over a packed row; with `decode`, over a KV cache.

  The cache (collection ``cache``) holds keys, values and the slots' segment and
  image ids for S slots, S being the length of the call that created it
  (`init` with decode=True). Each later call writes its n inputs at the cache
  index and attends to every filled slot by the same rule, so a prompt, an
  image's slots or a single token can be fed in any chunking.
  """

  cfg: BackboneConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, image_ids):
    c = self.cfg
    dt = c.compute_dtype
    is_image = image_ids > 0
    q_axes, kv_axes = (axes.HEADS, axes.HEAD_DIM), (axes.KV_HEADS, axes.HEAD_DIM)

    def proj(heads, out_axes):
      return lambda name: layers.DenseGeneral((heads, c.head_size), (axes.EMBED,), out_axes, dtype=dt,
                                              use_bias=c.qkv_bias, name=name)
    q = by_modality(proj(c.num_heads, q_axes), "q", c.untied("qkv"), is_image, x)
    k = by_modality(proj(c.kv_heads, kv_axes), "k", c.untied("qkv"), is_image, x)
    v = by_modality(proj(c.kv_heads, kv_axes), "v", c.untied("qkv"), is_image, x)
    if c.qk_norm:
      def head_norm(heads_axis):
        if c.qk_norm_kind == "head_layernorm":
          return lambda name: layers.HeadLayerNorm(dtype=dt, heads_axis=heads_axis, name=name)
        return lambda name: layers.RMSNorm(c.norm_eps, dt, axis_name=axes.HEAD_DIM, name=name)
      q = by_modality(head_norm(axes.HEADS), "q_norm", c.untied("norms"), is_image, q)
      k = by_modality(head_norm(axes.KV_HEADS), "k_norm", c.untied("norms"), is_image, k)
    q = layers.rope(q, positions, theta=c.rope_theta, scaling=c.rope)
    k = layers.rope(k, positions, theta=c.rope_theta, scaling=c.rope)
    q = layers.constrain(q, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, None))
    k = layers.constrain(k, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_KV_HEADS, None))
    v = layers.constrain(v, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_KV_HEADS, None))
    q, k, v = (checkpoint_name(q, "query_proj"), checkpoint_name(k, "key_proj"), checkpoint_name(v, "value_proj"))
    cache_ids = {}
    if self.decode:
      k, v, cache_ids = self._update_cache(k, v, segment_ids, image_ids)
    out = attention.attend(q, k, v, segment_ids, image_ids, bidirectional_images=c.bidirectional_images,
                           implementation=c.attention, **cache_ids)
    out = layers.constrain(out, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, None))
    out_proj = lambda name: layers.DenseGeneral((c.dim,), (axes.HEADS, axes.HEAD_DIM), (axes.EMBED,), num_in_axes=2,
                                                dtype=dt, name=name)
    return checkpoint_name(by_modality(out_proj, "o", c.untied("out"), is_image, out), "out_proj")


  def _update_cache(self, k, v, segment_ids, image_ids):
    initialized = self.has_variable("cache", "key")
    cache_k = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
    cache_v = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
    cache_seg = self.variable("cache", "segment_ids", jnp.zeros, segment_ids.shape, jnp.int32)
    cache_img = self.variable("cache", "image_ids", jnp.zeros, image_ids.shape, jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:  # the creating call only sizes the cache
      return k, v, {}
    i = index.value
    cache_k.value = jax.lax.dynamic_update_slice(cache_k.value, k.astype(cache_k.value.dtype), (0, i, 0, 0))
    cache_v.value = jax.lax.dynamic_update_slice(cache_v.value, v.astype(cache_v.value.dtype), (0, i, 0, 0))
    cache_seg.value = jax.lax.dynamic_update_slice(cache_seg.value, segment_ids.astype(jnp.int32), (0, i))
    cache_img.value = jax.lax.dynamic_update_slice(cache_img.value, image_ids.astype(jnp.int32), (0, i))
    index.value = i + k.shape[1]
    return cache_k.value, cache_v.value, {
        "key_segment_ids": cache_seg.value, "key_image_ids": cache_img.value, "query_offset": i}


class DecoderLayer(nn.Module):
  cfg: BackboneConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, image_ids):
    c = self.cfg
    dt = c.compute_dtype
    is_image = image_ids > 0
    norm = lambda name: layers.RMSNorm(c.norm_eps, dt, name=name)
    attn_norm = lambda h: by_modality(norm, "attn_norm", c.untied("norms"), is_image, h)
    mlp_norm = lambda h: by_modality(norm, "mlp_norm", c.untied("norms"), is_image, h)
    mlp = lambda h: by_modality(lambda name: layers.SwiGLU(c.hidden, dt, name=name), "mlp", c.untied("mlp"),
                                is_image, h)
    drop = nn.Dropout(c.dropout, deterministic=c.dropout == 0 or not self.has_rng("dropout"))
    attn = Attention(c, self.decode, name="attn")
    if c.norm_order == "swin":
      x = x + drop(attn_norm(attn(x, positions, segment_ids, image_ids)))
    else:
      x = x + drop(attn(attn_norm(x), positions, segment_ids, image_ids))
    x = layers.constrain(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
    x = x + drop(mlp_norm(mlp(x)) if c.norm_order == "swin" else mlp(mlp_norm(x)))
    return layers.constrain(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))


class _ScanLayer(DecoderLayer):
  """A layer with scan's (carry, xs) → (carry, ys) signature."""

  @nn.compact
  def __call__(self, x, positions, segment_ids, image_ids):  # pylint: disable=arguments-renamed
    return super().__call__(x, positions, segment_ids, image_ids), None


class Backbone(nn.Module):
  """[B, T, D] embeddings → [B, T, D] final-normed hidden states (`decode`: through a KV cache)."""

  cfg: BackboneConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, image_ids):
    c = self.cfg
    if c.remat not in REMAT_POLICIES:
      raise ValueError(f"remat policy {c.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    x = layers.constrain(x.astype(c.compute_dtype), (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
    remat = c.remat != "none" and not self.decode  # inference keeps no activations for a backward pass
    if c.scan:
      layer = _ScanLayer
      if remat:
        layer = nn.remat(layer, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
      stack = nn.scan(layer, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers,
                      metadata_params={nn.PARTITION_NAME: axes.LAYERS})
      x, _ = stack(c, self.decode, name="layers")(x, positions, segment_ids, image_ids)
    else:
      layer = DecoderLayer
      if remat:
        layer = nn.remat(layer, policy=REMAT_POLICIES[c.remat])
      for i in range(c.num_layers):
        x = layer(c, self.decode, name=f"layer_{i}")(x, positions, segment_ids, image_ids)
    final_norm = lambda name: layers.RMSNorm(c.norm_eps, c.compute_dtype, name=name)
    return by_modality(final_norm, "final_norm", c.untied("norms"), image_ids > 0, x)
