"""`digits`: scikit-learn's 1797 real handwritten 8×8 digits with captions.

Pixels are the originals' 0–16 values scaled to uint8 (value × 255/16), one
channel. Caption: ``a handwritten digit {seven}``. The split is fixed: a seeded
permutation, 80% train, 10% validation, 10% test.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 8
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SPLIT_SEED = 0


def to_uint8(values: np.ndarray) -> np.ndarray:
  """sklearn's 0–16 digit values as uint8 pixels."""
  return np.round(np.asarray(values, np.float64) * 255.0 / 16.0).astype(np.uint8)


def caption(label: int) -> str:
  return f"a handwritten digit {NUMBER_WORDS[label]}"


def parse_caption(text: str) -> int | None:
  """The digit a caption names, or None."""
  prefix = "a handwritten digit "
  text = text.strip()
  if not text.startswith(prefix) or text[len(prefix):] not in NUMBER_WORDS:
    return None
  return NUMBER_WORDS.index(text[len(prefix):])


def split_indices() -> dict[str, np.ndarray]:
  """The fixed split of the 1797 digits (indices into `load_digits()`)."""
  n = 1797
  order = np.random.default_rng(_SPLIT_SEED).permutation(n)
  n_train, n_val = int(0.8 * n), int(0.1 * n)
  return {"train": order[:n_train], "validation": order[n_train:n_train + n_val],
          "test": order[n_train + n_val:]}


class Digits(tfds.core.GeneratorBasedBuilder):
  """The digits dataset as a TFDS builder (write it with file_format='array_record')."""

  name = "digits"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "caption": tfds.features.Text(),
            "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8),
            "label": tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
        supervised_keys=None)

  def _split_generators(self, dl_manager):
    del dl_manager  # shipped inside scikit-learn: nothing to download
    return {split: self._generate_examples(idx) for split, idx in split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    for i in indices:
      label = int(digits.target[i])
      yield int(i), {"caption": caption(label), "image": to_uint8(digits.images[i])[..., None],
                     "label": np.int32(label)}
