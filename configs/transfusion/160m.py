"""Transfusion at the paper's 160M size (Table 2: 16 layers × 768, 12 heads), 4096-token rows.

The recipe and its `:smoke` variant: configs/transfusion/paper.py."""

from configs.transfusion import paper


def get_config(arg=None):
  return paper.get_transfusion(arg, layers=16, dim=768, heads=12)
