"""Configs load, and the paper sizes have the paper's parameter counts (never materialised)."""

import jax
import numpy as np
import pytest

from conftest import load_config
from unimm.models import families

PAPER_SIZES = {  # Transfusion Table 2, in billions
    "configs/transfusion/160m.py": 0.16,
    "configs/transfusion/370m.py": 0.37,
    "configs/transfusion/760m.py": 0.76,
    "configs/transfusion/1_4b.py": 1.4,
    "configs/transfusion/7b.py": 7.0,
}


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("path,billions", sorted(PAPER_SIZES.items()))
def test_paper_parameter_counts(path, billions):
  config = load_config(path)
  task = families.build_task(config, vocab_size=0, frozen_codec={})
  batch = task.dummy_batch(1, 64, (256, 256, 3))
  params = jax.eval_shape(task.init, jax.random.key(0), batch)
  backbone = count(params["decoder"]) + count(params["embed"]) + count(params["lm_head"])
  assert abs(backbone / 1e9 - billions) / billions < 0.05, backbone
  # The slots per 256-px image: latent 32×32 in 2×2 patches.
  assert config.data.image_slots == 256 and task.model.slots == 256


@pytest.mark.parametrize("arg", ["shapes", "digits"])
def test_tiny_configs(arg):
  config = load_config("configs/transfusion/tiny.py", arg)
  assert config.data.image_slots == (64 if arg == "shapes" else 16)
  with pytest.raises(ValueError, match="shapes"):
    load_config("configs/transfusion/tiny.py", "cifar")


def test_chameleon_7b_shape():
  """Chameleon-7B: 7B parameters, 65,536-token vocabulary of which 8,192 are codes, 1,024 codes per image."""
  config = load_config("configs/chameleon/7b.py")
  task = families.build_task(config, vocab_size=0, frozen_codec={})
  batch = task.dummy_batch(1, 64, (512, 512, 3))
  params = jax.eval_shape(task.init, jax.random.key(0), batch)
  assert abs(count(params) / 1e9 - 7.0) / 7.0 < 0.05, count(params)
  assert params["embed"]["embedding"].value.shape[0] == 65_536 and task.codebook_size == 8192 and task.text_vocab == 57_344
  assert task.model.slots == 1024 and config.model.backbone.qk_norm and config.model.z_loss == 1e-5


@pytest.mark.parametrize("path,arg,slots", [("configs/chameleon/tiny.py", "shapes", 64),
                                            ("configs/chameleon/tiny.py", "digits", 16),
                                            ("configs/tokenizers/tiny.py", "shapes", 64),
                                            ("configs/tokenizers/tiny.py", "shapes16", 16),
                                            ("configs/tokenizers/tiny.py", "digits", 16)])
def test_code_family_configs(path, arg, slots):
  config = load_config(path, arg)
  task = families.build_task(config, vocab_size=150, frozen_codec={})
  assert config.data.image_slots == slots
  if config.model.family == "chameleon":
    assert task.model.slots == slots and not config.model.backbone.bidirectional_images
    # The tiny Chameleon reads its tokenizer with the tiny tokenizer config's architecture.
    tokenizer = load_config("configs/tokenizers/tiny.py", arg)
    assert config.model.vq.to_dict() == tokenizer.model.vq.to_dict()


def test_chameleon_needs_a_tokenizer():
  config = load_config("configs/chameleon/tiny.py")
  with pytest.raises(ValueError, match="vq.checkpoint"):
    families.build_task(config, vocab_size=150)


@pytest.mark.parametrize("path,llm_billions", [("configs/janus/pro_1b.py", (1.4, 1.8)),
                                               ("configs/janus/pro_7b.py", (6.7, 7.1))])
def test_janus_pro_shapes(path, llm_billions):
  """Janus-Pro: DeepSeek-LLM backbone (102,400 ids), SigLIP-L/16 at 384 px (0.30B), 576 slots per image read
  (24×24 patches) or written (24×24 codes of a 16,384 codebook), image head to the codebook."""
  for stage in ("stage1", "stage2", "stage3"):
    config = load_config(path, stage)
    task = families.build_task(config, vocab_size=0,
                               frozen_codec={"quantizer": {"codebook": np.zeros((16_384, 8), np.float32)}})
    assert task.model.slots == 576 == config.data.image_slots and config.data.image_size == 384
  params = jax.eval_shape(task.init, jax.random.key(0), task.dummy_batch(1, 64, (384, 384, 3)))
  llm = count(params["decoder"]) + count(params["embed"]) + count(params["lm_head"])
  assert llm_billions[0] < llm / 1e9 < llm_billions[1], llm
  assert abs(count(params["vision_encoder"]) / 1e9 - 0.303) < 0.01, count(params["vision_encoder"])
  assert params["embed"]["embedding"].value.shape[0] == 102_400
  assert params["gen_head"]["fc2"]["kernel"].value.shape[-1] == 16_384 and params["gen_embed"].value.shape == (16_384, 8)
  assert config.train.trainable[-1] == "vision_encoder" and config.model.guidance == 5.0


@pytest.mark.parametrize("arg", ["stage1", "stage2", "stage3", "digits_stage1"])
def test_janus_tiny_stages(arg):
  """Each stage names what trains and its understanding : text : generation mix."""
  config = load_config("configs/janus/tiny.py", arg)
  dataset = "digits" if arg.startswith("digits") else "shapes"
  s = config.data.sources
  mix = (s[dataset + "_understanding"].weight, s[dataset + "_text"].weight, s[dataset].weight)
  assert mix == {"stage1": (1, 0, 3), "stage2": (2, 3, 5), "stage3": (5, 1, 4)}[arg[-6:]]
  assert ("vision_encoder" in config.train.trainable) == arg.endswith("3")
  assert ("decoder" in config.train.trainable) == (not arg.endswith("1"))
  assert config.data.caption_dropout_mode == "pad" and not config.data.train_read_images
  assert config.model.guidance == 5.0
  codebook = config.model.vq.codebook_size
  task = families.build_task(config, vocab_size=150, frozen_codec={"quantizer": {"codebook": np.zeros((codebook, 8))}})
  assert task.model.slots == task.model.vision.num_patches(task.image_shape) == (16 if dataset == "digits" else 64)
  # The tiny Janus reads with the tiny SigLIP's ViT.
  assert config.model.vision.to_dict() == load_config("configs/siglip/tiny.py", dataset).model.vision.to_dict()
  with pytest.raises(ValueError, match="stageN"):
    load_config("configs/janus/tiny.py", "stage4")
