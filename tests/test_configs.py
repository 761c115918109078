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
  task = families.build_task(config, vocab_size=0, frozen_autoencoder={})
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
