"""Transfusion at the paper's 1.4B size (Table 2: 24 layers × 2048, 16 heads), 4096-token rows.

The recipe and its `:smoke` variant: configs/transfusion/paper.py."""

from configs.transfusion import paper


def get_config(arg=None):
  return paper.get_transfusion(arg, layers=24, dim=2048, heads=16)
