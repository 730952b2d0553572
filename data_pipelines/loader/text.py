"""Text: token windows decoded and checked, the prepared text dataset and its training stream."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from data_pipelines.loader.accounting import BadSample, SkipLog
from data_pipelines.loader.prepared import PreparedShards
from data_pipelines.loader.stream import EpochStream
from data_pipelines.loader.train_stream import TrainStream
from data_pipelines.members import npy_member
from data_pipelines.text.packed import FORMAT as PACKED_FORMAT
from data_pipelines.text.packed import decode_packed, packed_batch


def _url_and_key(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def decode_tokens(sample: dict, seq_len: int | None = None, vocab_size: int | None = None) -> np.ndarray:
    """The token window of a sample, checked; raises BadSample naming the shard and key."""
    data = sample.get("tokens.npy")
    where = _url_and_key(sample)
    if data is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample("missing_tokens", f"{where} has no tokens.npy (members: {members})")
    data = npy_member(data, where, BadSample)
    if data.dtype.kind not in "iu":
        raise BadSample("wrong_dtype", f"{where}: token dtype {data.dtype}, expected an integer type")
    if seq_len is not None and data.shape != (seq_len + 1,):
        raise BadSample("wrong_length", f"{where}: shape {data.shape}, expected ({seq_len + 1},)")
    if vocab_size is not None and data.size and (int(data.max()) >= vocab_size or int(data.min()) < 0):
        raise BadSample("token_out_of_range", f"{where}: token ids outside [0, {vocab_size})")
    return data


def checked_window(
    sample: dict, log: SkipLog, seq_len: int | None, vocab_size: int | None, chat: bool = False
) -> np.ndarray | None:
    """decode_tokens (for chat data stacked with its loss mask and segments, see
    `data_pipelines.text.packed`), or None after logging and counting the reason."""
    try:
        window = decode_tokens(sample, seq_len, vocab_size)
        return decode_packed(sample, window, _url_and_key(sample), BadSample) if chat else window
    except BadSample as e:
        log.add(e.reason, str(e))
        return None


def checked_windows(
    samples: Iterable[dict], log: SkipLog, seq_len: int | None, vocab_size: int | None, chat: bool = False
) -> Iterator[np.ndarray]:
    for sample in samples:
        window = checked_window(sample, log, seq_len, vocab_size, chat)
        if window is not None:
            yield window


class TextShards(PreparedShards):
    """A prepared text dataset: manifest plus shard paths."""

    KIND = "text"

    def __init__(self, root: str | Path):
        super().__init__(root)
        self.seq_len: int = int(self.manifest["seq_len"])
        self.vocab_size: int | None = self.manifest.get("tokenizer", {}).get("vocab_size")
        # packed conversations with assistant-only loss masks (prepare-text on chat records)
        self.chat: bool = self.manifest.get("format") == PACKED_FORMAT


def collate_windows(windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    arr = torch.from_numpy(np.stack(windows).astype(np.int64))
    if arr.ndim == 3:  # chat windows: tokens, loss mask, segments
        return packed_batch(arr)
    return {"input_ids": arr[:, :-1].contiguous(), "labels": arr[:, 1:].contiguous()}


class TextTrainStream(EpochStream):
    """Endless batches of ``{"input_ids", "labels"}`` (long, batch x seq_len) for one rank;
    token windows are checked (dtype, length, id range) and a bad one is skipped and counted."""

    DECODE_EARLY = True

    def __init__(self, data: TextShards, split: str, batch_size: int, rank: int = 0, world_size: int = 1, **options):
        super().__init__(data, split, batch_size, rank, world_size, **options)
        self.seq_len, self.vocab_size = data.seq_len, data.vocab_size

    def decode(self, sample: dict) -> np.ndarray | None:
        return checked_window(sample, self.skips, self.seq_len, self.vocab_size, self.data.chat)

    def collate(self, items: list, state) -> dict:
        return collate_windows(items)

    def replica(self, batch_size, rank, world_size, num_workers, history) -> TextTrainStream:
        return TextTrainStream(
            self.data,
            self.split,
            batch_size,
            rank,
            world_size,
            seed=self.seed,
            shuffle_buffer=self.buffer,
            num_workers=num_workers,
            history=history,
            sources=self.sources,
        )


def train_loader(
    data: TextShards,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    *,
    seed: int,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    num_workers: int = 0,
    history: Sequence[dict] = (),
    trace: bool = False,
    sources: Sequence | None = None,
) -> TrainStream:
    """A text `TrainStream`; ``sources`` (a list of (name, shard urls, counts, weight) or
    `StreamSource`s) mixes several corpora instead of reading ``split`` of ``data``."""
    ds = TextTrainStream(
        data,
        split,
        batch_size,
        rank,
        world_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        num_workers=num_workers,
        history=history,
        trace=trace,
        sources=sources,
    )
    return TrainStream(ds, num_workers)
