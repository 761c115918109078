"""Tiny Chameleon on `shapes` or `digits`: images as VQ codes in the vocabulary; trains on 2 CPU cores.

First train the tiny tokenizer, then the model on its codes:

    python -m unimm.main --config=configs/tokenizers/tiny.py:shapes --workdir=/tmp/unimm_vq_shapes
    python -m unimm.main --config=configs/chameleon/tiny.py --workdir=/tmp/unimm_chameleon \\
        --config.model.vq.checkpoint=/tmp/unimm_vq_shapes/checkpoints

(`:digits` with configs/tokenizers/tiny.py:digits.) The backbone, rows and training recipe are
`configs.common.tiny_recipe`, as Transfusion's and Janus's, so the families compare at equal size
(bench/compare_families.py).
"""

from configs import common
from configs.tokenizers import tiny as tiny_tokenizer


def get_config(arg=None):
  variant = arg or "shapes"
  if variant not in ("shapes", "digits"):
    raise ValueError(f"chameleon/tiny.py takes ':shapes' or ':digits', got {arg!r}")
  c = common.base_config("chameleon")
  dataset = tiny_tokenizer.set_tokenizer(c, variant)  # shapes: 8×8 codes, 64 slots an image
  common.tiny_recipe(c, dataset)
  c.model.backbone.update(bidirectional_images=False, qk_norm=True)
  c.model.z_loss = 1e-5  # the paper's stability measures (dropout and norm reordering are off at this size)
  c.data.image_token_weight = 1.0  # codes are next-token targets like text
  c.data.caption_first_prob = 0.7
  return c
