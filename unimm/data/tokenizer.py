"""The text tokenizer: sentencepiece plus unimm's special tokens.

A tokenizer is a sentencepiece model file. unimm trains one offline from a
dataset's text (`train_tokenizer`), or loads an existing one (e.g. Llama's).
Special tokens PAD, BOS, EOS, BOI, EOI, IMG (the placeholder at image slots)
and `NUM_RESERVED` reserved ones are taken from the model when it defines them
(as control symbols, so raw text can never produce them) and otherwise appended
after its vocabulary. `vocab_size` counts both.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Iterable

import sentencepiece as spm

BOI, EOI, IMG = "<boi>", "<eoi>", "<img>"
NUM_RESERVED = 16  # room for later families (e.g. a "written image" marker) without retraining
RESERVED = tuple(f"<reserved_{i}>" for i in range(NUM_RESERVED))


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  pad: int
  bos: int
  eos: int
  boi: int
  eoi: int
  img: int
  reserved: tuple[int, ...]


class Tokenizer:
  """A picklable sentencepiece tokenizer (grain workers receive copies)."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.specials, self.vocab_size = self._assign_specials()

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"No tokenizer at {path!r}. Train one with `python -m unimm.main --mode=prepare "
          "--config=...` or point config.data.tokenizer.path at an existing sentencepiece model.")
    with open(path, "rb") as f:
      return cls(f.read())

  def __getstate__(self):
    return {"proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["proto"])

  def _assign_specials(self) -> tuple[SpecialIds, int]:
    sp = self._sp
    size = sp.get_piece_size()
    next_free = size

    def find_or_append(piece: str, builtin_id: int = -1) -> int:
      nonlocal next_free
      if builtin_id >= 0:
        return builtin_id
      pid = sp.piece_to_id(piece)
      if pid != sp.unk_id() and sp.id_to_piece(pid) == piece:
        return pid
      next_free += 1
      return next_free - 1

    pad = find_or_append("<pad>", sp.pad_id())
    bos = find_or_append("<s>", sp.bos_id())
    eos = find_or_append("</s>", sp.eos_id())
    ids = SpecialIds(
        pad=pad, bos=bos, eos=eos,
        boi=find_or_append(BOI), eoi=find_or_append(EOI), img=find_or_append(IMG),
        reserved=tuple(find_or_append(r) for r in RESERVED))
    return ids, next_free

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special tokens are dropped except BOI/EOI/IMG, shown by name."""
    s = self.specials
    names = {s.boi: BOI, s.eoi: EOI, s.img: IMG}
    out, run = [], []
    for i in map(int, ids):
      if i in names or i >= self._sp.get_piece_size():
        if run:
          out.append(self._sp.decode(run))
          run = []
        if i in names:
          out.append(names[i])
      elif i not in (s.pad, s.bos, s.eos):
        run.append(i)
    if run:
      out.append(self._sp.decode(run))
    return " ".join(o for o in out if o)


def train_tokenizer(texts: Iterable[str], path: str, *, vocab_size: int,
                    model_type: str = "bpe", builtin_specials: bool = True) -> Tokenizer:
  """Trains a sentencepiece model on `texts` offline and writes it to `path`.

  Specials are control symbols: they have ids but raw text never encodes to them.
  `builtin_specials=False` trains a model laid out like Llama's (unk, BOS, EOS and
  text pieces only), so unimm's specials are appended after its `vocab_size` ids,
  as they are for an external model (the vocabulary rule then has to cover them).
  `hard_vocab_limit=False` lets a small corpus (the embedded datasets' captions)
  end with fewer pieces than asked instead of failing.
  """
  buf = io.BytesIO()
  ids = (dict(pad_id=0, bos_id=1, eos_id=2, unk_id=3, control_symbols=[BOI, EOI, IMG, *RESERVED])
         if builtin_specials else dict(pad_id=-1, bos_id=1, eos_id=2, unk_id=0))
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
      model_type=model_type, hard_vocab_limit=False,
      character_coverage=1.0, byte_fallback=False, minloglevel=2, **ids)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)  # a crash mid-write never leaves a half model behind
  return Tokenizer(buf.getvalue())


# unimm's roles → the names Hugging Face's tokenizer_config.json gives them.
_HF_ROLES = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token"}
_UNIMM_NAMES = {"boi": BOI, "eoi": EOI, "img": IMG}


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` library) with its model's special tokens in unimm's
  roles, so a converted model reads and writes text as its reference does.

  BOS/EOS/PAD are the tokens `tokenizer_config.json` names (beside tokenizer.json) unless `special_tokens`
  maps the role; BOI/EOI/IMG are the tokens `special_tokens` names for them (a model's own image markers,
  e.g. Janus's `<begin_of_image>`, `<end_of_image>`, `<image_placeholder>`), else unimm's `<boi>`, `<eoi>`,
  `<img>` when the vocabulary has them; a role still without a token (and the reserved ones) gets a new id
  after the vocabulary. Text encodes without the tokenizer's own specials (unimm lays out BOS/EOS).
  """

  def __init__(self, tokenizer_json: str, config: dict | None = None, special_tokens: dict | None = None):
    from tokenizers import Tokenizer as _Tokenizer  # pylint: disable=g-import-not-at-top
    self._json, self._config, self._roles = tokenizer_json, dict(config or {}), dict(special_tokens or {})
    self._tok = _Tokenizer.from_str(tokenizer_json)
    self.base_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.specials, self.vocab_size = self._assign_specials()

  @classmethod
  def load(cls, path: str, special_tokens: dict | None = None) -> "HFTokenizer":
    """From a model directory (tokenizer.json [+ tokenizer_config.json]) or a tokenizer.json path."""
    directory, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) else (
        os.path.dirname(path), path)
    if not os.path.exists(file):
      raise FileNotFoundError(f"No Hugging Face tokenizer at {file!r} (unimm reads tokenizer.json; a "
                              "sentencepiece .model file is read as config.data.tokenizer.path directly)")
    with open(file, encoding="utf-8") as f:
      text = f.read()
    config_file = os.path.join(directory, "tokenizer_config.json")
    config = {}
    if os.path.exists(config_file):
      with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    return cls(text, config, special_tokens)

  def __getstate__(self):
    return {"json": self._json, "config": self._config, "roles": self._roles}

  def __setstate__(self, state):
    self.__init__(state["json"], state["config"], state["roles"])

  def _token(self, role: str) -> str | None:
    if role in self._roles:
      return self._roles[role]
    value = self._config.get(_HF_ROLES.get(role, ""))
    if isinstance(value, dict):  # an AddedToken serialised with its options
      value = value.get("content")
    return value or _UNIMM_NAMES.get(role)

  def _assign_specials(self) -> tuple[SpecialIds, int]:
    next_free = self.base_size

    def find_or_append(role: str, token: str | None) -> int:
      nonlocal next_free
      token_id = None if token is None else self._tok.token_to_id(token)
      if token_id is not None:
        return token_id
      if role in self._roles:
        raise ValueError(f"special_tokens maps {role!r} to {token!r}, which is not in the tokenizer's vocabulary")
      next_free += 1
      return next_free - 1

    roles = {role: find_or_append(role, self._token(role)) for role in ("pad", "bos", "eos", "boi", "eoi", "img")}
    return SpecialIds(**roles, reserved=tuple(find_or_append("", r) for r in RESERVED)), next_free

  def vocabulary(self) -> dict[str, int]:
    """{token: id} of the tokenizer, its added tokens included."""
    return self._tok.get_vocab(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; PAD/BOS/EOS and ids past the vocabulary dropped (as the reference's decode drops
    them), BOI/EOI/IMG shown by name."""
    s = self.specials
    names = {s.boi: BOI, s.eoi: EOI, s.img: IMG}
    out, run = [], []
    for i in map(int, ids):
      if i in names:
        if run:
          out.append(self._tok.decode(run, skip_special_tokens=False))
          run = []
        out.append(names[i])
      elif i not in (s.pad, s.bos, s.eos) and i < self.base_size:
        run.append(i)
    if run:
      out.append(self._tok.decode(run, skip_special_tokens=False))
    return " ".join(o for o in out if o)


def load(path: str, special_tokens: dict | None = None):
  """The tokenizer at `path`: a Hugging Face tokenizer.json (or a directory holding one), else a
  sentencepiece model."""
  if path.endswith(".json") or os.path.isdir(path):
    return HFTokenizer.load(path, special_tokens)
  if special_tokens:
    raise ValueError(f"special_tokens {special_tokens} apply to Hugging Face tokenizers; {path!r} is a "
                     "sentencepiece model (its specials are found by name)")
  return Tokenizer.load(path)
