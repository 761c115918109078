"""Weight decay by what a parameter is: the same set with `scan` on and off, for every family; per-path
multipliers (`train.wd_mults`); the AdamW update against a NumPy reference."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from conftest import load_config
from unimm.train import optimizer, settings, setup as setup_lib

TINY = [("configs/transfusion/tiny.py", "shapes"), ("configs/transfusion/tiny.py", "shapes_vae"),
        ("configs/chameleon/tiny.py", None), ("configs/janus/tiny.py", "stage3"), ("configs/siglip/tiny.py", None),
        ("configs/tokenizers/tiny.py", "shapes"), ("configs/vae/shapes.py", None)]
PAPER = [("configs/transfusion/7b.py", None), ("configs/chameleon/7b.py", None)]


def decayed(config) -> dict[str, float]:
  """{path with scanned/unrolled layers named alike: multiplier} of the config's params."""
  params = setup_lib.abstract_params(config, 128)
  mults = optimizer.decay_multipliers(nn.unbox(params), settings.TrainSettings.from_config(config.train).wd_mults)
  out = {}
  for path, mult in jax.tree_util.tree_leaves_with_path(mults):
    out[re.sub(r"/layer_\d+/", "/layers/", optimizer.path_name(path))] = mult
  return out


def with_scan(config, scan: bool):
  config = mlc.ConfigDict(config.to_dict())
  for name in ("backbone", "siglip_text"):  # the text backbones (SigLIP's text tower: family siglip only)
    if name in config.model:
      config.model[name].update(scan=scan, remat="none")
  return config


@pytest.mark.parametrize("path,arg", TINY + PAPER)
def test_decayed_set_is_the_same_with_scan_on_and_off(path, arg):
  config = load_config(path, arg)
  on, off = decayed(with_scan(config, True)), decayed(with_scan(config, False))
  assert on == off
  assert any(on.values())
  for name, mult in on.items():
    leaf = name.rsplit("/", 1)[-1]
    # kernels of dense and conv layers decay; norms' scales, biases, embeddings, codebooks, probes do not
    assert mult == (1.0 if leaf == "kernel" else 0.0), name
  if config.model.family in ("transfusion", "chameleon"):
    assert on["decoder/layers/attn_norm/scale"] == 0 and on["decoder/layers/attn/q/kernel"] == 1
    assert on["embed/embedding"] == 0 and on["lm_head/kernel"] == 1


def test_wd_mults_first_match_wins_and_bad_entries_fail():
  mults = ((r"lm_head/kernel", 0.5), (r"(.*/)?kernel", 1.0), (r".*/bias", 2.0))
  assert optimizer.decay_multiplier("lm_head/kernel", mults) == 0.5
  assert optimizer.decay_multiplier("decoder/layers/mlp/up/kernel", mults) == 1.0
  assert optimizer.decay_multiplier("vision_encoder/attn/q_bias", mults) == 0.0  # fullmatch: not ".*/bias"
  assert optimizer.decay_multiplier("decoder/final_norm/scale", mults) == 0.0
  with pytest.raises(ValueError, match="expected \\(path regex, multiplier\\)"):
    optimizer.wd_mults_of((("kernel",),))


def test_adamw_step_matches_numpy_reference():
  """One step: Adam's update, plus lr · wd · multiplier · param (decoupled), after clipping."""
  train = mlc.ConfigDict(dict(learning_rate=0.1, warmup_steps=0, num_steps=10, final_learning_rate=0.1, b1=0.9,
                              b2=0.95, eps=1e-8, weight_decay=0.3, grad_clip=1.0,
                              wd_mults=((r"head/kernel", 0.5), (r"(.*/)?kernel", 1.0))))
  rng = np.random.default_rng(0)
  params = {"layers": {"attn_norm": {"scale": rng.normal(size=(2, 4))}, "q": {"kernel": rng.normal(size=(2, 4, 4))}},
            "head": {"kernel": rng.normal(size=(4, 3))}, "embed": {"embedding": rng.normal(size=(5, 4))}}
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape) * 0.3, params)
  base = load_config("configs/transfusion/tiny.py", "shapes").train
  base.update(train)
  tx = optimizer.make_optimizer(settings.TrainSettings.from_config(base))
  f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  updates, _ = tx.update(f32(grads), tx.init(f32(params)), f32(params))
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  clip = min(1.0, 1.0 / norm)
  lr = 0.1 * 0.5 * (1 + np.cos(0))  # cosine at step 0 = peak (no warm-up)
  for path, mult in (("layers/attn_norm/scale", 0.0), ("layers/q/kernel", 1.0), ("head/kernel", 0.5),
                     ("embed/embedding", 0.0)):
    keys = path.split("/")
    p, g, u = params, grads, updates
    for k in keys:
      p, g, u = p[k], g[k], u[k]
    g = g * clip
    m, v = (1 - 0.9) * g / (1 - 0.9), (1 - 0.95) * g * g / (1 - 0.95)  # bias-corrected first moments
    want = -lr * (m / (np.sqrt(v) + 1e-8) + 0.3 * mult * p)
    np.testing.assert_allclose(np.asarray(u), want, rtol=2e-5, atol=1e-7, err_msg=path)
