"""Janus-Pro-7B: DeepSeek-LLM-7B backbone, 30 layers × 4096, 32 heads; `:stage1|stage2|stage3` (configs/janus/paper.py)."""

from configs.janus import paper


def get_config(arg=None):
  return paper.get_janus_pro(arg, layers=30, dim=4096, heads=32, mlp=11008)
