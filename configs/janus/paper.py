"""Janus-Pro at paper scale (arXiv 2501.17811): the shared recipe behind configs/janus/pro_{1b,7b}.py.

384×384 images; SigLIP-L/16 reads them (24×24 = 576 patches), the VQ tokenizer (/16, 16,384 codes of
dimension 8) writes them (576 codes): 576 slots per image. DeepSeek-LLM backbones with their 102,400-token
vocabulary. Per stage (our reading of the paper's Table 2): what trains, the understanding : text :
generation ratio, steps, batch and learning rate. Point the three sources at your data (ArrayRecord from
`unimm.data.prepare`), the ViT at a SigLIP run and the tokenizer at a VQ run; each stage after the first
starts from the previous one (`--config.train.init_from=STAGE_WORKDIR/checkpoints`).

Defaults fit a v5p-256 slice and 64 H100s (docs/scaling.md): FSDP over every device; pro_7b's remat "auto"
keeps every projection on TPU and only q, k, v on GPU, where each step is also split into microbatches of
at most 4 rows a device (stage II's 512 rows on 64 H100s: two).

`:stage1_smoke`, `:stage2_smoke`, `:stage3_smoke` keep every structural choice of a stage (family, the
SigLIP ViT that reads and the VQ tokenizer that writes, what trains, the understanding : text : generation
mix, PAD caption dropout, causal images, the declared vocabulary, attention "auto", remat, scan, bf16, the
optimiser and the constant-after-warm-up schedule) and shrink only sizes, for 2 CPU cores on the embedded
shapes data with configs/siglip/tiny.py:shapes's ViT and configs/tokenizers/tiny.py:shapes's tokenizer.
"""

from configs import common
from configs.siglip import tiny as tiny_siglip
from configs.tokenizers import tiny as tiny_tokenizer

ADAPTORS = ("und_aligner", "gen_embed", "gen_aligner", "gen_head")
LLM = ("embed", "decoder", "lm_head")
STAGES = {  # trainable, (understanding, text, generation), steps, global batch, peak lr, warm-up
    1: (ADAPTORS, (1, 0, 3), 20_000, 256, 1e-3, 600),
    2: (ADAPTORS + LLM, (2, 3, 5), 360_000, 512, 1e-4, 5000),
    3: (ADAPTORS + LLM + ("vision_encoder",), (5, 1, 4), 80_000, 128, 4e-5, 0),
}


def get_janus_pro(arg, *, layers: int, dim: int, heads: int, mlp: int):
  name, smoke_run = (arg or "stage1").removesuffix("_smoke"), (arg or "").endswith("_smoke")
  stage = {"stage1": 1, "stage2": 2, "stage3": 3}.get(name)
  if stage is None:
    raise ValueError(f"Janus-Pro configs take ':stageN' or ':stageN_smoke' (N = 1, 2, 3), got {arg!r}")
  trainable, (und, text, gen), steps, batch, lr, warmup = STAGES[stage]
  c = common.base_config("janus")
  c.model.vocab_size = 102_400
  c.model.backbone.update(num_layers=layers, dim=dim, num_heads=heads, mlp_hidden=mlp, bidirectional_images=False)
  common.paper_mesh(c)
  c.data.tokenizer.update(path="{data_dir}/tokenizers/deepseek_llm.model", vocab_size=100_000)
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
      "text": {"kind": "prepared", "path": "data/text/{split}/*.array_record", "weight": float(text),
               "text_only": True},
  }
  t = c.train
  t.trainable = trainable
  t.num_steps, t.learning_rate, t.warmup_steps = steps, lr, warmup
  t.final_learning_rate = lr  # constant after warm-up
  t.weight_decay = 0.0
  t.sample_every = 0
  if smoke_run:
    smoke(c, und, text, gen)
  return c


def smoke(c, und: float, text: float, gen: float) -> None:
  c.model.backbone.update(num_layers=2, dim=64, num_heads=4, mlp_hidden=128)
  tiny_siglip.set_vision(c, "shapes")  # 4×4 patches: 8×8 = 64 per 32×32 image
  c.model.vision.update(dtype="bfloat16", remat=True)  # the recipe's, at the tiny ViT's size
  tiny_tokenizer.set_tokenizer(c, "shapes")  # 8×8 codes of 512: 64 slots, one per ViT patch
  common.smoke_data(c, {"generation": {"weight": float(gen), "caption_first_prob": 1.0},
                        "understanding": {"weight": float(und), "caption_first_prob": 0.0},
                        "text": {"weight": float(text), "text_only": True}})
  c.data.tokenizer.update(path="{data_dir}/tokenizers/shapes_bpe128.model", vocab_size=128)
  c.model.vocab_size = 128  # the smoke tokenizer's 128 ids (specials inside), a multiple of 128
  lr = 3e-3 if c.train.warmup_steps else 1e-3
  common.smoke_training(c, learning_rate=lr)
