"""The tokenizer: trained offline, special tokens reserved, external models get them appended."""

import io
import pickle

import sentencepiece as spm

from unimm.data import tokenizer as tokenizer_lib

TEXTS = [f"a {c} {s} at the {p}" for c in ("red", "green", "blue") for s in ("circle", "square")
         for p in ("top left", "bottom right")] * 30


def test_trained_tokenizer_specials(tmp_path):
  tok = tokenizer_lib.train_tokenizer(TEXTS, str(tmp_path / "t.model"), vocab_size=64)
  s = tok.specials
  ids = [s.pad, s.bos, s.eos, s.boi, s.eoi, s.img, *s.reserved]
  assert len(set(ids)) == len(ids) == 6 + tokenizer_lib.NUM_RESERVED
  assert max(ids) < tok.vocab_size
  # Raw text never produces special tokens (control symbols are not matched).
  encoded = tok.encode("a <boi> red <eoi> <img> <reserved_0>")
  assert not set(encoded) & set(ids)
  assert tok.decode(tok.encode("a red circle at the top left")) == "a red circle at the top left"
  assert tok.decode([s.bos, *tok.encode("a red"), s.boi, s.img, s.eoi, s.eos, s.pad]) == "a red <boi> <img> <eoi>"
  # Reloads from disk and survives pickling (grain workers get copies).
  again = pickle.loads(pickle.dumps(tokenizer_lib.Tokenizer.load(str(tmp_path / "t.model"))))
  assert again.specials == s and again.encode("a blue square") == tok.encode("a blue square")


def test_external_model_gets_specials_appended(tmp_path):
  """A model like Llama's (no pad, no BOI/EOI) keeps its ids; unimm's specials go after its vocab."""
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=buf, vocab_size=40,
                                 model_type="bpe", pad_id=-1, bos_id=1, eos_id=2, unk_id=0,
                                 hard_vocab_limit=False, minloglevel=2)
  path = tmp_path / "external.model"
  path.write_bytes(buf.getvalue())
  tok = tokenizer_lib.Tokenizer.load(str(path))
  sp = spm.SentencePieceProcessor(model_file=str(path))
  n = sp.get_piece_size()
  s = tok.specials
  assert (s.bos, s.eos) == (1, 2)
  assert sorted([s.pad, s.boi, s.eoi, s.img, *s.reserved]) == list(range(n, n + 4 + tokenizer_lib.NUM_RESERVED))
  assert tok.vocab_size == n + 4 + tokenizer_lib.NUM_RESERVED
  assert tok.encode("a red circle") == sp.encode("a red circle")
