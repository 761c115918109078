"""`python -m unimm.convert` (console script `unimm-convert`): the command line of unimm/convert/workdir.py.

    python -m unimm.convert --from_hf=DIR --workdir=W [--config=FILE] [--vae=DIR] [--seq_len=N] [--shard]
    python -m unimm.convert --to_hf --workdir=W --out=DIR [--dtype=bfloat16]
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from unimm.convert import workdir

_FROM_HF = flags.DEFINE_string("from_hf", None, "import: a Hugging Face model directory (config.json + safetensors).")
_TO_HF = flags.DEFINE_boolean("to_hf", False, "export the workdir's model to --out as a Hugging Face directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "the unimm workdir written (import) or read (export).")
_OUT = flags.DEFINE_string("out", None, "export: the Hugging Face directory to write.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "import: the config to start from (default: a "
                                          "Transfusion base config); its backbone and vocabulary are replaced.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "import: the row length the workdir trains and scores with.")
_VAE = flags.DEFINE_string("vae", None, "import: a diffusers AutoencoderKL directory (or a pipeline's, with vae/) "
                           "to convert as the workdir's image codec (Transfusion from a pretrained LLM and VAE).")
_SHARD = flags.DEFINE_boolean("shard", False, "import: write the LM's params placed as the config's mesh places them "
                              "(config.mesh over this host's devices): a checkpoint already sharded for it.")
_SCAN = flags.DEFINE_boolean("scan", True, "import: layers stacked for nn.scan (unimm's default for large models).")
_DTYPE = flags.DEFINE_string("dtype", None, "export: float32 | bfloat16 | float16 (default: the source's).")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "export: the largest safetensors file.")


def main(argv):
  del argv
  if bool(_FROM_HF.value) == bool(_TO_HF.value):
    raise app.UsageError("give one of --from_hf=DIR (import) or --to_hf (export)")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  if _FROM_HF.value:
    summary = workdir.import_any(_FROM_HF.value, _WORKDIR.value, _CONFIG.value, seq_len=_SEQ_LEN.value,
                                 scan=_SCAN.value, vae=_VAE.value, shard=_SHARD.value)
  else:
    if not _OUT.value:
      raise app.UsageError("--to_hf needs --out=DIR")
    summary = workdir.export(_WORKDIR.value, _OUT.value, dtype=_DTYPE.value,
                                max_shard_bytes=int(_MAX_SHARD_GB.value * 2 ** 30))
  print(json.dumps(summary))


def run():
  app.run(main)
