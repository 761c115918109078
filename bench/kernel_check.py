"""Is the Pallas mixed-mask kernel right on this machine? Output and gradients against the dense reference,
for every candidate block size and both backwards; prints JSON lines, exits 1 if any case fails.

    python bench/kernel_check.py                          # on a GPU: the kernel compiled by Triton
    python bench/kernel_check.py --seq_len=256 --heads=2 --head_dim=16 --blocks=32x16x16   # CPU: interpreted

The first thing bench/gpu_benchmarks.sh runs, so a GPU session learns in a minute, and with the reason
(a Triton compile error, a mismatch and where), whether the kernel rows after it mean anything. Rows are
packed like training rows (image–caption pairs and text documents, half the slots image patches) and one
document a row; queries and keys random. The reference is `attention.reference_attention` in float32 on
the same device; the tolerances are the CPU tests' (tests/test_kernels.py): the output within 1% (bf16;
float32: 2e-5) of its largest value, each gradient within 2% (4e-5) of its largest value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from attention import layout  # pylint: disable=wrong-import-position
from unimm.kernels import mixed_flash  # pylint: disable=wrong-import-position
from unimm.models import attention  # pylint: disable=wrong-import-position


def largest_error(got, want, valid=None) -> float:
  """max |got − want| over the valid rows, as a fraction of max |want|."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if valid is not None:
    got, want = got[valid], want[valid]
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _f32(x):
  return x.astype(jnp.float32)


def _loss(fn, cotangent):
  return lambda q, k, v: (_f32(fn(q, k, v)) * cotangent).sum()


def reference(q, k, v, cotangent, seg, img) -> tuple:
  """The float32 reference's output and (q, k, v) gradients: once per layout, shared by its cases."""
  fn = lambda q, k, v: attention.reference_attention(q, k, v, seg, img)
  q, k, v = _f32(q), _f32(k), _f32(v)
  return jax.jit(fn)(q, k, v), jax.jit(jax.grad(_loss(fn, cotangent), argnums=(0, 1, 2)))(q, k, v)


def check(q, k, v, cotangent, seg, img, wanted, blocks, atomic_dq: bool, interpret: bool, tolerance: float) -> dict:
  """One case: the kernel's output and (q, k, v) gradients vs the reference's (`wanted`, from `reference`)."""
  bq, bk, bb = blocks

  def kernel(q, k, v):
    return mixed_flash.mixed_flash_attention(q, k, v, seg, img, True, bq, bk, bb, None, 2, interpret, atomic_dq)

  out = jax.jit(kernel)(q, k, v)
  grads = jax.jit(jax.grad(_loss(kernel, cotangent), argnums=(0, 1, 2)))(q, k, v)
  want, want_grads = wanted
  valid = np.asarray(seg > 0)
  errors = {"out": largest_error(out, want, valid)}
  errors.update({f"d{name}": largest_error(g, w) for name, g, w in zip("qkv", grads, want_grads)})
  finite = bool(all(np.isfinite(np.asarray(_f32(x))).all() for x in (out, *grads)))
  bounds = {"out": 2 * tolerance, "dq": 4 * tolerance, "dk": 4 * tolerance, "dv": 4 * tolerance}
  failed = [name for name, error in errors.items() if not error <= bounds[name]]
  return {"errors": {k: round(e, 6) for k, e in errors.items()}, "bounds": bounds, "finite": finite,
          "ok": finite and not failed, **({"too_far": failed} if failed else {})}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--head_dim", type=int, default=128)
  parser.add_argument("--image_patches", type=int, default=256)
  parser.add_argument("--blocks", default="128x64x64,64x64x32,128x128x64,64x64x64",
                      help="candidate block sizes block_q x block_k x block_backward")
  parser.add_argument("--dtype", default="bfloat16")
  args = parser.parse_args(argv)

  backend = attention.target_platform()
  interpret = backend != "gpu"  # elsewhere the same kernel runs interpreted (a check of this script)
  dtype = jnp.dtype(args.dtype)
  tolerance = 5e-3 if dtype == jnp.bfloat16 else 1e-5
  b, t, n, h = args.batch, args.seq_len, args.heads, args.head_dim
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, n, h)).astype(dtype)
  k = jax.random.normal(keys[1], (b, t, args.kv_heads, h)).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, args.kv_heads, h)).astype(dtype)
  cotangent = jax.random.normal(keys[3], (b, t, n, h))
  rng = np.random.default_rng(0)
  failures = 0
  cases = 0
  for layout_name in ("packed", "one_document"):
    seg, img = (jnp.asarray(x) for x in layout(layout_name, rng, b, t, args.image_patches))
    masked = cotangent * (seg > 0)[..., None, None]  # losses never weigh padding
    wanted = reference(q, k, v, masked, seg, img)
    for spec in args.blocks.split(","):
      blocks = tuple(int(x) for x in spec.split("x"))
      for atomic_dq in (False, True):
        row = {"layout": layout_name, "blocks": spec, "backward": "atomic_dq" if atomic_dq else "deterministic"}
        try:
          row.update(check(q, k, v, masked, seg, img, wanted, blocks, atomic_dq, interpret, tolerance))
        except Exception as e:  # pylint: disable=broad-except  (a compile error is this check's finding)
          row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
        cases += 1
        failures += not row["ok"]
        print(json.dumps(row), flush=True)
  device = jax.devices()[0]
  print(json.dumps({"summary": {"backend": backend, "device_kind": device.device_kind, "interpret": interpret,
                                "dtype": args.dtype, "shape": [b, t, n, args.kv_heads, h], "cases": cases,
                                "failed": failures}}), flush=True)
  if failures:
    print(f"kernel_check: {failures} of {cases} cases failed (rows with ok=false above: the error, or the "
          "gradients too far from the reference); the kernel rows of a benchmark run mean nothing until fixed",
          file=sys.stderr)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
