"""Modality-specific weights (Mixture-of-Transformers / LMFusion) in the backbone, against a float64 NumPy
decoder that picks each position's weights in a loop; the untied-parts switch; active-parameter counting."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.models import backbone

ALL = ("qkv", "out", "mlp", "norms")


def config(mot, **kwargs):
  return backbone.BackboneConfig(num_layers=2, dim=16, num_heads=4, num_kv_heads=2, mlp_hidden=24, dtype="float32",
                                 remat="none", scan=True, attention="xla", qk_norm=True, mot=mot, **kwargs)


def row():
  """Two documents; the first holds two images, the second one."""
  seg = np.array([[1] * 9 + [2] * 5])
  img = np.array([[0, 1, 1, 1, 0, 2, 2, 0, 0, 0, 3, 3, 0, 0]])
  pos = np.array([list(range(9)) + list(range(5))])
  return pos, seg, img


def random_params(cfg, x, pos, seg, img, seed=1):
  params = nn.meta.unbox(backbone.Backbone(cfg).init(jax.random.key(0), x, pos, seg, img)["params"])
  keys = iter(jax.random.split(jax.random.key(seed), 100))
  # Norm scales away from 1 and every copy different, so a wrong pick shows.
  return jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape), params)


def np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def np_rope(x, p, theta):
  d = x.shape[-1]
  freq = theta ** (-np.arange(0, d, 2) / d)
  a = p * freq
  x1, x2 = x[: d // 2], x[d // 2:]
  return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)])


def numpy_backbone(cfg, params, x, pos, seg, img):
  """float64, one position at a time: each position's weights are its modality's (image slot: `_image`)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)[0]
  t_len, eps = x.shape[0], cfg.norm_eps
  pos, seg, img = pos[0], seg[0], img[0]

  def w(tree, name, part, i):
    return tree[name + ("_image" if img[i] > 0 and part in cfg.mot else "")]

  for layer in range(cfg.num_layers):
    lp = jax.tree.map(lambda a: a[layer], p["layers"])
    q, k, v = [], [], []
    for i in range(t_len):
      h = np_rms(x[i], w(lp, "attn_norm", "norms", i)["scale"], eps)
      qi = np.einsum("d,dnh->nh", h, w(lp["attn"], "q", "qkv", i)["kernel"])
      ki = np.einsum("d,dnh->nh", h, w(lp["attn"], "k", "qkv", i)["kernel"])
      vi = np.einsum("d,dnh->nh", h, w(lp["attn"], "v", "qkv", i)["kernel"])
      qi = np_rms(qi, w(lp["attn"], "q_norm", "norms", i)["scale"], eps)
      ki = np_rms(ki, w(lp["attn"], "k_norm", "norms", i)["scale"], eps)
      q.append([np_rope(a, pos[i], cfg.rope_theta) for a in qi])
      k.append([np_rope(a, pos[i], cfg.rope_theta) for a in ki])
      v.append(vi)
    q, k, v = np.array(q), np.array(k), np.array(v)  # [T, N, H]
    group = cfg.num_heads // cfg.kv_heads
    out = np.zeros_like(x)
    for i in range(t_len):
      seen = [j for j in range(t_len) if seg[j] == seg[i] and (j <= i or (img[i] > 0 and img[j] == img[i]))]
      heads = []
      for n in range(cfg.num_heads):
        logits = np.array([q[i, n] @ k[j, n // group] for j in seen]) / np.sqrt(q.shape[-1])
        prob = np.exp(logits - logits.max())
        prob /= prob.sum()
        heads.append(sum(pj * v[j, n // group] for pj, j in zip(prob, seen)))
      out[i] = np.einsum("nh,nhd->d", np.array(heads), w(lp["attn"], "o", "out", i)["kernel"])
    x = x + out
    for i in range(t_len):
      h = np_rms(x[i], w(lp, "mlp_norm", "norms", i)["scale"], eps)
      mp = w(lp, "mlp", "mlp", i)
      gate, up = h @ mp["gate"]["kernel"], h @ mp["up"]["kernel"]
      x[i] = x[i] + (gate / (1 + np.exp(-gate)) * up) @ mp["down"]["kernel"]
  return np.stack([np_rms(x[i], w(p, "final_norm", "norms", i)["scale"], eps) for i in range(t_len)])[None]


@pytest.mark.parametrize("mot", [ALL, ("mlp",), ("qkv", "norms"), ()])
def test_each_position_uses_its_modality_weights(mot):
  cfg = config(mot)
  pos, seg, img = row()
  x = jax.random.normal(jax.random.key(2), (1, pos.shape[1], cfg.dim))
  params = random_params(cfg, x, pos, seg, img)
  copies = {path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
            if backbone.is_image_copy("/".join(k.key for k in path))}
  assert bool(copies) == bool(mot)
  got = backbone.Backbone(cfg).apply({"params": params}, x, pos, seg, img)
  want = numpy_backbone(cfg, params, x, pos, seg, img)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


def test_copies_equal_to_the_text_weights_give_the_dense_model():
  pos, seg, img = row()
  dense = config(())
  x = jax.random.normal(jax.random.key(2), (1, pos.shape[1], dense.dim))
  params = random_params(dense, x, pos, seg, img)
  mot_params = backbone.with_image_copies(params, ALL)
  got = backbone.Backbone(config(ALL)).apply({"params": mot_params}, x, pos, seg, img)
  want = backbone.Backbone(dense).apply({"params": params}, x, pos, seg, img)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_parts_and_active_parameters():
  with pytest.raises(ValueError, match="unknown parts \\['attention'\\]"):
    backbone.BackboneConfig.from_config({"num_layers": 1, "dim": 8, "num_heads": 2, "mot": ("attention",)})
  assert backbone.is_image_copy("decoder/layers/attn/q_image/kernel")
  assert backbone.is_image_copy("decoder/layers/mlp_image/up/kernel")
  assert not backbone.is_image_copy("decoder/layers/attn/q/kernel")
  assert not backbone.is_image_copy("embed/embedding_image")  # a leaf's own name does not count


def test_a_mot_model_counts_its_copies_apart_and_its_flops_as_the_dense_model():
  """--mode=params: total = dense + copies, active = dense; the FLOP count (6·N over the matmuls a token uses)
  equals the dense model's."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from unimm.parallel import sharding  # pylint: disable=g-import-not-at-top
  from unimm.train import param_table, setup as setup_lib  # pylint: disable=g-import-not-at-top
  totals = {}
  for mot in ((), ALL):
    c = common.base_config()
    common.tiny_recipe(c, "shapes")
    c.model.backbone.mot = mot
    totals[mot] = param_table.summary(param_table.param_rows(c, 128, 1), {})
    built = setup_lib.build(c, sharding.make_mesh(c.mesh), 128, frozen_codec=None)
    totals[mot]["flops"] = setup_lib.flops_per_token(built, c)
    assert built.total_params == totals[mot]["total"] and built.matmul_params == totals[mot]["matmul"]
  dense, mot = totals[()], totals[ALL]
  b = 4 * (3 * 128 * 128 + 128 * 128 + 3 * 128 * 384 + 2 * 128) + 128  # per layer: qkv, o, mlp, 2 norms; final
  assert dense["image_copies"] == 0 and mot["image_copies"] == b
  assert mot["total"] == dense["total"] + b and mot["active"] == dense["total"]
  assert mot["matmul"] == dense["matmul"] and mot["flops"] == dense["flops"]


@pytest.mark.slow
def test_lmfusion_trains_the_image_copies_from_a_frozen_text_lm(data_dir, tmp_path):
  """A text LM (`:text_lm`), then LMFusion from its checkpoint (`:lmfusion`): the copies start at the LM's
  text weights and train; everything the LM had but the patch and timestep layers stays bit for bit; sampling
  runs on the result."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  from test_train_loop import command  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from unimm.train import checkpoint  # pylint: disable=g-import-not-at-top

  def train(variant, workdir, *overrides):
    cmd = command(data_dir, workdir, "--config.train.num_steps=3", "--config.train.checkpoint_every=3", *overrides)
    cmd[3] = f"--config=configs/transfusion/tiny.py:{variant}"
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return traverse_util.flatten_dict(checkpoint.Checkpointer(f"{workdir}/checkpoints", async_save=False)
                                      .restore_params(), sep="/")

  lm = train("text_lm", str(tmp_path / "lm"))
  fused = train("lmfusion", str(tmp_path / "fused"), f"--config.train.init_from={tmp_path}/lm/checkpoints")
  copies = [k for k in fused if backbone.is_image_copy(k)]
  assert sorted(k for k in fused if k not in copies) == sorted(lm)
  trained = [k for k in lm if k.split("/")[0] in ("patch", "time")]  # the image input and output layers
  assert trained and any(np.abs(fused[k] - lm[k]).max() > 0 for k in trained)
  for k in lm:  # the LM: frozen
    if k not in trained:
      np.testing.assert_array_equal(fused[k], lm[k], err_msg=k)
  moved = []
  for k in copies:  # each copy started at its text twin, then trained (3 steps, one at learning rate 0)
    twin = k.replace("_image/", "/")
    moved.append(float(np.abs(fused[k] - lm[twin]).max()))
    assert moved[-1] < 0.1, (k, moved[-1])
  assert min(moved) > 0, "a copy did not train"
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"id": "a", "parts": [{"text": "a red circle"}], "generate": "image"}) + "\n")
  cmd = [sys.executable, "-m", "unimm.main", "--mode=sample", "--config=configs/transfusion/tiny.py:lmfusion",
         f"--workdir={tmp_path}/fused", f"--prompts={prompts}", f"--out={tmp_path}/out", "--diffusion_steps=2",
         *[a for a in command(data_dir, "x")[4:] if a.startswith("--config.")]]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "error" not in json.loads(open(tmp_path / "out" / "manifest.jsonl").readline())


@pytest.mark.parametrize("path,arg", [("configs/chameleon/tiny.py", None), ("configs/janus/tiny.py", "stage2"),
                                      ("configs/transfusion/tiny.py", None)])
def test_every_family_routes_its_image_slots_to_the_copies(data_dir, path, arg):
  """On a real packed batch of each family (Chameleon's code slots, Janus's SigLIP-read and code-written
  slots, Transfusion's patches): copies equal to the text weights give the dense family's loss, and
  moving only the copies moves the loss (so the family's image slots reach them)."""
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from unimm import families  # pylint: disable=g-import-not-at-top
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top

  def build(mot):
    c = load_config(path, arg)
    c.data.data_dir = data_dir
    for source in c.data.sources.values():
      if source.get("tfds_name") == "shapes":
        source.builder_config = "small"
    c.data.batch_size = 2
    c.model.backbone.mot = mot
    record = families.of(c)
    tokenizer = pipeline.load_tokenizer(c.data)
    return c, families.build_task(c, tokenizer.vocab_size, frozen_codec=record.random_frozen_codec(c, 0))

  c, dense = build(())
  _, mot = build(ALL)
  batch = next(pipeline.build_pipeline(c, "train"))
  assert (batch["image_ids"] > 0).any()
  params = nn.meta.unbox(jax.jit(dense.init)(jax.random.key(0), batch))

  def loss(task, p):
    terms = jax.jit(task.loss_terms)(p, batch, jax.random.key(1), 0)
    return float(task.combine(terms, task.loss_counts(batch))[0])

  tied = backbone.with_image_copies(params, ALL)
  assert loss(mot, tied) == pytest.approx(loss(dense, params), rel=1e-6)
  moved = jax.tree_util.tree_map_with_path(
      lambda k, p: p * 1.5 if backbone.is_image_copy("/".join(str(getattr(e, "key", e)) for e in k)) else p, tied)
  assert abs(loss(mot, moved) - loss(dense, params)) > 1e-3
