"""Transfusion at the paper's 7B size (Table 2: 32 layers × 4096, 32 heads), 4096-token rows.

Needs a trained KL-VAE (config.model.autoencoder.checkpoint) and a real
tokenizer and dataset; see configs/transfusion/common.py for every key.
"""

from configs import common


def get_config(arg=None):
  del arg
  return common.paper_size(common.base_config(), layers=32, dim=4096, heads=32)
