"""Janus-Pro at paper scale (arXiv 2501.17811): the shared recipe behind configs/janus/pro_{1b,7b}.py.

384×384 images; SigLIP-L/16 reads them (24×24 = 576 patches), the VQ tokenizer (/16, 16,384 codes of
dimension 8) writes them (576 codes): 576 slots per image. DeepSeek-LLM backbones with their 102,400-token
vocabulary. Per stage (our reading of the paper's Table 2): what trains, the understanding : text :
generation ratio, steps, batch and learning rate. Point the three sources at your data (ArrayRecord from
`unimm.data.prepare`), the ViT at a SigLIP run and the tokenizer at a VQ run; each stage after the first
starts from the previous one (`--config.train.init_from=STAGE_WORKDIR/checkpoints`).
"""

from configs import common

ADAPTORS = ("und_aligner", "gen_embed", "gen_aligner", "gen_head")
LLM = ("embed", "decoder", "lm_head")
STAGES = {  # trainable, (understanding, text, generation), steps, global batch, peak lr, warm-up
    1: (ADAPTORS, (1, 0, 3), 20_000, 256, 1e-3, 600),
    2: (ADAPTORS + LLM, (2, 3, 5), 360_000, 512, 1e-4, 5000),
    3: (ADAPTORS + LLM + ("vision_encoder",), (5, 1, 4), 80_000, 128, 4e-5, 0),
}


def get_janus_pro(arg, *, layers: int, dim: int, heads: int, mlp: int):
  stage = {"stage1": 1, "stage2": 2, "stage3": 3}.get(arg or "stage1")
  if stage is None:
    raise ValueError(f"Janus-Pro configs take ':stage1', ':stage2' or ':stage3', got {arg!r}")
  trainable, (und, text, gen), steps, batch, lr, warmup = STAGES[stage]
  c = common.base_config()
  c.model.family = "janus"
  c.model.vocab_size = 102_400
  c.model.backbone.update(num_layers=layers, dim=dim, num_heads=heads, mlp_hidden=mlp, bidirectional_images=False)
  c.model.vq.update(channel_mults=(1, 1, 2, 2, 4), codebook_size=16_384, code_dim=8)  # /16
  c.model.vision.update(patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096, feature_layer=-1)
  c.model.guidance = 5.0
  d = c.data
  d.image_size = 384
  d.image_slots = (384 // 16) ** 2  # 576
  d.seq_len = 4096
  d.max_images_per_row = 4
  d.batch_size = batch
  d.image_token_weight = 1.0
  d.train_read_images = False
  d.caption_dropout_mode = "pad"
  d.caption_dropout = 0.1
  d.sources = {
      "generation": {"kind": "prepared", "path": "data/generation/{split}/*.array_record", "weight": float(gen),
                     "caption_first_prob": 1.0},
      "understanding": {"kind": "prepared", "path": "data/understanding/{split}/*.array_record",
                        "weight": float(und), "caption_first_prob": 0.0},
      "text": {"kind": "prepared", "path": "data/text/{split}/*.array_record", "weight": float(text)},
  }
  t = c.train
  t.trainable = trainable
  t.num_steps, t.learning_rate, t.warmup_steps = steps, lr, warmup
  t.final_learning_rate = lr  # constant after warm-up
  t.weight_decay = 0.0
  t.sample_every = 0
  return c
