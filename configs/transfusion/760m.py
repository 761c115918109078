"""Transfusion at the paper's 760M size (Table 2: 24 layers × 1536, 24 heads), 4096-token rows.

The recipe and its `:smoke` variant: configs/transfusion/paper.py."""

from configs.transfusion import paper


def get_config(arg=None):
  return paper.get_transfusion(arg, layers=24, dim=1536, heads=24)
