"""diffusers' AutoencoderKL → unimm's KL-VAE (layout `diffusers`), judged by diffusers' own implementation."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from unimm.convert import diffusers_vae  # noqa: E402
from unimm.models import autoencoders  # noqa: E402

TOL = 1e-4


def _save(directory: str, seed: int = 0, **overrides):
  settings = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                  norm_num_groups=32, sample_size=32, scaling_factor=0.3, shift_factor=0.1)
  settings.update(overrides)
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(**settings).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # norms ≠ 1 and biases ≠ 0 (their inits), so each must land in its place to match
    for name, p in vae.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  vae.save_pretrained(directory)
  return vae


def _images(seed: int, n: int = 2):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)


def _nchw(images):
  return torch.tensor(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_latents_and_decodes_match_diffusers(tmp_path, kind):
  overrides = {} if kind == "sd" else dict(  # FLUX's VAE: no quant convs, a shift, 16 channels, 2 blocks a level
      use_quant_conv=False, use_post_quant_conv=False, latent_channels=16, layers_per_block=2,
      scaling_factor=0.3611, shift_factor=0.1159)
  reference = _save(str(tmp_path), **overrides)
  settings, params = diffusers_vae.load(str(tmp_path))
  assert settings["quant_conv"] == (kind == "sd") and settings["layout"] == "diffusers"
  vae = autoencoders.KLVAE(autoencoders.AutoencoderConfig(**settings), 3)
  images = _images(1)
  mean, _ = vae.apply({"params": params}, images, method=vae.posterior)
  latents = vae.apply({"params": params}, images, method=vae.encode)  # the diffusion's (z − shift)·scale
  with torch.no_grad():
    ref_mean = reference.encode(_nchw(images)).latent_dist.mean
    ref_decoded = reference.decode(ref_mean).sample.permute(0, 2, 3, 1).numpy()
  ref_mean = ref_mean.permute(0, 2, 3, 1).numpy()
  assert np.abs(np.asarray(mean) - ref_mean).max() <= TOL
  cfg = reference.config
  np.testing.assert_allclose(latents, (ref_mean - (cfg.shift_factor or 0)) * cfg.scaling_factor, atol=TOL)
  decoded = vae.apply({"params": params}, latents, method=vae.decode)
  assert np.abs(np.asarray(decoded) - ref_decoded).max() <= TOL


def test_refuses_what_it_cannot_map():
  base = dict(_class_name="AutoencoderKL", block_out_channels=[32, 64], latent_channels=4)
  with pytest.raises(ValueError, match="AutoencoderKL"):
    diffusers_vae.read_settings({**base, "_class_name": "AutoencoderTiny"})
  with pytest.raises(ValueError, match="act_fn='gelu'"):
    diffusers_vae.read_settings({**base, "act_fn": "gelu"})
  with pytest.raises(ValueError, match="not multiples of the first"):
    diffusers_vae.read_settings({**base, "block_out_channels": [32, 48]})


def test_export_round_trip_gives_the_same_autoencoder(tmp_path):
  reference = _save(str(tmp_path / "source"), seed=3)
  settings, params = diffusers_vae.load(str(tmp_path / "source"))
  diffusers_vae.save(params, settings, str(tmp_path / "exported"))
  reloaded = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "exported")).eval()
  a, b = reference.state_dict(), reloaded.state_dict()
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name].numpy(), b[name].numpy(), err_msg=name)
  assert reloaded.config.scaling_factor == 0.3 and reloaded.config.shift_factor == pytest.approx(0.1)
