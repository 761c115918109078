"""Transfusion at the paper's 7B size (Table 2: 32 layers × 4096, 32 heads), 4096-token rows.

The recipe and its `:smoke` variant: configs/transfusion/paper.py. `:mot` unties every backbone part by
modality (Mixture-of-Transformers: 6.8B active parameters a token, 13.2B in all).
Defaults fit a v5p-256 slice and 64 H100s (docs/scaling.md): FSDP over every device; remat "auto" keeps
every projection on TPU (`dots_no_batch`) and only q, k, v on GPU (`qkv_proj`: 4 rows a device on 64 H100s
need it; it recomputes the MLP, ~1/3 more forward FLOPs in the backward pass).
"""

from configs.transfusion import paper


def get_config(arg=None):
  c = paper.get_transfusion(None if arg == "mot" else arg, layers=32, dim=4096, heads=32, remat="auto")
  c.targets.gpu.remat = "qkv_proj"
  if arg == "mot":
    c.model.backbone.mot = ("qkv", "out", "mlp", "norms")
  return c
