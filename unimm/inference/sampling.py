"""How the generators draw tokens: one options type for text and image codes.

Each field is a knob of `unimm.inference.text.sample_tokens`, which applies them; the sample command
makes its flags from these fields (`--temperature`, `--code_temperature`, …), so a new option is a field
here and its use there. No JAX in this module: the CLI imports it to define its flags.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  temperature: float = dataclasses.field(default=0.0, metadata={"help": "temperature (0 = greedy)"})
  top_k: int = dataclasses.field(default=0, metadata={"help": "top-k cut (0 = off)"})
  top_p: float = dataclasses.field(default=1.0, metadata={"help": "nucleus mass (1 = off)"})


# Image codes drawn greedily give flat, repetitive images: codes sample at temperature 1 by default.
CODE_DEFAULTS = SamplingOptions(temperature=1.0)
