"""Hugging Face tokenizer.json read by unimm (`tokenizers`), judged by transformers' own tokenizer."""

import pickle

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import hf_reference  # noqa: E402
from unimm.data import tokenizer as tokenizer_lib  # noqa: E402

TEXTS = hf_reference.CAPTIONS
JANUS_IMAGE_TOKENS = {"boi": "<begin_of_image>", "eoi": "<end_of_image>", "img": "<image_placeholder>"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A byte-level BPE with a model's own specials, saved as transformers saves one."""
  fast = hf_reference.tiny_tokenizer(("<|begin_of_text|>", "<|end_of_text|>", "<pad>", *JANUS_IMAGE_TOKENS.values()))
  directory = tmp_path_factory.mktemp("hf_tokenizer")
  fast.save_pretrained(str(directory))
  return str(directory), fast


def test_encodes_and_decodes_as_transformers_does(hf_dir):
  directory, reference = hf_dir
  ours = tokenizer_lib.load(directory, JANUS_IMAGE_TOKENS)
  for text in [*TEXTS[:4], "unseen wörds: zebra!", ""]:
    ids = ours.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == reference.decode(ids)
  s = ours.specials
  assert (s.bos, s.eos, s.pad) == (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
  assert [s.boi, s.eoi, s.img] == reference.convert_tokens_to_ids(list(JANUS_IMAGE_TOKENS.values()))
  # Reserved roles the model lacks come after its vocabulary; vocab_size counts them.
  assert min(s.reserved) == len(reference) and ours.vocab_size == len(reference) + len(s.reserved)
  assert ours.decode([s.bos, *ours.encode("a red"), s.boi, s.img, s.eoi, s.eos]) == "a red <boi> <img> <eoi>"
  again = pickle.loads(pickle.dumps(ours))  # grain workers get copies
  assert again.encode(TEXTS[1]) == ours.encode(TEXTS[1]) and again.specials == s


def test_roles_default_to_new_ids_and_bad_maps_are_refused(hf_dir):
  directory, reference = hf_dir
  plain = tokenizer_lib.load(directory + "/tokenizer.json")  # no image roles mapped, unimm's names absent
  assert plain.specials.bos == reference.bos_token_id
  assert sorted([plain.specials.boi, plain.specials.eoi, plain.specials.img]) == [len(reference) + i for i in range(3)]
  with pytest.raises(ValueError, match="'img' to '<image>', which is not in the tokenizer's vocabulary"):
    tokenizer_lib.load(directory, {"img": "<image>"})
  with pytest.raises(FileNotFoundError, match="No Hugging Face tokenizer"):
    tokenizer_lib.load(directory + "/missing.json")
