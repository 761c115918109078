"""Transfusion at the paper's 370M size (Table 2: 24 layers × 1024, 16 heads), 4096-token rows.

The recipe and its `:smoke` variant: configs/transfusion/paper.py."""

from configs.transfusion import paper


def get_config(arg=None):
  return paper.get_transfusion(arg, layers=24, dim=1024, heads=16)
