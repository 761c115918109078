"""Packing fragments into fixed-length rows with their images.

grain's packers pack token features but know nothing of a row's image budget,
of never splitting an image, or of counting what they drop, so unimm has its
own: first-fit over `num_bins` open rows. A fragment goes into the first open
row with room for its tokens *and* its images (at most `max_images` per row);
when none has room and all bins are open, the fullest row is emitted. A row
that is exactly full is emitted at once, and a row left open for more than
`max_bin_age` fragments is emitted so no document waits forever. Fragments
longer than the row or with too many images are dropped and counted.

Checkpointing keeps no tensors: the state is the parent's state before the
oldest fragment still held, plus which later fragments sit in which open row;
restoring replays those fragments from the parent, so a resumed iterator
yields exactly the rows the original would have.
"""

from __future__ import annotations

import collections
from typing import Any

import grain
import numpy as np

from unimm.data import documents


MAX_SKIP_STREAK = 10_000


class _Bin:
  __slots__ = ("ordinals", "fragments", "tokens", "images")

  def __init__(self):
    self.ordinals: list[int] = []
    self.fragments: list[dict] = []
    self.tokens = 0
    self.images = 0

  def add(self, ordinal: int, fragment: dict) -> None:
    self.ordinals.append(ordinal)
    self.fragments.append(fragment)
    self.tokens += len(fragment["tokens"])
    self.images += len(fragment["images"])


class PackIterDataset(grain.IterDataset):
  """Packs `dict | Skipped` elements (see `layout.layout_document`) into rows."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, max_images: int,
               image_shape: tuple[int, int, int], pad_id: int, num_bins: int = 16,
               max_bin_age: int = 0):
    super().__init__(parent)
    if seq_len <= 0 or max_images < 0 or num_bins <= 0:
      raise ValueError(f"bad packing sizes: seq_len={seq_len}, max_images={max_images}, num_bins={num_bins}")
    self._options = dict(seq_len=seq_len, max_images=max_images, image_shape=tuple(image_shape),
                         pad_id=pad_id, num_bins=num_bins, max_bin_age=max_bin_age or 8 * num_bins)

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), **self._options)

  def __str__(self):
    return f"PackIterDataset({self._options})"


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent, *, seq_len, max_images, image_shape, pad_id, num_bins, max_bin_age):
    super().__init__(parent)
    self._seq_len, self._max_images, self._image_shape = seq_len, max_images, image_shape
    self._pad_id, self._num_bins, self._max_bin_age = pad_id, num_bins, max_bin_age
    self._reset(self._parent.get_state())

  def _reset(self, parent_state) -> None:
    self._consumed = 0  # parent elements read so far
    self._anchor = 0  # ordinal of the oldest held fragment (or `_consumed` if none)
    self._anchor_state = parent_state  # the parent's state just before `_anchor`
    self._held_states: dict[int, Any] = {}
    self._bins: list[_Bin] = []
    # Skips since the last emitted row; always empty between rows (every row
    # returned is emitted, which clears it), so the state needs no copy.
    self._pending = collections.Counter()
    self._skip_streak = 0  # documents skipped in a row: a config that fits none must fail, not spin
    self._exhausted = False

  # -- iteration ---------------------------------------------------------------

  def __next__(self) -> dict:
    while not self._exhausted:
      state_before = self._parent.get_state()
      try:
        element = next(self._parent)
      except StopIteration:
        self._exhausted = True
        break
      row = self._place(self._consumed, element, state_before)
      self._consumed += 1
      if row is not None:
        return row
    if self._bins:
      return self._emit(0)
    raise StopIteration

  def _place(self, ordinal: int, element, state_before) -> dict | None:
    """Puts one element in a bin; returns a row if this closed one."""
    if isinstance(element, documents.Skipped):
      return self._skip(element.reason, ordinal)
    length, count = len(element["tokens"]), len(element["images"])
    if length > self._seq_len or count > self._max_images:
      return self._skip(documents.TOO_LONG if length > self._seq_len else documents.TOO_MANY_IMAGES, ordinal)
    self._skip_streak = 0
    self._held_states[ordinal] = state_before
    if not self._bins:
      self._anchor, self._anchor_state = ordinal, state_before
    for i, b in enumerate(self._bins):
      if b.tokens + length <= self._seq_len and b.images + count <= self._max_images:
        b.add(ordinal, element)
        if b.tokens == self._seq_len:
          return self._emit(i)
        return self._maybe_emit_stale(ordinal)
    new = _Bin()
    new.add(ordinal, element)
    self._bins.append(new)
    if len(self._bins) > self._num_bins:
      fullest = max(range(len(self._bins) - 1), key=lambda i: self._bins[i].tokens)
      return self._emit(fullest)
    return self._maybe_emit_stale(ordinal)

  def _skip(self, reason: str, ordinal: int) -> dict | None:
    self._pending[reason] += 1
    self._skip_streak += 1
    if self._skip_streak >= MAX_SKIP_STREAK:
      raise ValueError(
          f"{self._skip_streak} documents in a row were skipped ({reason} last; counts so far: "
          f"{dict(self._pending)}): nothing fits a row of seq_len={self._seq_len} with max_images="
          f"{self._max_images}. Check data.seq_len against data.image_slots (slots per image) and the sources.")
    return self._maybe_emit_stale(ordinal)

  def _maybe_emit_stale(self, ordinal: int) -> dict | None:
    if self._bins and self._bins[0].ordinals[0] < ordinal - self._max_bin_age:
      return self._emit(0)
    return None

  def _emit(self, index: int) -> dict:
    b = self._bins.pop(index)
    for o in b.ordinals:
      del self._held_states[o]
    if self._held_states:
      self._anchor = min(self._held_states)
      self._anchor_state = self._held_states[self._anchor]
    else:
      self._anchor_state = None  # nothing held: get_state takes the parent's current state
    stats = {r: np.int32(self._pending[r]) for r in documents.SKIP_REASONS}
    self._pending.clear()
    return self._make_row(b.fragments, stats)

  def _make_row(self, fragments: list[dict], stats: dict) -> dict:
    return make_row(fragments, stats, seq_len=self._seq_len, max_images=self._max_images,
                    image_shape=self._image_shape, pad_id=self._pad_id)

  # -- checkpointing -----------------------------------------------------------

  def get_state(self) -> dict:
    anchor_state = self._anchor_state
    if anchor_state is None:  # nothing held: the parent stands right at the anchor
      anchor_state = self._parent.get_state()
      self._anchor, self._anchor_state = self._consumed, anchor_state
    return {
        "parent": anchor_state,
        "anchor": self._anchor,
        "consumed": self._consumed,
        "bins": [list(b.ordinals) for b in self._bins],
        "exhausted": self._exhausted,
    }

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._reset(state["parent"])
    self._anchor = self._consumed = int(state["anchor"])
    home = {o: i for i, ordinals in enumerate(state["bins"]) for o in ordinals}
    self._bins = [_Bin() for _ in state["bins"]]
    for ordinal in range(int(state["anchor"]), int(state["consumed"])):
      state_before = self._parent.get_state()
      element = next(self._parent)
      if ordinal in home:
        self._held_states[ordinal] = state_before
        self._bins[home[ordinal]].add(ordinal, element)
    self._consumed = int(state["consumed"])
    self._exhausted = bool(state["exhausted"])
    if self._exhausted:
      try:
        next(self._parent)  # the original had hit the end; so does the replay
      except StopIteration:
        pass


def make_row(fragments: list[dict], stats: dict, *, seq_len: int, max_images: int, image_shape, pad_id: int) -> dict:
  """One packed row holding `fragments` in order (the packed contract), with skip counts `stats`."""
  t, m = seq_len, max_images
  row = {
      "tokens": np.full(t, pad_id, np.int32),
      "segment_ids": np.zeros(t, np.int32),
      "positions": np.zeros(t, np.int32),
      "image_ids": np.zeros(t, np.int32),
      "loss_weights": np.zeros(t, np.float32),
      "images": np.zeros((m, *image_shape), np.uint8),
      "image_valid": np.zeros(m, bool),
      "image_t_max": np.zeros(m, np.int32),
      "image_written": np.zeros(m, bool),
  }
  start, first_image = 0, 0
  for segment, frag in enumerate(fragments, start=1):
    n, k = len(frag["tokens"]), len(frag["images"])
    span = slice(start, start + n)
    row["tokens"][span] = frag["tokens"]
    row["segment_ids"][span] = segment
    row["positions"][span] = np.arange(n)
    row["image_ids"][span] = np.where(frag["image_ids"] > 0, frag["image_ids"] + first_image, 0)
    row["loss_weights"][span] = frag["loss_weights"]
    row["images"][first_image:first_image + k] = frag["images"]
    row["image_valid"][first_image:first_image + k] = True
    row["image_t_max"][first_image:first_image + k] = frag["image_t_max"]
    row["image_written"][first_image:first_image + k] = frag["image_written"]
    start, first_image = start + n, first_image + k
  row["stats"] = stats
  return row
