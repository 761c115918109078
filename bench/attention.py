"""Attention kernels on the mixed mask vs causal flash attention, same shapes; prints JSON.

    python bench/attention.py                       # B=4, T=4096, 16 heads × 128, images of 256 and 1024 patches
    python bench/attention.py --pallas_blocks=128x64x64,64x64x32 --steps=50
    python bench/attention.py --batch=1 --seq_len=1024 --heads=4   # a CPU smoke run (xla only)

For each layout — `packed` (bench/train_step.py's rows: image–caption pairs
and text documents packed to the row, about half the slots image patches) and
`one_document` (one document filling the row, text and images interleaved: the
strict comparison with a causal mask) — and each image size, it times the
forward and forward+backward of every kernel the backend has:

* GPU: `pallas` (unimm's mixed flash kernel), `cudnn` and `xla` (dense mixed
  mask), against `causal_cudnn` (cuDNN flash attention, is_causal, no
  documents) — the reference the targets are stated against; `causal_pallas`
  is the Pallas kernel on plain causal rows (its speed vs cuDNN's, mask aside).
* TPU: `splash` (per-row dynamic mask) and `xla`, against `causal_splash`
  (splash with its static causal mask).
* CPU: `xla` against `causal_xla` (for trying the script).

`pallas_tiles_vs_causal` is hardware-free: the key tiles the Pallas forward
visits (its block ranges) over those a causal flash kernel visits, same blocks;
`pallas_backward_matmuls_vs_causal` and `pallas_atomic_backward_matmuls_vs_causal`
are the backward's (deterministic: dK/dV and dQ loops, 7 matmuls per tile pair;
`pallas_atomic`: one loop, 5) over a causal FlashAttention-2 backward's.
FLOPs count what the mask lets through: forward 4·N·H per visible (query, key)
pair (two matmuls), backward 2.5× the forward (FlashAttention-2's convention,
five matmuls with the recomputed scores); the causal reference counts its
T(T+1)/2 pairs per row. `vs_causal` is time over the causal reference's time
for the same pass and image size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from train_step import synthetic_batch  # pylint: disable=wrong-import-position
from unimm.data import packed  # pylint: disable=wrong-import-position
from unimm.models import attention  # pylint: disable=wrong-import-position

KERNELS = {"gpu": ("pallas", "pallas_atomic", "cudnn", "xla"), "tpu": ("splash", "xla"), "cpu": ("xla",)}
CAUSAL = {"gpu": "causal_cudnn", "tpu": "causal_splash", "cpu": "causal_xla"}


def one_document_rows(rng, batch: int, length: int, patches: int):
  """One document per row: text runs of 64–512 tokens between images of `patches` slots."""
  seg = np.ones((batch, length), np.int32)
  img = np.zeros((batch, length), np.int32)
  for b in range(batch):
    t, k = int(rng.integers(64, 512)), 0
    while t + patches + 2 <= length:
      k += 1
      img[b, t + 1:t + 1 + patches] = k  # BOI at t, EOI after
      t += patches + 2 + int(rng.integers(64, 512))
  return seg, img


def layout(name: str, rng, batch: int, length: int, patches: int):
  if name == "one_document":
    return one_document_rows(rng, batch, length, patches)
  rows = synthetic_batch(rng, batch, length, patches, max(1, length // patches), (1, 1, 1), 2)
  return rows["segment_ids"], rows["image_ids"]


def causal_kernel(backend: str):
  """Causal attention over whole rows (no documents): the reference a fused causal kernel sets."""
  if backend == "gpu":
    return lambda q, k, v, seg, img: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  if backend == "tpu":
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash  # pylint: disable=g-import-not-at-top
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks  # pylint: disable=g-import-not-at-top

    def run(q, k, v, seg, img):
      del seg, img
      length, heads = q.shape[1], q.shape[2]
      b = min(512, length)
      sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
      mask = masks.MultiHeadMask([masks.CausalMask((length, length))] * heads)
      kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1)
      t = lambda x: jnp.swapaxes(x, 1, 2)
      return t(jax.vmap(kernel)(t(q * q.shape[-1] ** -0.5), t(k), t(v)))
    return run
  return lambda q, k, v, seg, img: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def kernels(backend: str, pallas_blocks: list[str]):
  out = {name: (lambda impl: lambda q, k, v, seg, img: attention.attend(q, k, v, seg, img, implementation=impl))(name)
         for name in KERNELS[backend]}
  if backend == "gpu":
    from unimm.kernels import mixed_flash  # pylint: disable=g-import-not-at-top
    # The same kernel on one causal document a row: its own speed against cuDNN's, mask aside.
    out["causal_pallas"] = lambda q, k, v, seg, img: attention.attend(
        q, k, v, jnp.ones_like(seg), jnp.zeros_like(img), implementation="pallas")
    for spec in pallas_blocks:
      bq, bk, bb = (int(x) for x in spec.split("x"))
      out[f"pallas_{spec}"] = (lambda bq, bk, bb: lambda q, k, v, seg, img: mixed_flash.mixed_flash_attention(
          q, k, v, seg, img, True, bq, bk, bb))(bq, bk, bb)
  out[CAUSAL[backend]] = causal_kernel(backend)
  return out


def _tiles(lo, hi, block_rows: int, block_cols: int) -> int:
  """Tiles a Pallas loop visits: per block of `block_rows` positions, the `block_cols` blocks covering the
  union of their spans [lo, hi) (the kernel's `_block_range`)."""
  b, t = lo.shape
  first = lo.reshape(b, t // block_rows, block_rows).min(-1) // block_cols
  last = -(-hi.reshape(b, t // block_rows, block_rows).max(-1) // block_cols)
  return int(np.maximum(last - first, 0).sum())


def tiles_visited(seg, img, block_q: int = 128, block_k: int = 64, block_backward: int = 64) -> dict:
  """The tiles the Pallas kernel visits, from its block ranges: `forward` (key tiles over all query
  blocks), and the backward's `dkdv` (query tiles over all key blocks) and `dq` (key tiles over all query
  blocks, the deterministic backward's second loop). Matmuls per tile: forward 2; deterministic backward
  4 per dK/dV tile and 3 per dQ tile (P and dS recomputed); `atomic_dq` 5 per dK/dV tile, no dQ loop."""
  from unimm.kernels import mixed_flash  # pylint: disable=g-import-not-at-top
  kv_lo, kv_hi, q_lo, q_hi = (np.asarray(x) for x in mixed_flash.visible_spans(jnp.asarray(seg), jnp.asarray(img)))
  out = {"forward": _tiles(kv_lo, kv_hi, block_q, block_k), "dkdv": _tiles(q_lo, q_hi, block_backward, block_backward),
         "dq": _tiles(kv_lo, kv_hi, block_backward, block_backward)}
  out["backward_matmuls"] = 4 * out["dkdv"] + 3 * out["dq"]
  out["backward_matmuls_atomic_dq"] = 5 * out["dkdv"]
  return out


def timed(fn, args, steps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv_heads", type=int, default=0, help="0 = heads")
  parser.add_argument("--head_dim", type=int, default=128)
  parser.add_argument("--image_patches", default="256,1024")
  parser.add_argument("--layouts", default="packed,one_document")
  parser.add_argument("--only", default="", help="comma list of kernel names to run (default: all)")
  parser.add_argument("--pallas_blocks", default="", help="extra Pallas block sizes, e.g. 128x64x64 (q, k, bwd)")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--dtype", default="bfloat16")
  args = parser.parse_args()

  backend = jax.default_backend()
  b, t, n, h = args.batch, args.seq_len, args.heads, args.head_dim
  kv_heads = args.kv_heads or n
  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, n, h), dtype)
  k = jax.random.normal(keys[1], (b, t, kv_heads, h), dtype)
  v = jax.random.normal(keys[2], (b, t, kv_heads, h), dtype)
  cotangent = jax.random.normal(keys[3], (b, t, n, h), dtype)
  table = kernels(backend, [s for s in args.pallas_blocks.split(",") if s])
  if args.only:
    wanted = set(args.only.split(",")) | {CAUSAL[backend]}
    table = {name: fn for name, fn in table.items() if name in wanted}
  rng = np.random.default_rng(0)
  results = []
  for layout_name in args.layouts.split(","):
    for patches in (int(p) for p in args.image_patches.split(",")):
      seg, img = layout(layout_name, rng, b, t, patches)
      visible = int(packed.attention_mask(seg, img).sum())
      causal_pairs = b * t * (t + 1) // 2
      causal, tiles = tiles_visited(np.ones_like(seg), np.zeros_like(img)), tiles_visited(seg, img)
      seg, img = jnp.asarray(seg), jnp.asarray(img)
      base = {"layout": layout_name, "image_patches": patches,
              "image_slot_fraction": round(float((img > 0).mean()), 3),
              "visible_pairs_vs_causal": round(visible / causal_pairs, 4),
              # The Pallas kernel's work at its default blocks (128 × 64, backward 64), vs causal flash's (a
              # FlashAttention-2 backward: 5 matmuls per tile); and what atomic dQ saves in the backward.
              "pallas_tiles_vs_causal": round(tiles["forward"] / causal["forward"], 4),
              "pallas_backward_matmuls_vs_causal": round(
                  tiles["backward_matmuls"] / causal["backward_matmuls_atomic_dq"], 4),
              "pallas_atomic_backward_matmuls_vs_causal": round(
                  tiles["backward_matmuls_atomic_dq"] / causal["backward_matmuls_atomic_dq"], 4)}
      rows = {}
      for name, fn in table.items():
        pairs = causal_pairs if name.startswith("causal") else visible
        forward = jax.jit(fn)
        both = jax.jit(jax.grad(lambda q, k, v, s, i, fn=fn: jnp.sum(fn(q, k, v, s, i) * cotangent).astype(jnp.float32),
                                argnums=(0, 1, 2)))
        row = dict(base, kernel=name)
        try:
          fwd_s, both_s = timed(forward, (q, k, v, seg, img), args.steps), timed(both, (q, k, v, seg, img), args.steps)
        except Exception as e:  # pylint: disable=broad-except
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
          rows[name] = row
          continue
        flops = 4.0 * n * h * pairs
        row.update(forward_ms=round(fwd_s * 1e3, 3), forward_backward_ms=round(both_s * 1e3, 3),
                   forward_tflops=round(flops / fwd_s / 1e12, 3),
                   forward_backward_tflops=round(3.5 * flops / both_s / 1e12, 3))
        rows[name] = row
      ref = rows.get(CAUSAL[backend], {})
      for row in rows.values():
        if "error" not in row and "error" not in ref:
          row["forward_vs_causal"] = round(row["forward_ms"] / ref["forward_ms"], 3)
          row["forward_backward_vs_causal"] = round(row["forward_backward_ms"] / ref["forward_backward_ms"], 3)
        results.append(row)
        print(json.dumps(row), flush=True)
  device = jax.devices()[0]
  print(json.dumps({"summary": {"backend": backend, "device_kind": device.device_kind, "batch": b, "seq_len": t,
                                "heads": n, "kv_heads": kv_heads, "head_dim": h, "dtype": args.dtype,
                                "results": len(results)}}))


if __name__ == "__main__":
  main()
