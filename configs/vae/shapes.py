"""A small KL-VAE for `shapes` (32×32 → 16×16×8 latents), trained through the common trainer.

    python -m unimm.main --config=configs/vae/shapes.py --workdir=/tmp/unimm_vae_shapes

configs/transfusion/tiny.py:shapes_vae then uses it frozen
(--config.model.autoencoder.checkpoint=/tmp/unimm_vae_shapes/checkpoints). The run ends by measuring
its latents' shift/scale into checkpoints/latent_stats.json (unimm/train/latent_stats.py).
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base_config("kl_vae")
  c.model.autoencoder.update(kind="kl_vae", downsample=2, latent_channels=8, channels=32, channel_mults=(1, 2),
                             blocks_per_level=1)
  c.model.kl_weight = 1e-6
  common.embedded_data(c, "shapes")
  c.data.image_slots = 64  # slots an image takes in a row: sets how many images share one (the VAE reads only them)
  c.data.seq_len = 256
  c.data.batch_size = 16
  c.data.max_images_per_row = 4
  t = c.train
  t.num_steps = 2000
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.final_learning_rate = 1e-4
  t.weight_decay = 0.0
  t.log_every = 50
  t.checkpoint_every = 500
  t.sample_every = 0
  return c
