"""A KL-VAE's latent shift/scale: measured at the end of its training run, stored beside its checkpoints,
measured and recorded by a consumer that finds none, bypassed when pinned; samplers clip x̂₀ only where
the latent space is bounded (pixels), never for a KL-VAE's latents."""

import dataclasses
import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHAPES_VAE_OVERRIDES, SHAPES_VAE_STEPS, embedded_spec, load_config
from unimm import diffusion, families
from unimm.data import documents, sources
from unimm.inference import images as images_lib, prompts as prompts_lib
from unimm.models import autoencoders
from unimm.train import checkpoint, latent_stats, loop
from test_generation import SPECIALS, FakeTokenizer

STATS = latent_stats.STATS_FILE


def consumer_config(data_dir: str, vae_checkpoints: str, **autoencoder):
  """configs/transfusion/tiny.py:shapes_vae reading the `shapes_vae` fixture's VAE from `vae_checkpoints`."""
  config = load_config("configs/transfusion/tiny.py", "shapes_vae")
  config.data.data_dir = data_dir
  config.data.sources.shapes.builder_config = "small"
  for override in SHAPES_VAE_OVERRIDES:  # "--config.model.autoencoder.KEY=VALUE"
    key, value = override.removeprefix("--config.model.autoencoder.").split("=")
    config.model.autoencoder[key] = type(config.model.autoencoder[key])(value)
  config.model.autoencoder.update(checkpoint=vae_checkpoints, **autoencoder)
  return config


def copied_checkpoints(shapes_vae: str, tmp_path) -> str:
  """A copy of the fixture VAE's checkpoints dir (the fixture's own stays as its run left it)."""
  directory = str(tmp_path / "vae_checkpoints")
  shutil.copytree(os.path.join(shapes_vae, "checkpoints"), directory)
  return directory


def validation_images(data_dir: str) -> np.ndarray:
  """Every image of the shapes/small validation split (the stats were measured on the train split)."""
  ds = sources.open_source(embedded_spec("shapes", "small"), "validation", data_dir)
  out = [p.pixels for i in range(len(ds)) if isinstance(ds[i], documents.Document)
         for p in ds[i].parts if isinstance(p, documents.Image)]
  return np.stack(out)


@pytest.mark.xdist_group("shapes_vae")
def test_vae_run_records_stats_that_give_unit_variance_on_validation(shapes_vae, data_dir):
  directory = os.path.join(shapes_vae, "checkpoints")
  stored = json.load(open(os.path.join(directory, STATS)))
  assert stored["step"] == SHAPES_VAE_STEPS and stored["images"] == 1024 and not stored["centered"]
  assert stored["shift"] == 0.0 and stored["scale"] == pytest.approx(1 / stored["std"])
  assert "training run" in stored["source"]
  # Orbax and the set-aside of unfinished saves see only the step directory.
  assert checkpoint.incomplete_step_dirs(directory) == []
  assert checkpoint.Checkpointer(directory, async_save=False).latest_step() == SHAPES_VAE_STEPS

  # Independently: posterior samples of the validation images, from the encoder's outputs, in NumPy.
  images = validation_images(data_dir)
  assert len(images) >= 100
  params = checkpoint.Checkpointer(directory, async_save=False).restore_params()
  cfg = autoencoders.AutoencoderConfig.from_config(consumer_config(data_dir, directory).model.autoencoder)
  vae = autoencoders.KLVAE(cfg, 3)
  posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.posterior))
  mean, logvar = (np.asarray(a, np.float64) for a in posterior(params, images))
  z = mean + np.exp(0.5 * logvar) * np.random.default_rng(0).standard_normal(mean.shape)
  scaled = (z - stored["shift"]) * stored["scale"]
  print(f"validation latents: std {z.std():.4f} raw, {scaled.std():.4f} scaled (train-split std {stored['std']:.4f})")
  assert abs(scaled.std() - 1.0) < 0.1

  # The consumer's encoder applies exactly those: encode = (posterior mean − shift)·scale.
  frozen = families.load_frozen_codec(consumer_config(data_dir, directory))
  assert (frozen.shift, frozen.scale) == (stored["shift"], stored["scale"])
  resolved = autoencoders.KLVAE(families.with_latent_stats(cfg, frozen)[0], 3)
  encoded = jax.jit(lambda p, x: resolved.apply({"params": p}, x, method=resolved.encode))(params, images[:8])
  np.testing.assert_allclose(np.asarray(encoded), (mean[:8] - stored["shift"]) * stored["scale"], rtol=1e-4,
                             atol=1e-5)


@pytest.mark.xdist_group("shapes_vae")
def test_consumer_measures_and_records_missing_or_stale_stats(shapes_vae, data_dir, tmp_path, caplog):
  original = json.load(open(os.path.join(shapes_vae, "checkpoints", STATS)))
  directory = copied_checkpoints(shapes_vae, tmp_path)
  path = os.path.join(directory, STATS)
  os.remove(path)
  config = consumer_config(data_dir, directory)
  with caplog.at_level(logging.WARNING):
    frozen = families.load_frozen_codec(config)
  assert any(f"has no {STATS}" in r.getMessage() for r in caplog.records), caplog.text
  recorded = json.load(open(path))
  assert "first use" in recorded["source"] and recorded["step"] == original["step"]
  # The consumer's train split (packed with captions, other posterior noise) gives the same values.
  assert recorded["scale"] == pytest.approx(original["scale"], rel=0.03)
  assert (frozen.shift, frozen.scale) == (recorded["shift"], recorded["scale"])
  task = families.build_task(config, 128, frozen_codec=frozen)
  assert (task.autoencoder.shift, task.autoencoder.scale) == (recorded["shift"], recorded["scale"])

  # Stats of an older VAE step are measured again; current ones are read as they are.
  json.dump({**recorded, "step": original["step"] - 1, "scale": 123.0}, open(path, "w"))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    frozen = families.load_frozen_codec(config)
  assert any(f"measured on step {original['step'] - 1}" in r.getMessage() for r in caplog.records), caplog.text
  again = json.load(open(path))
  assert again["step"] == original["step"] and frozen.scale == again["scale"] == pytest.approx(original["scale"],
                                                                                                rel=0.03)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert families.load_frozen_codec(config).scale == again["scale"]
  assert not caplog.records and json.load(open(path)) == again


@pytest.mark.xdist_group("shapes_vae")
def test_pinned_scale_never_reads_or_writes_the_stats(shapes_vae, data_dir, tmp_path):
  directory = copied_checkpoints(shapes_vae, tmp_path)
  path = os.path.join(directory, STATS)
  os.remove(path)
  config = consumer_config(data_dir, directory, scale=0.25, shift=0.5)
  frozen = families.load_frozen_codec(config)
  assert (frozen.shift, frozen.scale) == (0.5, 0.25) and not os.path.exists(path)
  json.dump({"shift": 9.0, "scale": 123.0}, open(path, "w"))  # not even valid stats: never read
  frozen = families.load_frozen_codec(config)
  assert (frozen.shift, frozen.scale) == (0.5, 0.25)
  task = families.build_task(config, 128, frozen_codec=frozen)
  images = validation_images(data_dir)[:2]
  raw_vae = autoencoders.KLVAE(dataclasses.replace(task.autoencoder, shift=0.0, scale=1.0), 3)
  raw = raw_vae.apply({"params": frozen.params}, images, method=raw_vae.encode)
  np.testing.assert_allclose(np.asarray(task.encode_images(images[None]))[0], (np.asarray(raw) - 0.5) * 0.25,
                             rtol=1e-5, atol=1e-6)
  # Bare params with an unpinned scale build (shapes, parameter counts) but refuse to encode.
  unresolved = families.build_task(consumer_config(data_dir, directory), 128, frozen_codec=frozen.params)
  with pytest.raises(ValueError, match="scale 0.0 is unresolved"):
    unresolved.encode_images(images[None])
  with pytest.raises(ValueError, match="model.autoencoder.scale=-1"):
    families.build_task(consumer_config(data_dir, directory, scale=-1.0), 128, frozen_codec=frozen.params)
  with pytest.raises(ValueError, match="shift=0.5 is only used with a pinned scale"):
    families.build_task(consumer_config(data_dir, directory, shift=0.5), 128, frozen_codec=frozen.params)


def test_clip_setting_resolves_by_latent_space():
  assert diffusion.x0_clip(-1, latents_bounded=True) == 1.0 and diffusion.x0_clip(-1, latents_bounded=False) is None
  assert diffusion.x0_clip(0, latents_bounded=True) is None and diffusion.x0_clip(2.5, latents_bounded=False) == 2.5
  with pytest.raises(ValueError, match="model.clip_x0=-2.0"):
    diffusion.x0_clip(-2, latents_bounded=True)
  config = load_config("configs/transfusion/tiny.py", "shapes_vae")
  config.model.clip_x0 = 3.0
  assert families.build_task(config, 128, frozen_codec={}).x0_clip == 3.0
  config = load_config("configs/transfusion/tiny.py", "shapes")
  config.model.clip_x0 = 0.0
  assert families.build_task(config, 128).x0_clip is None


def test_samplers_clip_pixels_but_never_vae_latents(monkeypatch):
  """Through the KV-cached generator and the full-row reference sampler of tiny.py:shapes_vae (random
  params): the clip reaching the DDIM steps, and, with ε ≡ 0 (x̂₀ = x_t/√ᾱ_t, far outside [-1, 1] at high
  noise), the latents the sampler returns. Then the same model behind the identity autoencoder (pixels)."""
  config = load_config("configs/transfusion/tiny.py", "shapes_vae")
  config.model.backbone.update(num_layers=1, dim=32, num_heads=2, mlp_hidden=64)
  config.model.objective, config.model.prediction = "ddpm", "epsilon"  # x̂₀ clipping here is DDPM's
  # Bare VAE params: its encode/decode are stubbed below, as they play no part in the clipping (and its
  # convolutions take ~30 s to compile on a CPU).
  vae_task = families.build_task(config, 128, frozen_codec=autoencoders.FrozenVAE({}, shift=0.0, scale=1.0))
  params = nn.meta.unbox(jax.jit(vae_task.init)(jax.random.key(0), vae_task.dummy_batch(1, 128, vae_task.image_shape)))
  pixel_task = dataclasses.replace(vae_task, autoencoder=autoencoders.AutoencoderConfig(kind="identity"))
  clips, finals = [], []
  update, sample = diffusion._update, diffusion.sample  # pylint: disable=protected-access

  def recording_step(*args, clip, **kwargs):  # each sampler step (compiled: record the call, not the trace)
    clips.append(clip)
    return update(*args, clip=clip, **kwargs)

  def recording_sample(*args, **kwargs):
    finals.append(np.asarray(sample(*args, **kwargs)))
    return finals[-1]
  monkeypatch.setattr(diffusion, "_update", recording_step)
  monkeypatch.setattr(diffusion, "sample", recording_sample)
  num_steps, key = 3, jax.random.key(5)
  noise = np.asarray(jax.random.normal(key, (1, *vae_task.model.latent_shape), jnp.float32), np.float64)
  abar = diffusion.cosine_alphas_cumprod(1000)
  for task, clip in ((vae_task, None), (pixel_task, 1.0)):
    assert task.x0_clip == clip
    task.to_epsilon = lambda output, x_t, t: jnp.zeros_like(x_t)
    task.encode_images = lambda images, rng=None: jnp.zeros((*images.shape[:2], *vae_task.model.latent_shape))
    task.decode_latents = lambda latents, channels: np.zeros((len(latents), *vae_task.image_shape), np.uint8)
    clips.clear()
    finals.clear()
    prompt = prompts_lib.encode([documents.Text("1 2 3")], FakeTokenizer(), task.model.slots)
    images_lib.ImageGenerator(task, params, SPECIALS).generate([prompt], key, num_steps=num_steps, guidance=None)
    task.sample_images(params, np.array([[11, 12, 13]]), np.array([3]), key, specials=SPECIALS, num_steps=num_steps,
                       guidance=1.0)
    assert clips == [clip] * (2 * num_steps) and len(finals) == 2
    for final in finals:
      if clip is None:  # DDIM with ε = 0 and no clipping telescopes to x_T / √ᾱ_{T-1}
        np.testing.assert_allclose(final, noise / np.sqrt(abar[-1]), rtol=1e-3)
        assert np.abs(final).max() > 10
      else:
        assert np.abs(final).max() <= 1.0
