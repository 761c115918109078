"""Janus-Pro-1B: DeepSeek-LLM-1.5B backbone, 24 layers × 2048, 16 heads; `:stage1|stage2|stage3` (`_smoke`: in miniature) (configs/janus/paper.py)."""

from configs.janus import paper


def get_config(arg=None):
  return paper.get_janus_pro(arg, layers=24, dim=2048, heads=16, mlp=5632)
