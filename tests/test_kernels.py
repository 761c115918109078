"""The mixed-mask kernels (Pallas/Triton flash, TPU splash) against the reference, run interpreted on CPU."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.data import packed
from unimm.kernels import mixed_flash, splash
from unimm.models import attention
from test_attention_mask import brute_force, random_row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def packed_rows(length: int, seed: int = 0):
  """Three rows: an image at each edge of the row (no padding); random documents and images with
  padding; a text-only row of short documents (causal + documents, the LM case)."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((3, length), np.int32)
  img = np.zeros((3, length), np.int32)
  third = length // 3
  seg[0, :third], seg[0, third:] = 1, 2
  img[0, :third // 2] = 1  # opens the row
  img[0, third + 5:third + 5 + length // 2 - 8] = 2  # long: whole tiles inside one image
  img[0, length - length // 6:] = 3  # closes the row
  t, s, k = 0, 0, 0
  while t < length - length // 10:  # row 1: stops early, the rest is padding
    s += 1
    end = min(length - length // 10, t + int(rng.integers(length // 8, length // 2)))
    seg[1, t:end] = s
    u = t + int(rng.integers(0, 4))
    while u < end - 2 and rng.random() < 0.6:
      stop = min(end, u + int(rng.integers(1, length // 4)))
      k += 1
      img[1, u:stop] = k
      u = stop + int(rng.integers(0, 3))
    t = end
  bounds = np.sort(rng.choice(np.arange(1, length), 5, replace=False))
  seg[2] = 1 + np.searchsorted(bounds, np.arange(length), side="right")
  return jnp.asarray(seg), jnp.asarray(img)


def qkv(batch, length, heads, kv_heads, head_dim, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim)).astype(dtype)
  k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim)).astype(dtype)
  v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim)).astype(dtype)
  cotangent = jax.random.normal(keys[3], (batch, length, heads, head_dim))
  return q, k, v, cotangent


def check_against_reference(kernel, dtype, *, length, heads, kv_heads, head_dim, bidirectional):
  """Values and gradients on valid rows, in the input dtype's tolerance."""
  seg, img = packed_rows(length)
  q, k, v, cotangent = qkv(3, length, heads, kv_heads, head_dim, dtype)
  cotangent = cotangent * (seg > 0)[..., None, None]  # losses never weigh padding

  def loss(fn):
    return lambda q, k, v: (fn(q, k, v, seg, img).astype(jnp.float32) * cotangent).sum()

  ref = lambda q, k, v, s, i: attention.reference_attention(q, k, v, s, i, bidirectional_images=bidirectional)
  f32 = lambda x: x.astype(jnp.float32)
  out = jax.jit(kernel)(q, k, v, seg, img)
  want = ref(f32(q), f32(k), f32(v), seg, img)
  grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
  want_grads = jax.grad(loss(ref), argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
  valid = np.asarray(seg > 0)
  rtol = 1e-5 if dtype == jnp.float32 else 5e-3  # bf16: 1% of the largest value, 2% of the largest gradient
  scale = np.abs(np.asarray(want)).max()
  np.testing.assert_allclose(np.asarray(f32(out))[valid], np.asarray(want)[valid], atol=rtol * scale * 2, rtol=0)
  assert np.isfinite(np.asarray(f32(out))).all()
  for name, got, expected in zip("qkv", grads, want_grads):
    scale = np.abs(np.asarray(expected)).max()
    np.testing.assert_allclose(np.asarray(f32(got)), np.asarray(expected), atol=rtol * scale * 4, rtol=0,
                               err_msg=f"d{name}")


def test_visible_spans_hold_every_visible_key_and_are_tight_for_packed_rows():
  rng = np.random.default_rng(3)
  for bidirectional in (True, False):
    for _ in range(20):
      seg, img = random_row(rng, length=64)
      kv_lo, kv_hi, q_lo, q_hi = (np.asarray(x[0]) for x in mixed_flash.visible_spans(
          jnp.asarray(seg)[None], jnp.asarray(img)[None], bidirectional_images=bidirectional))
      mask = brute_force(seg, img, bidirectional)
      for t in range(64):
        keys, queries = np.flatnonzero(mask[t]), np.flatnonzero(mask[:, t])
        if len(keys):  # packed rows: the span is exactly [first, last] visible key
          assert (kv_lo[t], kv_hi[t]) == (keys[0], keys[-1] + 1)
        else:
          assert kv_lo[t] >= kv_hi[t]
        if len(queries):
          assert (q_lo[t], q_hi[t]) == (queries[0], queries[-1] + 1)
        else:
          assert q_lo[t] >= q_hi[t]


def test_visible_spans_stay_conservative_for_ids_that_are_not_contiguous():
  seg = np.array([1, 1, 2, 2, 1, 1, 2, 0], np.int32)  # not what the packer makes, but the rule still holds
  img = np.array([0, 3, 0, 0, 0, 3, 0, 0], np.int32)
  kv_lo, kv_hi, q_lo, q_hi = (np.asarray(x[0]) for x in mixed_flash.visible_spans(seg[None], img[None]))
  mask = brute_force(seg, img, True)
  for t in range(8):
    assert all(kv_lo[t] <= k < kv_hi[t] for k in np.flatnonzero(mask[t]))
    assert all(q_lo[t] <= q < q_hi[t] for q in np.flatnonzero(mask[:, t]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("atomic_dq", [False, True])
def test_mixed_flash_matches_reference(dtype, bidirectional, atomic_dq):
  kernel = lambda q, k, v, s, i: mixed_flash.mixed_flash_attention(
      q, k, v, s, i, bidirectional, 32, 16, 16, None, 2, True, atomic_dq)
  check_against_reference(kernel, dtype, length=128, heads=2, kv_heads=1, head_dim=16,
                          bidirectional=bidirectional)


def test_atomic_dq_backward_runs_one_loop_and_is_selected_by_name():
  """`pallas_atomic` is the kernel with FlashAttention-2's backward: its dQ is added up in the dK/dV loop
  (a float32 row it aliases), so the backward has one loop over tiles, not two; the gradients agree with
  the deterministic backward's to float32 rounding."""
  seg, img = packed_rows(128)
  q, k, v, cotangent = qkv(3, 128, 2, 1, 16, jnp.float32, seed=2)
  grads = {}
  for name in ("pallas", "pallas_atomic"):
    loss = lambda q, k, v, name=name: (attention.attend(q, k, v, seg, img, implementation=name) * cotangent).sum()
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    assert ("mixed_flash_backward_atomic_dq" in jaxpr) == (name == "pallas_atomic")
    grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for deterministic, atomic in zip(grads["pallas"], grads["pallas_atomic"]):
    np.testing.assert_allclose(atomic, deterministic, rtol=1e-5, atol=1e-5)


def test_mixed_flash_padding_rows_are_zero_and_a_text_row_equals_causal_attention():
  seg, img = packed_rows(128)
  q, k, v, _ = qkv(3, 128, 2, 2, 16, jnp.float32, seed=1)
  out = mixed_flash.mixed_flash_attention(q, k, v, seg, img, True, 32, 32, 32, None, 2, True)
  np.testing.assert_array_equal(np.asarray(out)[np.asarray(seg == 0)], 0.0)
  causal = jax.nn.dot_product_attention(q[2:], k[2:], v[2:], mask=packed.attention_mask(seg[2:], img[2:])[:, None])
  np.testing.assert_allclose(out[2:], causal, atol=1e-5)


def test_mixed_flash_rejects_shapes_it_cannot_tile():
  q = jnp.zeros((1, 96, 2, 16))
  ids = jnp.ones((1, 96), jnp.int32)
  with pytest.raises(ValueError, match="powers of two"):
    mixed_flash.mixed_flash_attention(q, q, q, ids, ids, True, 128, 64, 64, None, 2, True)
  with pytest.raises(ValueError, match="head_dim 24"):
    mixed_flash.mixed_flash_attention(jnp.zeros((1, 64, 2, 24)), jnp.zeros((1, 64, 2, 24)),
                                      jnp.zeros((1, 64, 2, 24)), ids[:, :64], ids[:, :64], True, 64, 64, 64,
                                      None, 2, True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_splash_matches_reference(dtype):
  kernel = lambda q, k, v, s, i: splash.splash_mixed_attention(q, k, v, s, i, block=128, interpret=True)
  check_against_reference(kernel, dtype, length=256, heads=2, kv_heads=1, head_dim=128, bidirectional=True)


def test_splash_takes_every_multiple_of_128():
  """`auto` picks splash on TPU for any length that is a multiple of 128; a length its default 512 block
  does not divide (640) runs in blocks of 128, matching the reference."""
  assert [splash.block_for(n) for n in (128, 256, 384, 512, 640, 1536, 4096, 100)] == [128, 256, 384, 512, 128,
                                                                                          512, 512, 0]
  check_against_reference(lambda q, k, v, s, i: splash.splash_mixed_attention(q, k, v, s, i, interpret=True),
                          jnp.float32, length=640, heads=1, kv_heads=1, head_dim=128, bidirectional=True)


def test_mixed_flash_lowers_to_triton_for_gpu():
  """Pallas → Triton IR happens at lowering, on any host: what reaches a GPU is a Triton kernel."""
  shape = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  q, kv, ids = shape(2, 512, 8, 128), shape(2, 512, 4, 128), shape(2, 512, dt=jnp.int32)
  f = lambda q, k, v, s, i: mixed_flash.mixed_flash_attention(q, k, v, s, i).astype(jnp.float32).sum()
  lowered = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).trace(q, kv, kv, ids, ids).lower(
      lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("xla.gpu.triton") == 2  # the forward (recomputed for the vjp once) and the backward
  assert "mixed_flash_forward" in text and "mixed_flash_backward" in text
  atomic = lambda q, k, v, s, i: mixed_flash.mixed_flash_attention(q, k, v, s, i, atomic_dq=True).astype(
      jnp.float32).sum()
  text = jax.jit(jax.value_and_grad(atomic, argnums=(0, 1, 2))).trace(q, kv, kv, ids, ids).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 2 and "mixed_flash_backward_atomic_dq" in text


@pytest.mark.slow
def test_auto_compiles_splash_for_a_tpu_mesh_with_libtpu():
  """Traced for a TPU slice (libtpu's compiler, no TPU), `auto` picks splash, runs it per shard and
  Mosaic compiles it, forward and backward."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from unimm.parallel import sharding  # pylint: disable=g-import-not-at-top
  from unimm.train import compile as compile_lib  # pylint: disable=g-import-not-at-top
  _, devices = compile_lib.target_devices("v5p-8")
  mesh = jax.sharding.Mesh(np.array(devices[:4]).reshape(1, 4, 1, 1), sharding.MESH_AXES)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  shape = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt, sharding=rows)
  q, kv, ids = shape(4, 1024, 8, 128), shape(4, 1024, 4, 128), shape(4, 1024, dt=jnp.int32)
  f = lambda q, k, v, s, i: attention.attend(q, k, v, s, i).astype(jnp.float32).sum()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES["default"]):
    compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).trace(q, kv, kv, ids, ids).lower().compile()
  assert compiled.as_text().count("tpu_custom_call") == 3  # forward, dq, dkv


def test_auto_picks_the_kernel_for_the_backend(monkeypatch):
  resolve = attention.resolve_implementation
  # GPU: cuDNN's dense mask, the path that has run on a GPU; the Pallas kernel only by name until then.
  for backend, want in (("gpu", "cudnn"), ("tpu", "splash"), ("cpu", "xla")):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert resolve("auto", length=4096, head_dim=128) == want
    dense = "cudnn" if backend == "gpu" else "xla"
    assert resolve("auto", length=4096, head_dim=128, decode=True) == dense  # a KV cache
    assert resolve("auto", length=4096, head_dim=128, sequence_sharded=True) == dense
    assert resolve("auto", length=100, head_dim=128) == dense  # the kernels tile by 128
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert resolve("auto", length=640, head_dim=128) == "splash"  # 5 × 128: splash tiles it in blocks of 128
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert resolve("xla") == "xla" and resolve("pallas", length=256, head_dim=64) == "pallas"
  with pytest.raises(ValueError, match="mesh.sequence"):
    resolve("splash", length=256, head_dim=128, sequence_sharded=True)
  with pytest.raises(ValueError, match="expected one of"):
    resolve("flash")


KERNELS_UNDER_A_MESH = """
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, ml_collections as mlc, sys
sys.path.insert(0, "tests")
from test_kernels import packed_rows, qkv
from unimm.models import attention
from unimm.parallel import sharding
mesh = sharding.make_mesh(mlc.ConfigDict(dict(data=1, fsdp=2, tensor=2, sequence=1)))
seg, img = packed_rows(128)
seg, img = jnp.concatenate([seg, seg[:1]]), jnp.concatenate([img, img[:1]])  # 4 rows over fsdp=2
q, k, v, _ = qkv(4, 128, 4, 2, 16, jnp.float32)
def run(impl):
  f = lambda q, k, v: attention.attend(q, k, v, seg, img, implementation=impl)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES["default"]):
    out, grads = jax.jit(jax.value_and_grad(lambda q, k, v: (f(q, k, v) ** 2 * (seg > 0)[..., None, None]).sum(),
                                            argnums=(0, 1, 2)))(q, k, v)
    text = jax.jit(f).lower(q, k, v).as_text()
  return out, grads, text
want, want_grads, _ = run("xla")
out, grads, text = run("pallas")
assert "shard_map" in text or "sdy.manual_computation" in text, text[:2000]
np.testing.assert_allclose(out, want, rtol=1e-5)
for g, w in zip(grads, want_grads):
  np.testing.assert_allclose(g, w, atol=1e-4 * np.abs(w).max())
print("ok")
"""


@pytest.mark.slow
def test_kernel_runs_per_shard_under_a_mesh():
  """Rows over fsdp, heads over tensor: the kernel sees its shard and matches the dense path."""
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", KERNELS_UNDER_A_MESH], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_backbone_with_the_kernel_matches_xla_under_scan_and_remat():
  """The custom-VJP kernel inside nn.scan + nn.remat: same hidden states and parameter gradients; remat
  policy qkv_attention keeps the kernel's named residuals, so its forward never runs again."""
  import re  # pylint: disable=g-import-not-at-top
  from unimm.models import backbone  # pylint: disable=g-import-not-at-top
  seg, img = packed_rows(128)
  pos = jnp.asarray(np.concatenate([np.arange(128)[None]] * 3))  # positions only feed RoPE here
  x = jax.random.normal(jax.random.key(4), (3, 128, 64))
  weights = (seg > 0)[..., None]

  def model(impl, policy="qkv_proj"):
    cfg = backbone.BackboneConfig(num_layers=2, dim=64, num_heads=4, num_kv_heads=2, dtype="float32",
                                  remat=policy, scan=True, attention=impl)
    return backbone.Backbone(cfg)

  params = model("xla").init(jax.random.key(0), x, pos, seg, img)["params"]
  loss = lambda impl, policy="qkv_proj": jax.jit(jax.value_and_grad(
      lambda p: jnp.sum(jnp.sin(model(impl, policy).apply({"params": p}, x, pos, seg, img)) * weights)))
  (want, want_grads), (got, grads) = loss("xla")(params), loss("pallas")(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max()),
               grads, want_grads)

  def recomputes_forward_kernel(policy):  # does the compiled backward run the forward kernel again?
    text = loss("pallas", policy).lower(params).compile().as_text()
    places = set(re.findall(r'op_name="([^"]*)mixed_flash_forward', text))
    assert places, "the forward kernel is in the step"
    return any("rematted_computation" in p for p in places)
  assert recomputes_forward_kernel("qkv_proj")
  assert not recomputes_forward_kernel("qkv_attention")
  _, kept_grads = loss("pallas", "qkv_attention")(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max()),
               kept_grads, want_grads)


def test_kernel_check_passes_the_kernel_and_fails_a_wrong_one(monkeypatch, capsys):
  """bench/kernel_check.py, the GPU run's first step, finds a kernel whose output is 5% off (every case fails,
  naming the output and the gradients) and passes the real one."""
  monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
  import kernel_check  # pylint: disable=g-import-not-at-top
  args = ["--batch=1", "--seq_len=128", "--heads=2", "--kv_heads=1", "--head_dim=16", "--image_patches=16",
          "--blocks=32x16x16"]
  assert kernel_check.main(args) == 0
  right = mixed_flash.mixed_flash_attention
  monkeypatch.setattr(mixed_flash, "mixed_flash_attention", lambda *a: right(*a) * 1.05)
  assert kernel_check.main(args) == 1
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  first, second = rows[:5], rows[5:]
  assert all(r["ok"] for r in first[:4]) and first[4]["summary"]["failed"] == 0
  assert not any(r["ok"] for r in second[:4]) and second[4]["summary"]["failed"] == 4
  assert all(set(r["too_far"]) == {"out", "dq", "dk", "dv"} for r in second[:4])
