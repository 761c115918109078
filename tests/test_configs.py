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
