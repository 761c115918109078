"""`config.train` as typed settings, parsed once (by `setup.build`, after the "auto" settings are resolved)
and passed down: the trainer, the optimiser and the schedule read typed fields, not config nodes.

Parsing is strict: a key the class lacks fails, naming the known ones, so a typo in `--config.train.…`
never passes silently; a key it has but the config lacks fails too. The defaults live in one place, the
config (`configs/common.py`); the comments here say what each setting does.
"""

from __future__ import annotations

import dataclasses

from unimm.models import settings
from unimm.train import optimizer


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  # AdamW with linear warm-up and cosine decay (`unimm.train.optimizer`).
  num_steps: int
  learning_rate: float
  final_learning_rate: float  # at num_steps
  warmup_steps: int
  weight_decay: float
  wd_mults: tuple[tuple[str, float], ...]  # (path regex, multiplier of weight_decay); first match wins
  b1: float
  b2: float
  eps: float
  grad_clip: float  # global-norm clipping; 0: off
  grad_accum_steps: int
  trainable: tuple[str, ...]  # param path prefixes (or globs with *) that train; (): all (`unimm.train.step.Partition`)
  init_from: str  # a checkpoint dir whose params a fresh run starts from
  ema_decay: float  # > 0: keep a float32 EMA of the trainable params (`unimm.train.step`); sample/eval use it
  # Faults (`unimm.train.health`, `unimm.train.checkpoint`, `unimm.train.config_record`).
  skip_nonfinite: bool
  good_after_steps: int
  loss_spike_factor: float
  max_consecutive_skips: int
  rewind_to_last_good: bool
  restart_from_scratch: bool
  reset_data_iterator: bool
  allow_config_change: bool
  # Logging, checkpoints, samples and evaluation during training (every: 0 is never).
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  async_checkpoints: bool
  sample_every: int
  sample_prompts: int
  sample_steps: int
  sample_guidance: float
  eval_every: int
  eval_examples: int
  eval_diffusion_steps: int
  final_eval_examples: int
  final_eval_diffusion_steps: int

  @classmethod
  def from_config(cls, train_config) -> "TrainSettings":
    """The settings of a `config.train` node, each value cast to its field's type."""
    values = settings.typed_values(cls, train_config, "config.train")
    return cls(**{**values, "wd_mults": optimizer.wd_mults_of(values["wd_mults"]),
                  "trainable": tuple(str(name) for name in values["trainable"])})

  def __post_init__(self):
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"train.ema_decay={self.ema_decay}; expected 0 (no EMA) or a decay in (0, 1), e.g. 0.999")
