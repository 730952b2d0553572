"""Pack tokenized documents into fixed-length training windows.

Documents are joined into one stream, each followed by the eos id, and the stream is cut
into non-overlapping windows of `seq_len + 1` tokens: a window `w` trains on
`w[:-1] -> w[1:]`. The tail shorter than a window is dropped and counted. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np


class TokenPacker:
    """Stateful packer: feed documents with `add`, collect finished windows, then `finish`."""

    def __init__(
        self, seq_len: int, eos_id: int, dtype: np.dtype | type = np.uint16, bos_id: int | None = None
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.window = seq_len + 1
        self.eos_id = eos_id
        self.bos_id = bos_id  # put before every document (tokenizers that start a text with one: Llama, Mistral)
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
        """Append one document (its ids, without bos or eos) and return the windows it completed."""
        if self._finished:
            raise RuntimeError("TokenPacker.add after finish")
        doc = np.asarray(ids)
        if self.bos_id is not None:
            doc = np.concatenate([[self.bos_id], doc]).astype(doc.dtype if doc.size else np.int64)
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

    def add_documents(self, ids: np.ndarray, lengths: np.ndarray | Sequence[int]) -> np.ndarray:
        """Append several documents at once: `ids` holds their ids end to end, `lengths` each
        one's count. Returns the windows they completed as rows of a (n, seq_len + 1) array,
        the same windows as `add` called once per document, without a per-document cost."""
        if self._finished:
            raise RuntimeError("TokenPacker.add_documents after finish")
        ids = np.asarray(ids)
        lengths = np.asarray(lengths, dtype=np.int64)
        if ids.ndim != 1 or lengths.ndim != 1 or (lengths.size and lengths.min() < 0) or lengths.sum() != ids.size:
            raise ValueError(f"lengths (sum {int(lengths.sum())}) do not describe {ids.size} ids")
        if self.bos_id is not None:  # each document starts with the bos: one more id apiece
            ids = np.insert(ids, np.cumsum(lengths) - lengths, self.bos_id)
            lengths = lengths + 1
        if ids.size and (ids.min() < 0 or ids.max() > self._limit):
            raise ValueError(f"token id out of range for {self.dtype}: min {ids.min()}, max {ids.max()}")
        # Each document's ids followed by one eos: the eos of document i goes where document
        # i + 1 starts, shifted by the i eos already placed before it.
        ends = np.cumsum(lengths)
        stream = np.empty(len(self._buffer) + ids.size + lengths.size, dtype=self.dtype)
        stream[: len(self._buffer)] = self._buffer
        body = stream[len(self._buffer) :]
        eos_at = ends + np.arange(lengths.size)
        body[eos_at] = self.eos_id
        keep = np.ones(body.size, dtype=bool)
        keep[eos_at] = False
        body[keep] = ids
        self.documents += lengths.size
        self.tokens_in += ids.size + lengths.size
        full = len(stream) // self.window
        cut = full * self.window
        self._buffer = stream[cut:].copy()
        self.windows += full
        return stream[:cut].reshape(full, self.window)

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
