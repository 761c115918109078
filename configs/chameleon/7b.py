"""Chameleon-7B (arXiv 2405.09818, Table 1): 32 layers × 4096, 32 heads, 4k context, 65,536-token
vocabulary of which 8,192 are image codes; 512×512 images → 32×32 = 1,024 codes (tokenizer /16).
Stability: QK-norm, dropout 0.1, z-loss 1e-5 (norm reordering is the 34B's; switch it with
--config.model.backbone.norm_order=swin). Data: the first stage's text-only, image–text and interleaved
tokens (2.9T : 1.5T : 0.4T), mixed by tokens. Needs a trained VQ tokenizer at model.vq.checkpoint and
your data (ArrayRecord from `unimm.data.prepare`) at the sources' paths.

Defaults fit a v5p-256 slice and 64 H100s (docs/scaling.md): FSDP over every device; remat "auto" keeps
every projection on TPU (`dots_no_batch`) and only q, k, v on GPU (`qkv_proj`, which recomputes the MLP).

`:smoke` keeps every structural choice (family, VQ codes in the vocabulary, the declared text
vocabulary, QK-norm, dropout, z-loss, causal images, attention "auto", remat, scan, bf16, the optimiser
and the schedule's shape, the token mix, weight decay) and shrinks only sizes, for 2 CPU cores on the
embedded shapes data with configs/tokenizers/tiny.py:shapes's VQ tokenizer (8×8 codes of 512).
"""

from configs import common
from configs.tokenizers import tiny as tiny_tokenizer


def get_config(arg=None):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"chameleon/7b.py takes no argument or ':smoke', got {arg!r}")
  c = common.base_config("chameleon")
  c.model.backbone.update(num_layers=32, dim=4096, num_heads=32, mlp_hidden=11008, qk_norm=True, dropout=0.1,
                          bidirectional_images=False, remat="auto")
  c.targets.gpu.remat = "qkv_proj"
  common.paper_mesh(c)
  c.model.z_loss = 1e-5
  c.model.vocab_size = 65_536 - 8_192  # text ids; the 8,192 codes follow
  c.model.vq.update(channels=128, channel_mults=(1, 1, 2, 2, 4), codebook_size=8192, code_dim=8)
  c.data.image_size = 512
  c.data.image_slots = (512 // 16) ** 2
  c.data.image_token_weight = 1.0
  c.data.seq_len = 4096
  c.data.max_images_per_row = 3
  c.data.tokenizer.update(path="{data_dir}/tokenizers/chameleon_text.model", vocab_size=65_536 - 8_192)
  c.data.mix_by = "tokens"
  c.data.sources = {
      "text": {"kind": "prepared", "path": "data/text/{split}/*.array_record", "weight": 2.9, "text_only": True},
      "image_text": {"kind": "prepared", "path": "data/image_text/{split}/*.array_record", "weight": 1.5},
      "interleaved": {"kind": "prepared", "path": "data/interleaved/{split}/*.array_record", "weight": 0.4},
  }
  t = c.train
  t.learning_rate = 1e-4  # the paper: 1e-4, warm-up 4000, β2 0.95, weight decay 0.1, clip 1.0
  t.warmup_steps = 4000
  t.final_learning_rate = 1e-5
  if arg == "smoke":
    smoke(c)
  return c


def smoke(c) -> None:
  c.model.backbone.update(num_layers=2, dim=64, num_heads=4, mlp_hidden=128)
  tiny_tokenizer.set_tokenizer(c, "shapes")  # 8×8 codes of 512 per 32×32 image: 64 slots
  common.smoke_data(c, {"text": {"text_only": True, "weight": 2.9}, "image_text": {"weight": 1.5},
                        # no interleaved embedded data: image-first pairs stand in for image-then-text documents
                        "interleaved": {"caption_first_prob": 0.0, "weight": 0.4}})
  c.data.tokenizer.update(path="{data_dir}/tokenizers/shapes_bpe128.model", vocab_size=128)
  c.model.vocab_size = 128  # the smoke tokenizer's 128 ids (specials inside), a multiple of 128
  common.smoke_training(c, learning_rate=3e-3)
