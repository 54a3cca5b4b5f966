"""Byte-level tokenizer with BOS, EOS and padding.

Notation: B texts in a batch, T tokens per row.

Token ids: 0 is PAD, 1 is BOS, 2 is EOS, and byte value b (0..255) of the
UTF-8 encoding is id b + 3, so the vocabulary has 259 entries. Bytes rather
than a learned subword vocabulary because:

- there is no vocabulary file to download, train or version;
- every Unicode text round-trips exactly through UTF-8;
- the rated sentences are short (median about 100 bytes, longest 855), so the
  longer sequences cost little.

A model can sample byte sequences that are not valid UTF-8, so decoding
replaces them with U+FFFD instead of raising.
"""

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
_BYTE_OFFSET = 3
_NUM_BYTES = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class ByteTokenizer:
  """Maps text to UTF-8 byte ids and back; see the module docstring for ids.

  Attributes:
    add_bos: whether `encode` puts BOS first by default.
    add_eos: whether `encode` puts EOS last by default.
  """

  add_bos: bool = True
  add_eos: bool = True

  pad_id: int = dataclasses.field(default=PAD_ID, init=False)
  bos_id: int = dataclasses.field(default=BOS_ID, init=False)
  eos_id: int = dataclasses.field(default=EOS_ID, init=False)

  @property
  def vocab_size(self) -> int:
    """Number of token ids: 3 special ids plus 256 byte values."""
    return _BYTE_OFFSET + _NUM_BYTES

  def encode(
      self,
      text: str,
      *,
      add_bos: bool | None = None,
      add_eos: bool | None = None,
  ) -> np.ndarray:
    """Encodes one text.

    Args:
      text: any Python string. Lone surrogates, which UTF-8 cannot encode,
        become '?'.
      add_bos: put BOS first; None uses the tokenizer's default.
      add_eos: put EOS last; None uses the tokenizer's default.

    Returns:
      [T] int32 token ids with T = number of UTF-8 bytes (+1 per special id).
    """
    add_bos = self.add_bos if add_bos is None else add_bos
    add_eos = self.add_eos if add_eos is None else add_eos
    if not isinstance(text, str):
      raise TypeError(
          f'encode expects a str, got {type(text).__name__}: {text!r:.80}.'
      )

    byte_ids = np.frombuffer(
        text.encode('utf-8', errors='replace'), dtype=np.uint8
    ).astype(np.int32)
    parts = []
    if add_bos:
      parts.append(np.array([BOS_ID], np.int32))
    parts.append(byte_ids + _BYTE_OFFSET)
    if add_eos:
      parts.append(np.array([EOS_ID], np.int32))
    return np.concatenate(parts)

  def encode_batch(
      self,
      texts: Sequence[str],
      *,
      max_length: int | None = None,
      add_bos: bool | None = None,
      add_eos: bool | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Encodes texts into one right-padded array.

    Truncation keeps the first `max_length` tokens of each encoded text
    (BOS included). A truncated row therefore has no EOS, because the text did
    not end there, and it may end inside a multi-byte UTF-8 character, which
    `decode` shows as U+FFFD.

    Args:
      texts: B strings.
      max_length: T, the row length. None pads to the longest encoded text.
      add_bos: see `encode`.
      add_eos: see `encode`.

    Returns:
      tokens: [B, T] int32, PAD after each row's last token.
      lengths: [B] int32 number of tokens before the padding.
    """
    if isinstance(texts, str):
      raise TypeError(
          'encode_batch expects a sequence of strings, got one str; wrap it in'
          ' a list.'
      )
    if max_length is not None and max_length < 1:
      raise ValueError(f'max_length must be >= 1 or None, got {max_length}.')

    encoded = [
        self.encode(text, add_bos=add_bos, add_eos=add_eos) for text in texts
    ]
    if max_length is None:
      max_length = max((len(ids) for ids in encoded), default=0)
    tokens = np.full((len(encoded), max_length), PAD_ID, dtype=np.int32)
    lengths = np.zeros((len(encoded),), dtype=np.int32)
    for row, ids in enumerate(encoded):
      kept = ids[:max_length]
      tokens[row, : len(kept)] = kept
      lengths[row] = len(kept)
    return tokens, lengths

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Decodes token ids to text.

    Reading stops at the first EOS. PAD and BOS ids are skipped wherever they
    appear, and invalid UTF-8 becomes U+FFFD.

    Args:
      ids: [T] integer token ids, each in [0, vocab_size).

    Returns:
      The decoded text.

    Raises:
      ValueError: an id lies outside [0, vocab_size).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(
          f'decode expects a [T] array of ids, got shape {ids.shape}; use'
          ' decode_batch for [B, T].'
      )
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'decode expects integer ids, got dtype {ids.dtype}.')
    out_of_range = (ids < 0) | (ids >= self.vocab_size)
    if np.any(out_of_range):
      raise ValueError(
          f'Token ids must lie in [0, {self.vocab_size}), got'
          f' {ids[out_of_range][:5].tolist()}; was the model built with'
          f' vocab_size={self.vocab_size}?'
      )

    eos_positions = np.flatnonzero(ids == EOS_ID)
    if eos_positions.size:
      ids = ids[: eos_positions[0]]
    byte_ids = ids[ids >= _BYTE_OFFSET] - _BYTE_OFFSET
    return bytes(byte_ids.astype(np.uint8)).decode('utf-8', errors='replace')

  def decode_batch(
      self,
      tokens: np.ndarray,
      lengths: np.ndarray | None = None,
  ) -> list[str]:
    """Decodes each row of `tokens`.

    Args:
      tokens: [B, T] integer token ids.
      lengths: optional [B] number of valid tokens per row; ids after it are
        ignored. Without it, each row ends at its first EOS.

    Returns:
      B decoded texts.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(
          f'decode_batch expects [B, T] tokens, got shape {tokens.shape}.'
      )
    if lengths is not None:
      lengths = np.asarray(lengths)
      if lengths.shape != tokens.shape[:1]:
        raise ValueError(
            f'lengths must have shape [B] = {tokens.shape[:1]}, got'
            f' {lengths.shape}.'
        )
      return [
          self.decode(row[:n]) for row, n in zip(tokens, lengths, strict=True)
      ]
    return [self.decode(row) for row in tokens]
