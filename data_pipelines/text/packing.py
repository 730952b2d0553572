"""Pack tokenized documents into fixed-length training windows.

Documents are joined into one stream, each followed by the eos id, and the stream is cut
into non-overlapping windows of `seq_len + 1` tokens: a window `w` trains on
`w[:-1] -> w[1:]`. The tail shorter than a window is dropped and counted. Pure: no I/O.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np


class TokenPacker:
    """Stateful packer: feed documents with `add`, collect finished windows, then `finish`."""

    def __init__(self, seq_len: int, eos_id: int, dtype: np.dtype | type = np.uint16) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.window = seq_len + 1
        self.eos_id = eos_id
        self.dtype = np.dtype(dtype)
        self._limit = np.iinfo(self.dtype).max
        if not 0 <= eos_id <= self._limit:
            raise ValueError(f"eos id {eos_id} does not fit in {self.dtype}")
        self._buffer = np.empty(0, dtype=self.dtype)
        self.documents = 0
        self.tokens_in = 0  # document tokens plus one eos each
        self.windows = 0
        self.dropped_tokens = 0
        self._finished = False

    def add(self, ids: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Append one document (its ids, without eos) and return the windows it completed."""
        if self._finished:
            raise RuntimeError("TokenPacker.add after finish")
        doc = np.asarray(ids)
        if doc.size and (doc.min() < 0 or doc.max() > self._limit):
            # A silent wrap-around in astype would corrupt training data.
            raise ValueError(f"token id out of range for {self.dtype}: min {doc.min()}, max {doc.max()}")
        stream = np.concatenate([self._buffer, doc.astype(self.dtype, copy=False), [self.eos_id]]).astype(
            self.dtype, copy=False
        )
        self.documents += 1
        self.tokens_in += doc.size + 1
        full = len(stream) // self.window
        cut = full * self.window
        # Copies, so callers may keep windows after the buffer is reused.
        windows = [stream[i : i + self.window].copy() for i in range(0, cut, self.window)]
        self._buffer = stream[cut:].copy()
        self.windows += full
        return windows

    def finish(self) -> int:
        """Drop the incomplete tail; return how many tokens it held."""
        if not self._finished:
            self.dropped_tokens = len(self._buffer)
            self._buffer = np.empty(0, dtype=self.dtype)
            self._finished = True
        return self.dropped_tokens

    @property
    def tokens_out(self) -> int:
        """Tokens written in windows (each window holds seq_len + 1)."""
        return self.windows * self.window


def pack_documents(
    documents: Iterable[Sequence[int] | np.ndarray], seq_len: int, eos_id: int, dtype: np.dtype | type = np.uint16
) -> Iterator[np.ndarray]:
    """Generator form of TokenPacker: every full window of the documents' token stream."""
    packer = TokenPacker(seq_len, eos_id, dtype)
    for ids in documents:
        yield from packer.add(ids)
    packer.finish()


def inputs_and_targets(window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a packed window into the model input and the next-token targets."""
    return window[:-1], window[1:]
