"""Attention kernels for the mixed mask; `unimm.models.attention.attend` chooses among them."""
