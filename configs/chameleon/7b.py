"""Chameleon-7B (arXiv 2405.09818, Table 1): 32 layers × 4096, 32 heads, 4k context, 65,536-token
vocabulary of which 8,192 are image codes; 512×512 images → 32×32 = 1,024 codes (tokenizer /16).
Stability: QK-norm, dropout 0.1, z-loss 1e-5 (norm reordering is the 34B's; switch it with
--config.model.backbone.norm_order=swin). Needs a trained VQ tokenizer at model.vq.checkpoint.
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.model.family = "chameleon"
  c.model.backbone.update(num_layers=32, dim=4096, num_heads=32, mlp_hidden=11008, qk_norm=True, dropout=0.1,
                          bidirectional_images=False)
  c.model.z_loss = 1e-5
  c.model.vocab_size = 65_536 - 8_192  # text ids; the 8,192 codes follow
  c.model.vq.update(channels=128, channel_mults=(1, 1, 2, 2, 4), codebook_size=8192, code_dim=8)
  c.data.image_size = 512
  c.data.image_slots = (512 // 16) ** 2
  c.data.image_token_weight = 1.0
  c.data.seq_len = 4096
  c.data.max_images_per_row = 3
  t = c.train
  t.learning_rate = 1e-4  # the paper: 1e-4, warm-up 4000, β2 0.95, weight decay 0.1, clip 1.0
  t.warmup_steps = 4000
  t.final_learning_rate = 1e-5
  return c
