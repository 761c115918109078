"""Where unimm keeps datasets and tokenizers by default (no heavy imports: configs use it)."""

import os


def default_data_dir() -> str:
  """`$UNIMM_DATA_DIR`, else `~/.cache/unimm/data`."""
  return os.environ.get("UNIMM_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "unimm", "data"))
