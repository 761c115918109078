"""Tiny Transfusion on `shapes`: the demo; trains on 2 CPU cores.

    python -m unimm.main --config=configs/transfusion/tiny.py --workdir=/tmp/unimm_tiny
    python -m unimm.main --config=configs/transfusion/tiny.py:digits ...   # the digits variant
"""

import ml_collections as mlc

from unimm.data import sources


def get_config(arg=None):
  dataset = arg or "shapes"
  if dataset not in ("shapes", "digits"):
    raise ValueError(f"tiny.py takes ':shapes' or ':digits', got {arg!r}")
  c = mlc.ConfigDict()
  c.seed = 0

  c.model = mlc.ConfigDict()
  c.model.patch_size = mlc.FieldReference(4 if dataset == "shapes" else 2)
  c.model.autoencoder = mlc.ConfigDict()
  c.model.autoencoder.kind = "identity"  # pixels are the latents
  c.model.autoencoder.downsample = mlc.FieldReference(1)

  d = c.data = mlc.ConfigDict()
  d.data_dir = sources.default_data_dir()
  d.sources = mlc.ConfigDict({
      dataset: {"kind": "tfds", "tfds_name": dataset, "builder_config": "", "weight": 1.0},
  })
  d.tokenizer = mlc.ConfigDict()
  d.tokenizer.path = "{data_dir}/tokenizers/" + dataset + "_bpe128.model"
  d.tokenizer.vocab_size = 128  # when unimm trains it (--mode=prepare)
  d.tokenizer.model_type = "bpe"
  d.tokenizer.train_documents = 20_000
  d.image_size = mlc.FieldReference(32 if dataset == "shapes" else 8)
  d.image_channels = 3 if dataset == "shapes" else 1
  grid = d.get_ref("image_size") // (c.model.get_ref("patch_size") * c.model.autoencoder.get_ref("downsample"))
  d.image_slots = grid * grid  # sequence slots per image: one per latent patch
  d.seq_len = 256
  d.batch_size = 16  # global, split over processes
  d.max_images_per_row = 4
  d.caption_first_prob = 0.8
  d.caption_dropout = 0.1
  d.max_timestep = 1000
  d.noise_limit_t = 500
  d.image_token_weight = 0.0  # continuous images: no token loss on image slots
  d.packing_bins = 8
  d.read_threads = 1  # 0–1 suit 2 cores; raise on real hosts
  d.read_prefetch = 16
  d.worker_count = 0  # grain worker processes (mp_prefetch); 0 = in the main process
  return c
