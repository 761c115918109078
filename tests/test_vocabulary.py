"""The model vocabulary against the tokenizer's ids: declared sizes must hold them (else a clear error at
start-up), `vocab_size=0` rounds the tokenizer's up to 128, and padding ids are never sampled."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from unimm import families
from unimm.data import documents, tokenizer as tokenizer_lib
from unimm.inference import prompts, text

TEXTS = [f"a {c} {s} at the {p}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")
         for p in ("top left", "bottom right", "top right")] * 20


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory):
  """A tokenizer laid out like Llama's: text pieces only, unimm's 20 specials appended after them."""
  path = str(tmp_path_factory.mktemp("tok") / "llama_like.model")
  return tokenizer_lib.train_tokenizer(TEXTS, path, vocab_size=60, builtin_specials=False), path


def test_appended_specials_need_a_larger_declared_vocabulary(llama_like):
  tok, path = llama_like
  pieces = tok._sp.get_piece_size()  # pylint: disable=protected-access
  assert tok.vocab_size == pieces + 4 + tokenizer_lib.NUM_RESERVED  # PAD, BOI, EOI, IMG, reserved: appended
  config = load_config("configs/transfusion/tiny.py")
  config.data.tokenizer.path = path
  config.model.vocab_size = pieces  # pinned to the pieces, as the paper configs' 32,000 for Llama's 32,000
  siglip = load_config("configs/siglip/tiny.py")
  siglip.data.tokenizer.path, siglip.model.vocab_size = path, pieces
  for build, c in ((families.transfusion_task, config), (families.siglip_task, siglip)):
    with pytest.raises(ValueError, match=f"vocab_size={pieces} is smaller than the tokenizer's {tok.vocab_size} ids"
                                         ".*--config.model.vocab_size=128"):
      build(c, tok.vocab_size)
  for family in ("chameleon", "janus"):
    c = load_config(f"configs/{family}/tiny.py")
    c.model.vocab_size = pieces
    with pytest.raises(ValueError, match="is smaller than the tokenizer's"):
      families.build_task(c, tok.vocab_size, frozen_codec=families.random_frozen_codec(c))
  config.model.vocab_size = 0  # sized from the tokenizer: rounded up to a multiple of 128
  assert families.transfusion_task(config, tok.vocab_size).model.vocab_size == 128
  config.model.vocab_size = 256  # declared and large enough: kept, no tokenizer needed
  assert families.transfusion_task(config, tok.vocab_size).model.vocab_size == 256
  assert families.transfusion_task(config, None).model.vocab_size == 256


def test_rounding_rule():
  config = load_config("configs/transfusion/tiny.py")
  config.model.vocab_size = 0
  assert [families.text_vocabulary(config, n) for n in (1, 128, 129, 32_020)] == [128, 128, 256, 32_128]
  with pytest.raises(ValueError, match="declare the vocabulary"):
    families.text_vocabulary(config, None)


def padded_head_params(task, params, pieces: int, stop: int):
  """params whose LM head makes the padding ids [pieces, stop) the most likely (for either sign of the
  one hidden feature left): unmasked, greedy decoding would emit them at every step."""
  params = jax.tree.map(lambda x: x, params)
  params["decoder"]["final_norm"]["scale"] = jnp.zeros_like(params["decoder"]["final_norm"]["scale"]).at[0].set(1.0)
  kernel = jnp.zeros_like(params["lm_head"]["kernel"])
  half = (pieces + stop) // 2
  params["lm_head"]["kernel"] = kernel.at[0, pieces:half].set(1000.0).at[0, half:stop].set(-1000.0)
  return params


@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
def test_padding_ids_are_never_sampled(shapes_tokenizer, family, monkeypatch):
  tok = shapes_tokenizer
  config = load_config(f"configs/{family}/tiny.py")
  config.model.vocab_size = 256  # 128 tokenizer ids, then 128 padding ids (then Chameleon's codes)
  config.model.backbone.update(num_layers=1, dim=32, num_heads=2, mlp_hidden=64)
  task = families.build_task(config, tok.vocab_size, frozen_codec=families.random_frozen_codec(config))
  batch = task.dummy_batch(1, 16, task.image_shape)
  params = nn.unbox(jax.jit(task.init)(jax.random.key(0), batch))
  params = padded_head_params(task, params, tok.vocab_size, 256)
  prompt = prompts.encode([documents.Text("a red circle")], tok, task.model.slots)

  def generated_ids():
    gen = families.of(config).text_generator(task, params, tok.specials)
    out = gen.generate([prompt, prompt], max_new_tokens=6)
    assert all(len(ids) == 6 for ids in out)
    return np.array(out)

  assert generated_ids().max() < tok.vocab_size
  # Without the mask the same params emit padding ids: the check above can fail.
  monkeypatch.setattr(text, "mask_id_range", lambda logits, start, stop: logits)
  assert (generated_ids() >= tok.vocab_size).all()
