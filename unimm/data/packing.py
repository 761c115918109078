"""Packing fragments into fixed-length rows with their images.

grain's packers pack token features but know nothing of a row's image budget,
of never splitting an image, or of counting what they drop, so unimm has its
own: first-fit over `num_bins` open rows. A fragment goes into the first open
row with room for its tokens *and* its images (at most `max_images` per row);
when none has room and all bins are open, the fullest row is emitted. A row
that is exactly full is emitted at once, and a row left open for more than
`max_bin_age` parent elements is emitted so no document waits forever.

Long documents are split, not dropped (dropping them would skew training
towards short documents). A fragment longer than the row or with more than
`max_images` images is cut into chunks, each packed as its own segment with
positions from 0 (RoPE sees only relative positions inside a segment, so
continuing them would change nothing but float precision, and restarting keeps
the packed contract):

- Consecutive chunks overlap by one token: the chunk covering fragment tokens
  [s, e) is followed by one starting at e-1. That token is the last of the
  first chunk (loss weight 0: a segment's last token predicts nothing) and
  the first of the next, where it keeps its own loss weight (predicting token
  e). So every target of the document (the weight at t predicting token t+1,
  t = 0..L-2) is trained exactly once, and every token is the input of exactly
  one trained position: the overlap token is only a target in the first chunk,
  only an input in the second.
- An image's slots are never cut: the overlap token is never a slot, and a
  chunk holding an image's slots holds its BOI and EOI too (the overlap token
  may be a BOI, ending a chunk just before its image, or an EOI, starting one
  just after). A chunk holds at most `max_images` images, renumbered 1..k with
  their pixels, `image_t_max` and `image_written`.
- Greedy: each chunk is as long as these rules allow (at most `seq_len`).

A document that cannot be cut so (an image with BOI and EOI longer than the
row, or an image when rows hold none) is skipped and counted, as every
too-long document is with `split_long_documents=False`.

Checkpointing keeps no tensors: the state is the parent's state before the
oldest document still held (in an open row, or being split), plus which of its
and later documents' chunks sit in which open row and the next chunk of the
document being split; restoring replays those documents from the parent and
splits them again (splitting is deterministic), so a resumed iterator yields
exactly the rows the original would have.
"""

from __future__ import annotations

import collections
from typing import Any

import grain
import numpy as np

from unimm.data import documents


MAX_SKIP_STREAK = 10_000


def split_fragment(fragment: dict, *, seq_len: int, max_images: int) -> list[dict] | str:
  """`fragment`'s chunks by the chunking rule (module docstring), or the skip reason if it cannot be cut."""
  length, count = len(fragment["tokens"]), len(fragment["images"])
  if length <= seq_len and count <= max_images:
    return [fragment]
  image_ids = fragment["image_ids"]
  slots = np.array([np.flatnonzero(image_ids == k)[[0, -1]] for k in range(1, count + 1)], int).reshape(-1, 2)
  if np.any(slots[:, 1] - slots[:, 0] + 3 > seq_len) or seq_len < 2:  # slots + BOI + EOI
    return documents.TOO_LONG
  if count and not max_images:
    return documents.TOO_MANY_IMAGES
  chunks, start = [], 0
  while True:
    end = min(start + seq_len, length)
    first_image = int(np.searchsorted(slots[:, 0], start))  # images before `start` are in earlier chunks
    if first_image + max_images < count:  # stop at the BOI of the first image over the budget
      end = min(end, int(slots[first_image + max_images, 0]))
    while end < length and image_ids[end - 1] > 0:  # back off a cut inside slots to the image's BOI
      end -= 1
    # Progress: `start` is never a slot, every image fits a row and max_images >= 1, so end >= start + 2.
    assert end >= start + 2, (start, end, seq_len)
    chunks.append(_chunk(fragment, start, end, is_last=end == length))
    if end == length:
      return chunks
    start = end - 1


def _chunk(fragment: dict, start: int, end: int, *, is_last: bool) -> dict:
  image_ids = fragment["image_ids"][start:end]
  held = image_ids[image_ids > 0]
  first, last = (int(held.min()), int(held.max())) if len(held) else (1, 0)
  loss_weights = fragment["loss_weights"][start:end].copy()
  if not is_last:
    loss_weights[-1] = 0.0  # the next chunk, which starts with this token, trains its target
  return {
      "tokens": fragment["tokens"][start:end],
      "image_ids": np.where(image_ids > 0, image_ids - (first - 1), 0).astype(np.int32),
      "loss_weights": loss_weights,
      "images": fragment["images"][first - 1:last],
      "image_t_max": fragment["image_t_max"][first - 1:last],
      "image_written": fragment["image_written"][first - 1:last],
  }


class _Bin:
  __slots__ = ("keys", "fragments", "tokens", "images")

  def __init__(self):
    self.keys: list[tuple[int, int]] = []  # (ordinal, chunk) of each fragment
    self.fragments: list[dict] = []
    self.tokens = 0
    self.images = 0

  def add(self, key: tuple[int, int], fragment: dict) -> None:
    self.keys.append(key)
    self.fragments.append(fragment)
    self.tokens += len(fragment["tokens"])
    self.images += len(fragment["images"])


class PackIterDataset(grain.IterDataset):
  """Packs `dict | Skipped` elements (see `layout.layout_document`) into rows.

  `split_long_documents=False` skips (and counts) a document that does not fit a row instead of
  splitting it.
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, max_images: int,
               image_shape: tuple[int, int, int], pad_id: int, num_bins: int = 16,
               max_bin_age: int = 0, split_long_documents: bool = True):
    super().__init__(parent)
    if seq_len <= 0 or max_images < 0 or num_bins <= 0:
      raise ValueError(f"bad packing sizes: seq_len={seq_len}, max_images={max_images}, num_bins={num_bins}")
    self._options = dict(seq_len=seq_len, max_images=max_images, image_shape=tuple(image_shape),
                         pad_id=pad_id, num_bins=num_bins, max_bin_age=max_bin_age or 8 * num_bins,
                         split_long_documents=bool(split_long_documents))

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), **self._options)

  def __str__(self):
    return f"PackIterDataset({self._options})"


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent, *, seq_len, max_images, image_shape, pad_id, num_bins, max_bin_age,
               split_long_documents):
    super().__init__(parent)
    self._seq_len, self._max_images, self._image_shape = seq_len, max_images, image_shape
    self._pad_id, self._num_bins, self._max_bin_age = pad_id, num_bins, max_bin_age
    self._split = split_long_documents
    self._reset(self._parent.get_state())

  def _reset(self, parent_state) -> None:
    self._consumed = 0  # parent elements read so far
    self._anchor = 0  # ordinal of the oldest held document (or `_consumed` if none)
    self._anchor_state = parent_state  # the parent's state just before `_anchor`
    # Parent state before each held document: one with a chunk in a bin, or the one being split.
    self._held_states: dict[int, Any] = {}
    self._bins: list[_Bin] = []
    self._splitting: int | None = None  # ordinal of the document whose chunks are being placed
    self._chunks: list[dict] = []  # its chunks; `_next_chunk` is the next to place
    self._next_chunk = 0
    # Skips since the last emitted row; always empty between rows (every row
    # returned is emitted, which clears it), so the state needs no copy.
    self._skipped = collections.Counter()
    self._skip_streak = 0  # documents skipped in a row: a config that fits none must fail, not spin
    self._exhausted = False

  # -- iteration ---------------------------------------------------------------

  def __next__(self) -> dict:
    # One chunk placed (or one element read) at a time, since each may close a row.
    while self._splitting is not None or not self._exhausted:
      row = self._place_next_chunk() if self._splitting is not None else self._read()
      if row is not None:
        return row
    if self._bins:
      return self._emit(0)
    raise StopIteration

  def _read(self) -> dict | None:
    """Reads one parent element: skips it, or places its first chunk; returns a row if one closed."""
    state_before = self._parent.get_state()
    try:
      element = next(self._parent)
    except StopIteration:
      self._exhausted = True
      return None
    ordinal = self._consumed
    self._consumed += 1
    chunks = self._chunks_of(element)
    if isinstance(chunks, str):
      return self._skip(chunks, ordinal)
    self._skip_streak = 0
    if not self._held_states:
      self._anchor, self._anchor_state = ordinal, state_before
    self._held_states[ordinal] = state_before
    self._splitting, self._chunks, self._next_chunk = ordinal, chunks, 0
    return self._place_next_chunk()

  def _chunks_of(self, element) -> list[dict] | str:
    """The fragments an element packs as, or why it is skipped."""
    if isinstance(element, documents.Skipped):
      return element.reason
    if self._split:
      return split_fragment(element, seq_len=self._seq_len, max_images=self._max_images)
    if len(element["tokens"]) > self._seq_len:
      return documents.TOO_LONG
    return documents.TOO_MANY_IMAGES if len(element["images"]) > self._max_images else [element]

  def _place_next_chunk(self) -> dict | None:
    key = (self._splitting, self._next_chunk)
    fragment = self._chunks[self._next_chunk]
    self._next_chunk += 1
    if self._next_chunk == len(self._chunks):  # done before placing: the document is no longer held as in progress
      self._splitting, self._chunks = None, []
    return self._place(key, fragment)

  def _place(self, key: tuple[int, int], fragment: dict) -> dict | None:
    """Puts one fragment in a bin; returns a row if this closed one."""
    length, count = len(fragment["tokens"]), len(fragment["images"])
    for i, b in enumerate(self._bins):
      if b.tokens + length <= self._seq_len and b.images + count <= self._max_images:
        b.add(key, fragment)
        return self._emit(i) if b.tokens == self._seq_len else self._maybe_emit_stale(key[0])
    new = _Bin()
    new.add(key, fragment)
    self._bins.append(new)
    if new.tokens == self._seq_len:
      return self._emit(len(self._bins) - 1)
    if len(self._bins) > self._num_bins:
      fullest = max(range(len(self._bins) - 1), key=lambda i: self._bins[i].tokens)
      return self._emit(fullest)
    return self._maybe_emit_stale(key[0])

  def _skip(self, reason: str, ordinal: int) -> dict | None:
    self._skipped[reason] += 1
    self._skip_streak += 1
    if self._skip_streak >= MAX_SKIP_STREAK:
      raise ValueError(
          f"{self._skip_streak} documents in a row were skipped ({reason} last; counts so far: "
          f"{dict(self._skipped)}): nothing fits a row of seq_len={self._seq_len} with max_images="
          f"{self._max_images}. Check data.seq_len against data.image_slots (slots per image) and the sources.")
    return self._maybe_emit_stale(ordinal)

  def _maybe_emit_stale(self, ordinal: int) -> dict | None:
    if self._bins and self._bins[0].keys[0][0] < ordinal - self._max_bin_age:
      return self._emit(0)
    return None

  def _emit(self, index: int) -> dict:
    b = self._bins.pop(index)
    still_held = {o for other in self._bins for o, _ in other.keys} | {self._splitting}
    for o in {o for o, _ in b.keys} - still_held:
      del self._held_states[o]
    if self._held_states:
      self._anchor = min(self._held_states)
      self._anchor_state = self._held_states[self._anchor]
    else:
      self._anchor_state = None  # nothing held: get_state takes the parent's current state
    stats = {r: np.int32(self._skipped[r]) for r in documents.SKIP_REASONS}
    self._skipped.clear()
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
        "bins": [[list(key) for key in b.keys] for b in self._bins],  # [ordinal, chunk] pairs
        "splitting": [] if self._splitting is None else [self._splitting, self._next_chunk],
        "exhausted": self._exhausted,
    }

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._reset(state["parent"])
    self._anchor = self._consumed = int(state["anchor"])
    bins = [[_bin_key(entry) for entry in keys] for keys in state["bins"]]
    splitting = [int(v) for v in state.get("splitting", [])]
    held = {o for keys in bins for o, _ in keys} | set(splitting[:1])
    fragments = {}
    for ordinal in range(int(state["anchor"]), int(state["consumed"])):
      state_before = self._parent.get_state()
      element = next(self._parent)
      if ordinal not in held:
        continue
      chunks = self._chunks_of(element)  # the same chunks as before the save: splitting is deterministic
      if isinstance(chunks, str):
        raise ValueError(f"the packer's checkpoint holds document {ordinal}, which the data now skips ({chunks}): "
                         "the data or data config changed since the save; restore with the same ones.")
      self._held_states[ordinal] = state_before
      fragments.update(((ordinal, c), chunk) for c, chunk in enumerate(chunks))
      if splitting and ordinal == splitting[0]:
        self._splitting, self._chunks, self._next_chunk = ordinal, chunks, splitting[1]
    for keys in bins:
      self._bins.append(_Bin())
      for key in keys:
        self._bins[-1].add(key, fragments[key])
    self._consumed = int(state["consumed"])
    self._exhausted = bool(state["exhausted"])
    if self._exhausted:
      try:
        next(self._parent)  # the original had hit the end; so does the replay
      except StopIteration:
        pass


def _bin_key(entry) -> tuple[int, int]:
  """(ordinal, chunk) of a bin entry of the state; a bare ordinal (states saved before splitting) is chunk 0."""
  return (int(entry), 0) if np.ndim(entry) == 0 else (int(entry[0]), int(entry[1]))


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
