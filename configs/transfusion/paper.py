"""Transfusion at the paper's sizes (arXiv 2408.11039, Table 2): the recipe behind configs/transfusion/{160m,…,7b}.py.

4096-token rows of 256 × 4096 = 1M tokens a step; the Llama-2 tokenizer (32,000 SentencePiece pieces, unimm's
20 specials appended: vocabulary 32,128, the next multiple of 128); images 256×256 through a KL-VAE (/8, 8
latent channels) into 32×32×8 latents, 2×2 patches (256 slots), linear patch layers; DDPM ε-prediction,
cosine schedule, λ = 5; AdamW (0.9, 0.95, 1e-8), lr 3e-4, 4000 warm-up steps, cosine to 1.5e-5, weight
decay 0.1, clipping 1.0; text and image–caption data at the paper's 1:1 ratio in tokens (`data.mix_by`).
Point the sources at your data (ArrayRecord from `unimm.data.prepare`), the tokenizer at Llama-2's
`tokenizer.model` and the VAE at a configs/vae/ run (`--config.model.autoencoder.checkpoint`).

`:smoke` keeps every structural choice (family, KL-VAE latents, an appended-specials tokenizer and the
declared vocabulary, attention "auto", remat, scan, bf16, the optimiser and the schedule's shape, the
token mix, weight decay) and shrinks only sizes, so the recipe runs end to end on 2 CPU cores on the
embedded shapes data: a tokenizer from `--mode=prepare`, a VAE from configs/vae/shapes.py.
"""

from configs import common


def get_transfusion(arg, *, layers: int, dim: int, heads: int, remat: str = "dots_no_batch"):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"Transfusion paper configs take no argument or ':smoke', got {arg!r}")
  c = common.paper_size(common.base_config(), layers=layers, dim=dim, heads=heads)
  c.model.backbone.remat = remat
  c.model.vocab_size = 32_128  # Llama-2's 32,000 pieces + 20 appended specials, rounded up to 128
  # Llama-2's tokenizer.model goes here (or --mode=prepare trains one of its kind on your data).
  c.data.tokenizer.update(path="{data_dir}/tokenizers/llama2.model", vocab_size=32_000, builtin_specials=False)
  c.data.mix_by = "tokens"  # the paper: text and image–caption tokens 1:1
  c.data.sources = {
      "text": {"kind": "prepared", "path": "data/text/{split}/*.array_record", "weight": 1.0, "text_only": True},
      "image_caption": {"kind": "prepared", "path": "data/image_caption/{split}/*.array_record", "weight": 1.0},
  }
  if arg == "smoke":
    smoke(c)
  return c


def smoke(c) -> None:
  """The recipe at a size 2 CPU cores train in a minute (see the module doc)."""
  c.model.backbone.update(num_layers=2, dim=64, num_heads=4)
  c.model.vocab_size = 256  # the smoke tokenizer's ≤ 128 pieces + 20 appended specials, rounded up to 128
  # configs/vae/shapes.py's VAE: 32×32 → 16×16×8 latents, 2×2 patches (64 slots).
  c.model.autoencoder.update(downsample=2, latent_channels=8, channels=32, channel_mults=(1, 2))
  common.smoke_data(c, {"text": {"text_only": True, "weight": 1.0}, "image_caption": {"weight": 1.0}})
  c.data.tokenizer.update(path="{data_dir}/tokenizers/shapes_appended_bpe128.model", vocab_size=128)
  common.smoke_training(c, learning_rate=3e-3)
