"""Transfusion at the paper's 370M size (Table 2: 24 layers × 1024, 16 heads), 4096-token rows.

Needs a trained KL-VAE (config.model.autoencoder.checkpoint) and a real
tokenizer and dataset; see configs/transfusion/common.py for every key.
"""

from configs import common


def get_config(arg=None):
  del arg
  return common.paper_size(common.base_config(), layers=24, dim=1024, heads=16)
