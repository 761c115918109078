"""Attention kernels for the mixed mask; `unimm.models.attention.attend` chooses among them."""

# The checkpoint name both kernels give their output and log-sum-exp: remat policy `qkv_attention`
# keeps them, so the backward pass runs the kernel's backward without its forward again.
RESIDUALS = "attention_residuals"
