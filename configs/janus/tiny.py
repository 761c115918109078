"""Tiny Janus-Pro on `shapes` or `digits`, in its three stages; trains on 2 CPU cores.

First the two encoders (the SigLIP ViT that reads, the VQ tokenizer that writes), then the stages,
each starting from the previous one's checkpoint:

    python -m unimm.main --config=configs/siglip/tiny.py:shapes --workdir=/tmp/siglip_shapes
    python -m unimm.main --config=configs/tokenizers/tiny.py:shapes --workdir=/tmp/vq_shapes
    E="--config.model.vision.checkpoint=/tmp/siglip_shapes/checkpoints --config.model.vq.checkpoint=/tmp/vq_shapes/checkpoints"
    python -m unimm.main --config=configs/janus/tiny.py:stage1 --workdir=/tmp/janus1 $E
    python -m unimm.main --config=configs/janus/tiny.py:stage2 --workdir=/tmp/janus2 $E \\
        --config.train.init_from=/tmp/janus1/checkpoints
    python -m unimm.main --config=configs/janus/tiny.py:stage3 --workdir=/tmp/janus3 $E \\
        --config.train.init_from=/tmp/janus2/checkpoints

(`:digits_stage1` … with the digits encoders.) Stage I trains the adaptors and the image head (ViT
and LLM frozen), stage II adds the LLM, stage III the ViT; the VQ tokenizer stays frozen. Each
stage's data mix is understanding : text : generation documents drawn from the one dataset
(image-first pairs, captions alone, caption-first pairs), Janus-Pro's ratios 1:0:3, 2:3:5, 5:1:4.
The backbone, rows and recipe are `configs.common.tiny_recipe` (bench/compare_families.py), with
each stage's steps and learning rate.
"""

from configs import common
from configs.siglip import tiny as tiny_siglip
from configs.tokenizers import tiny as tiny_tokenizer

ADAPTORS = ("und_aligner", "gen_embed", "gen_aligner", "gen_head")
LLM = ("embed", "decoder", "lm_head")
STAGES = {  # what trains, understanding : text : generation, steps, peak learning rate
    1: (ADAPTORS, (1, 0, 3), 150, 3e-3),
    2: (ADAPTORS + LLM, (2, 3, 5), 900, 3e-3),
    3: (ADAPTORS + LLM + ("vision_encoder",), (5, 1, 4), 150, 1e-3),
}


def set_stage(c, dataset: str, stage: int) -> None:
  """Stage `stage`'s trainable parts and data mix (three views of `dataset`)."""
  trainable, (und, text, gen), _, _ = STAGES[stage]
  c.train.trainable = trainable
  common.embedded_data(c, dataset)
  spec = dict(c.data.sources[dataset])
  c.data.sources[dataset].update(weight=float(gen), caption_first_prob=1.0)  # text → image (written)
  c.data.sources[dataset + "_understanding"] = dict(spec, weight=float(und), caption_first_prob=0.0)
  c.data.sources[dataset + "_text"] = dict(spec, weight=float(text), text_only=True)


def get_config(arg=None):
  variant = arg or "stage1"
  dataset, _, stage = variant.rpartition("_")
  dataset = dataset or "shapes"
  if dataset not in ("shapes", "digits") or stage not in ("stage1", "stage2", "stage3"):
    raise ValueError(f"janus/tiny.py takes ':stageN' or ':digits_stageN' (N = 1, 2, 3), got {arg!r}")
  stage = int(stage[-1])
  c = common.base_config("janus")
  common.tiny_recipe(c, dataset)
  c.model.backbone.update(bidirectional_images=False)
  tiny_siglip.set_vision(c, dataset)
  tiny_tokenizer.set_tokenizer(c, "shapes" if dataset == "shapes" else "digits")
  set_stage(c, dataset, stage)
  c.model.guidance = 5.0  # Janus's CFG scale for sampling and eval
  d = c.data
  d.image_token_weight = 1.0  # written images' codes are targets; read images' slots are not
  d.train_read_images = False
  d.caption_dropout_mode = "pad"  # the unconditional case: the prompt replaced by PAD (10%)
  d.caption_dropout = 0.1

  t = c.train
  _, _, t.num_steps, t.learning_rate = STAGES[stage]
  t.warmup_steps = 100 if stage != 3 else 20
  t.checkpoint_every = 300
  t.sample_every = 0
  return c
