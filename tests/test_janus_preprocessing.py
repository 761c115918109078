"""Janus's image preprocessing: images it reads letterboxed, images it writes centre-cropped (per role)."""

import glob
import json

import numpy as np
from PIL import Image
import pytest

from array_record.python.array_record_module import ArrayRecordReader
from unimm import imaging
from unimm.data import documents, layout, prepare, records


def _random_image(rng, w, h):
  return rng.integers(0, 256, (h, w, 3)).astype(np.uint8)


def test_pad_is_janus_image_processor_and_crop_is_the_centre_square():
  transformers = pytest.importorskip("transformers")
  # Janus-Pro's processor: image_mean 0.5 → background (127, 127, 127), bicubic, long side to the size.
  reference = transformers.JanusImageProcessorPil(size={"height": 32, "width": 32}, do_normalize=False,
                                                  do_rescale=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
  rng = np.random.default_rng(0)
  for w, h in ((40, 20), (20, 45), (64, 64), (33, 70), (32, 7)):
    pixels = _random_image(rng, w, h)
    want = reference(Image.fromarray(pixels), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(imaging.fit_square(Image.fromarray(pixels), 32, "pad")), want)
  pixels = _random_image(rng, 48, 32)
  cropped = np.asarray(imaging.fit_square(Image.fromarray(pixels), 32, "crop"))
  np.testing.assert_array_equal(cropped, pixels[:, 8:40])  # no resize needed: exactly the centre columns


def test_prepared_per_role_images_are_read_padded_and_written_cropped(tmp_path):
  rng = np.random.default_rng(1)
  wide = _random_image(rng, 64, 32)
  Image.fromarray(wide).save(tmp_path / "wide.png")
  with open(tmp_path / "docs.jsonl", "w") as f:
    f.write(json.dumps({"parts": [{"text": "a wide picture"}, {"image": "wide.png"}], "pair": True}) + "\n")
  summary = prepare.prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / "out"), image_size=32,
                            image_fit="per_role", workers=1)
  assert summary["written"] == 1
  reader = ArrayRecordReader(glob.glob(str(tmp_path / "out" / "*.array_record"))[0])
  doc = records.decode_document(reader.read([0])[0])
  image = next(p for p in doc.parts if isinstance(p, documents.Image))
  crop = np.asarray(imaging.fit_square(Image.fromarray(wide), 32, "crop"))
  pad = np.asarray(imaging.fit_square(Image.fromarray(wide), 32, "pad"))
  np.testing.assert_array_equal(image.pixels, crop)
  np.testing.assert_array_equal(image.read_pixels, pad)
  assert (pad[:8] == 127).all() and (pad[-8:] == 127).all()  # letterboxed: 64×32 → 32×16 in the middle

  class Tok:  # a stand-in tokenizer: one id per character
    specials = documents_specials()

    @staticmethod
    def encode(text):
      return [10 + (ord(c) % 50) for c in text]

  opts = layout.LayoutOptions(image_shape=(32, 32, 3), image_slots=4, caption_dropout=0.0)
  rng_layout = np.random.default_rng(0)
  written = layout.layout_document(documents.Document(doc.parts, is_pair=True, caption_first_prob=1.0), Tok, opts,
                                   rng_layout)
  read = layout.layout_document(documents.Document(doc.parts, is_pair=True, caption_first_prob=0.0), Tok, opts,
                                rng_layout)
  np.testing.assert_array_equal(written["images"][0], crop)  # text → image: the model writes the crop
  np.testing.assert_array_equal(read["images"][0], pad)  # image → text: the model reads the whole picture


def documents_specials():
  from unimm.data.tokenizer import SpecialIds  # pylint: disable=g-import-not-at-top
  return SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4, img=5, reserved=tuple(range(6, 22)))
