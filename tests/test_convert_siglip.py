"""Hugging Face SigLIP vision towers → unimm's ViT, judged by transformers' own SiglipVisionModel."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unimm.convert import siglip  # noqa: E402
from unimm.models import vit  # noqa: E402

TOL = 1e-4


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_features_and_pooled_output_match_transformers(tmp_path, act):
  config = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8, hidden_act=act)
  torch.manual_seed(0)
  reference = transformers.SiglipVisionModel(config).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():  # LayerNorms ≠ (1, 0), so each must land in its place
    for name, p in reference.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
  reference.save_pretrained(str(tmp_path))
  settings, params = siglip.load(str(tmp_path))
  assert settings["gelu_exact"] == (act == "gelu")
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  with torch.no_grad():
    out = reference(pixel_values=torch.tensor(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2))
  cfg = siglip.vit_config(settings, dtype="float32", remat=False)
  features = vit.ViT(cfg).apply({"params": params["image_encoder"]}, images)
  assert np.abs(np.asarray(features) - out.last_hidden_state.numpy()).max() <= TOL
  pooled = vit.MAPHead(cfg.num_heads, cfg.mlp_dim, np.float32, cfg.gelu_exact).apply({"params": params["map_head"]}, features)
  assert np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max() <= TOL
  if act == "gelu":  # the exact GELU matters: the tanh one misses
    tanh = vit.ViT(siglip.vit_config({**settings, "gelu_exact": False}, dtype="float32", remat=False))
    assert np.abs(np.asarray(tanh.apply({"params": params["image_encoder"]}, images))
                  - out.last_hidden_state.numpy()).max() > 5 * TOL


def test_a_converted_tower_is_janus_understanding_encoder(tmp_path):
  """`unimm.convert` writes the tower where Janus reads its ViT (`model.vision.checkpoint`): a Janus run
  starts with exactly the converted weights in `vision_encoder`."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from configs.janus import tiny  # pylint: disable=g-import-not-at-top
  from unimm.convert import workdir as convert_workdir  # pylint: disable=g-import-not-at-top
  from unimm.train import loop, setup  # pylint: disable=g-import-not-at-top
  config = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=4)  # Janus tiny: 64 slots
  torch.manual_seed(2)
  transformers.SiglipVisionModel(config).save_pretrained(str(tmp_path / "hf"))
  summary = convert_workdir.import_any(str(tmp_path / "hf"), str(tmp_path / "w"))
  c = tiny.get_config()
  c.model.vision.update(summary["vision"], feature_layer=-1, dtype="float32")
  c.model.vq.checkpoint = ""  # the VQ is another part; random here
  shapes = nn.unbox(setup.abstract_params(c, 128))  # no weights made: zeros stand in for a fresh init
  started = loop.start_params(c, jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), shapes))
  _, params = siglip.load(str(tmp_path / "hf"))
  np.testing.assert_array_equal(started["vision_encoder"]["block_1"]["attn"]["q"]["kernel"],
                                params["image_encoder"]["block_1"]["attn"]["q"]["kernel"])
  np.testing.assert_array_equal(started["vision_encoder"]["pos_embedding"], params["image_encoder"]["pos_embedding"])


def test_a_siglip_workdir_exports_the_tower_it_started_from(tmp_path):
  """A family-siglip run started from a converted tower (`train.init_from`) exports, before training, the
  same tensors as a SiglipVisionModel (tower and MAP head) that transformers loads."""
  import subprocess, sys, os  # pylint: disable=g-import-not-at-top,multiple-imports
  from configs.siglip import tiny  # pylint: disable=g-import-not-at-top
  from unimm.convert import safetensors_io, workdir as convert_workdir  # pylint: disable=g-import-not-at-top
  from unimm.train import config_record  # pylint: disable=g-import-not-at-top
  config = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=4, hidden_act="gelu")
  torch.manual_seed(3)
  transformers.SiglipVisionModel(config).save_pretrained(str(tmp_path / "hf"))
  summary = convert_workdir.import_any(str(tmp_path / "hf"), str(tmp_path / "w"))
  c = tiny.get_config()
  c.model.vision.update(summary["vision"], checkpoint="")
  c.train.init_from = summary["vision"]["checkpoint"]
  config_record.write_record(str(tmp_path / "w"), config_record.make_record(c))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "unimm.convert", "--to_hf", f"--workdir={tmp_path / 'w'}",
                         f"--out={tmp_path / 'out'}"], cwd=repo, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  a, b = safetensors_io.CheckpointReader(str(tmp_path / "hf")), safetensors_io.CheckpointReader(str(tmp_path / "out"))
  assert sorted(a.keys()) == sorted(b.keys())
  for name in a.keys():
    np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
  reloaded = transformers.SiglipVisionModel.from_pretrained(str(tmp_path / "out"))
  assert reloaded.config.hidden_act == "gelu" and reloaded.config.vision_use_head
