"""Janus-Pro-7B: DeepSeek-LLM-7B backbone, 30 layers × 4096, 32 heads; `:stage1|stage2|stage3` (`_smoke`: in miniature) (configs/janus/paper.py)."""

from configs.janus import paper


def get_config(arg=None):
  c = paper.get_janus_pro(arg, layers=30, dim=4096, heads=32, mlp=11008)
  c.model.backbone.remat = "auto"  # on 64 H100s: q, k, v kept, microbatches of ≤ 4 rows a device
  c.targets.gpu.update(remat="qkv_proj", max_rows_per_device=4)
  c.train.grad_accum_steps = 0
  return c
