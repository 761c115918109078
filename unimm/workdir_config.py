"""The config a workdir holds, as a config file: `--config=unimm/workdir_config.py:WORKDIR`.

`unimm.main` passes it for you when `--workdir` holds a `config.json` (written by training or by
`unimm.convert`) and no `--config` is given, so every mode runs on a workdir alone and `--config.KEY=…`
overrides still apply.
"""

from unimm.train import config_record


def get_config(workdir: str):
  if not workdir:
    raise ValueError("unimm/workdir_config.py needs the workdir: --config=unimm/workdir_config.py:WORKDIR")
  return config_record.load_config(workdir)
