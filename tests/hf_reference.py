"""Tiny Hugging Face reference models and tokenizers made here (nothing downloads), for the conversion tests."""

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


def logits(directory: str, ids) -> "np.ndarray":  # noqa: F821
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].numpy()
