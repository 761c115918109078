"""Tiny SigLIP pretraining of the ViT Janus reads images with, on `shapes` or `digits` (2 CPU cores).

    python -m unimm.main --config=configs/siglip/tiny.py:shapes --workdir=/tmp/unimm_siglip_shapes
    python -m unimm.main --config=configs/siglip/tiny.py:digits --workdir=/tmp/unimm_siglip_digits

Ends with the zero-shot evaluation on the test split (image→text accuracy among the distinct test
captions — ten-way zero-shot classification for digits — and text→image recall@1). Janus starts from
it: --config.model.vision.checkpoint=WORKDIR/checkpoints.
"""

from configs import common


def set_vision(c, dataset: str) -> None:
  """The tiny ViT for `dataset`: one patch per tiny-tokenizer code (shapes 4×4 → 8×8, digits 2×2 → 4×4)."""
  c.model.vision.update(patch_size=4 if dataset == "shapes" else 2, width=64, depth=4, num_heads=4, mlp_dim=256,
                        dtype="float32", remat=False)


def get_config(arg=None):
  dataset = arg or "shapes"
  if dataset not in ("shapes", "digits"):
    raise ValueError(f"siglip/tiny.py takes ':shapes' or ':digits', got {arg!r}")
  c = common.base_config("siglip")
  set_vision(c, dataset)
  c.model.siglip.update(embed_dim=64)
  c.model.siglip_text.update(num_layers=2, dim=64, num_heads=4, mlp_hidden=192, remat="none", scan=False,
                             dtype="float32", attention="xla")
  common.embedded_data(c, dataset)
  c.data.image_slots = 1  # the text tower never sees pixels: one placeholder slot per image keeps rows short
  c.data.caption_first_prob = 1.0  # one layout, so equal captions hash equal (duplicate_captions_positive)
  c.data.caption_dropout = 0.0
  c.data.seq_len = 128 if dataset == "shapes" else 64
  c.data.max_images_per_row = 8
  c.data.batch_size = 16  # ~100 image–text pairs a batch
  t = c.train
  t.num_steps = 600
  t.learning_rate = 1e-3
  t.warmup_steps = 50
  t.final_learning_rate = 1e-5
  t.weight_decay = 1e-4
  t.log_every = 25
  t.checkpoint_every = 300
  t.sample_every = 0
  t.final_eval_examples = 200
  return c
