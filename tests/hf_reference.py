"""Tiny Hugging Face reference models and tokenizers made here (nothing downloads), for the conversion tests."""

import os
import subprocess
import sys

import tokenizers
import torch
import transformers

CAPTIONS = ["a red circle at the top left", "two blue squares and a green triangle", "Hello, world! 123 ünïcode",
            "the quick brown fox jumps over the lazy dog", "a blue square at the bottom right"] * 4


def tiny_tokenizer(specials=("<s>", "</s>", "<pad>"), vocab_size: int = 300):
  """A byte-level BPE (Qwen / GPT-2 style) trained on a few captions; BOS, EOS, PAD = specials[:3]."""
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train_from_iterator(CAPTIONS, tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(specials),
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=specials[0], eos_token=specials[1],
                                              pad_token=specials[2])


def tiny_llama(directory: str, vocab_size: int, seed: int = 0, tokenizer=None, silent_from: int | None = None,
               **overrides):
  """A random 2-layer Llama with GQA saved with save_pretrained (and `tokenizer` beside it). `silent_from`:
  the LM head's rows from this id on are zero (logit 0): padding no tokenizer emits, which unimm never
  samples, is then never the reference's argmax either."""
  settings = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, initializer_range=0.2)
  if tokenizer is not None:
    settings.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(directory)
  settings.update(overrides)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
  if silent_from is not None:
    with torch.no_grad():
      model.lm_head.weight[silent_from:] = 0
  model.save_pretrained(directory)
  return model


def logits(directory: str, ids) -> "np.ndarray":  # noqa: F821  pylint: disable=undefined-variable
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].numpy()


def _random(cls, config, seed: int):
  """A random `cls(config)` in eval mode whose norms are perturbed off 1/0 (a swapped scale and bias shows)."""
  torch.manual_seed(seed)
  model = cls(config).eval()
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=generator))
  return model


JANUS_SPECIALS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<begin_of_image>", "<end_of_image>",
                  "<image_placeholder>")


def tiny_janus(directory: str, seed: int = 0, vocab_size: int = 384):
  """A random Janus (2-layer Llama, 2-layer SigLIP-style ViT reading 32 px images as 4×4 patches, a VQGAN
  with 4×4 codes of 64) and a tokenizer holding Janus's special tokens, saved with save_pretrained. Norms
  are perturbed off 1/0 (a swapped scale and bias shows) and the codebook rows have unit norm (LlamaGen's
  codebook is looked up by cosine: see unimm/convert/janus.py). Returns (model, tokenizer, ids of the
  specials)."""
  tokenizer = tiny_tokenizer(JANUS_SPECIALS)
  tokenizer.save_pretrained(directory)
  ids = [tokenizer.convert_tokens_to_ids(t) for t in JANUS_SPECIALS]
  text = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=vocab_size, initializer_range=0.2, bos_token_id=ids[0],
              eos_token_id=ids[1], pad_token_id=ids[2])
  vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                projection_dim=64, num_image_tokens=16, initializer_range=0.2)
  vq = dict(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 1, 1],
            num_res_blocks=1, projection_dim=64, image_token_embed_dim=64, initializer_range=0.2)
  config = transformers.JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=ids[5],
                                    tie_word_embeddings=False)
  model = _random(transformers.JanusForConditionalGeneration, config, seed)
  with torch.no_grad():
    codebook = model.model.vqmodel.quantize.embedding.weight
    codebook.copy_(codebook / codebook.norm(dim=-1, keepdim=True))
  model.save_pretrained(directory)
  return model, tokenizer, dict(zip(("bos", "eos", "pad", "boi", "eoi", "img"), ids))


CHAMELEON_IMAGE_TOKENS = [f"IMGIMG{''.join(chr(ord('A') + int(d)) for d in str(c))}Z" for c in range(64)]


def tiny_chameleon(directory: str, seed: int = 0, vocab_size: int = 384, swin: bool = False, silent=()):
  """A random Chameleon (2 layers, per-head LayerNorm QK-norm; a VQGAN with 8×8 codes of 64 for 32 px
  images) whose tokenizer holds its specials and its 64 image tokens (ids 6..69, as Chameleon's image tokens
  are a range of its vocabulary), saved with save_pretrained. `silent` ids get zero LM-head rows (logit 0:
  ids unimm never samples as text). Returns (model, tokenizer, {code: BPE id})."""
  specials = ("<s>", "</s>", "<pad>", "<racm3:break>", "<eoss>", "<image>", *CHAMELEON_IMAGE_TOKENS)
  tokenizer = tiny_tokenizer(specials, vocab_size=330)
  tokenizer.save_pretrained(directory)
  vocabulary = tokenizer.get_vocab()
  config = transformers.ChameleonConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, initializer_range=0.2, swin_norm=swin, bos_token_id=vocabulary["<s>"],
      eos_token_id=vocabulary["</s>"], pad_token_id=vocabulary["<pad>"], vocabulary_map=vocabulary,
      vq_config={"embed_dim": 8, "num_embeddings": 64, "latent_channels": 32, "resolution": 32, "base_channels": 32,
                 "channel_multiplier": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [8]})
  model = _random(transformers.ChameleonForConditionalGeneration, config, seed)
  with torch.no_grad():
    model.lm_head.weight[list(silent)] = 0
  model.save_pretrained(directory)
  return model, tokenizer, {c: vocabulary[t] for c, t in enumerate(CHAMELEON_IMAGE_TOKENS)}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module: str, *args) -> str:
  """`python -m MODULE ARGS` in the repository; its output (it must succeed)."""
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  return proc.stdout + proc.stderr


def convert_train_export(source: str, workdir: str, config: str, out: str, steps: int = 3) -> str:
  """The README's path for a checkpoint: convert into `config`, train `steps` on the workdir alone, export to
  `out`. Returns the training log."""
  run_module("unimm.convert", f"--from_hf={source}", f"--workdir={workdir}", f"--config={config}", "--seq_len=256")
  log = run_module("unimm.main", f"--workdir={workdir}", f"--config.train.num_steps={steps}",
                   f"--config.train.checkpoint_every={steps}", "--config.train.final_eval_examples=0",
                   "--config.train.sample_every=0")
  run_module("unimm.convert", "--to_hf", f"--workdir={workdir}", f"--out={out}")
  return log
