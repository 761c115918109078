"""Tiny Chameleon on `shapes` or `digits`: images as VQ codes in the vocabulary; trains on 2 CPU cores.

First train the tiny tokenizer, then the model on its codes:

    python -m unimm.main --config=configs/tokenizers/tiny.py:shapes --workdir=/tmp/unimm_vq_shapes
    python -m unimm.main --config=configs/chameleon/tiny.py --workdir=/tmp/unimm_chameleon \\
        --config.model.vq.checkpoint=/tmp/unimm_vq_shapes/checkpoints

(`:digits` with configs/tokenizers/tiny.py:digits.) The backbone, data mix and training recipe are
configs/transfusion/tiny.py's, so the two families compare at equal size (bench/compare_families.py).
"""

from configs import common
from configs.tokenizers import tiny as tiny_tokenizer


def get_config(arg=None):
  variant = arg or "shapes"
  if variant not in ("shapes", "digits"):
    raise ValueError(f"chameleon/tiny.py takes ':shapes' or ':digits', got {arg!r}")
  c = common.base_config()
  c.model.family = "chameleon"
  c.model.backbone.update(num_layers=4, dim=128, num_heads=4, mlp_hidden=384, remat="none", scan=False,
                          dtype="float32", attention="xla", bidirectional_images=False, qk_norm=True)
  c.model.z_loss = 1e-5  # the paper's stability measures (dropout and norm reordering are off at this size)
  dataset = tiny_tokenizer.set_tokenizer(c, variant)  # shapes: 8×8 codes (64 slots, as Transfusion's 4×4 patches)
  c.data.image_token_weight = 1.0  # codes are next-token targets like text
  c.data.seq_len = 256 if dataset == "shapes" else 128
  c.data.batch_size = 16
  c.data.max_images_per_row = 4 if dataset == "shapes" else 6
  c.data.caption_first_prob = 0.7

  t = c.train
  t.num_steps = 1200
  t.learning_rate = 3e-3
  t.warmup_steps = 100
  t.final_learning_rate = 1e-4
  t.weight_decay = 0.0
  t.log_every = 25
  t.checkpoint_every = 400
  t.sample_every = 400
  t.final_eval_examples = 100
  return c
