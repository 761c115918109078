"""The logical axis names parameters and activations carry (`nn.with_logical_partitioning`,
`layers.constrain`); `unimm.parallel.sharding.RULES` maps each to mesh axes. One name per concept, written
once: a module that names an axis uses these constants.
"""

# Parameters.
EMBED = "embed"  # the model width: split over fsdp (ZeRO-3)
VOCAB = "vocab"  # the LM head's and embedding's vocabulary: over tensor
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"  # the MLP's hidden width
LAYERS = "layers"  # the scanned layer stack
PATCH = "patch"  # a flattened image patch (Transfusion's linear patch layer)
TIME_FREQ = "time_freq"  # the diffusion timestep's sinusoidal features
EMBED_IN = "embed_in"  # small input widths (adaptors, timestep MLP): replicated
CONV_IN = "conv_in"  # conv stacks (U-Net patch layers, VAE, VQ): small, replicated
CONV_OUT = "conv_out"
CODES = "codes"  # a VQ codebook's entries
CODE_DIM = "code_dim"

# Activations.
ACT_BATCH = "act_batch"
ACT_LENGTH = "act_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"
