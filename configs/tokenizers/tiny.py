"""Tiny VQ tokenizers for the embedded data, trained through the common trainer (family vq).

    python -m unimm.main --config=configs/tokenizers/tiny.py:shapes --workdir=/tmp/unimm_vq_shapes
    python -m unimm.main --config=configs/tokenizers/tiny.py:digits --workdir=/tmp/unimm_vq_digits
    python -m unimm.main --config=configs/tokenizers/tiny.py:shapes --workdir=/tmp/unimm_vq_shapes --mode=eval

shapes: 32×32 RGB → 8×8 codes (/4); `:shapes16` → 4×4 codes (/8); digits: 8×8 gray → 4×4 codes (/2).
The eval reports PSNR, codebook usage and the detector's / classifier's verdicts on reconstructions,
and writes reconstructions as PNG. configs/chameleon/tiny.py uses the result frozen
(--config.model.vq.checkpoint=WORKDIR/checkpoints).
"""

from configs import common

VARIANTS = {  # dataset, channel_mults, codebook size
    "shapes": ("shapes", (1, 2, 2), 512),
    "shapes16": ("shapes", (1, 2, 2, 2), 1024),
    "digits": ("digits", (1, 2), 256),
}


def set_tokenizer(c, variant: str) -> str:
  """Sets c.model.vq (and the image slots: one per code) to the tiny tokenizer `variant`; returns its dataset."""
  if variant not in VARIANTS:
    raise ValueError(f"tiny tokenizer variants are {sorted(VARIANTS)}, got {variant!r}")
  dataset, mults, codebook = VARIANTS[variant]
  c.model.vq.update(channels=16, channel_mults=mults, blocks_per_level=1, attention=True, z_channels=32,
                    codebook_size=codebook, code_dim=8)
  common.embedded_data(c, dataset)
  c.data.image_slots = (c.data.image_size // 2 ** (len(mults) - 1)) ** 2  # rows laid out as code families see them
  return dataset


def get_config(arg=None):
  variant = arg or "shapes"
  c = common.base_config("vq")
  dataset = set_tokenizer(c, variant)
  c.model.vq_loss.update(reinit_dead_codes_every=100)
  c.data.seq_len = 256 if dataset == "shapes" else 128
  c.data.batch_size = 8
  c.data.max_images_per_row = 4 if dataset == "shapes" else 6
  t = c.train
  t.num_steps = 1500
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.final_learning_rate = 1e-4
  t.weight_decay = 0.0
  t.log_every = 50
  t.checkpoint_every = 500
  t.sample_every = 0
  t.final_eval_examples = 200  # ends by evaluating the test split (PSNR, usage, detector/classifier verdicts)
  return c
