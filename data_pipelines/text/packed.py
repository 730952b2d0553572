"""Packed conversation windows: the on-disk format of chat data and how it becomes a batch.

A chat dataset (manifest ``"format": "chat"``) stores, per sample, three arrays of seq_len + 1
values: ``tokens.npy`` (token ids, as plain text data), ``mask.npy`` (1 where a token is trained
on: the assistant's tokens) and ``segments.npy`` (which conversation of the window each token
belongs to, 0, 1, ... in order; the padding at the end of a window is a segment of its own).
Whole conversations are packed, never split across windows, so a window can be trained on
without any context from another one.

A batch of such windows carries, beside ``input_ids`` and ``labels`` (-100 where the next token
is not trained on, or belongs to another conversation), ``position_ids`` that restart at 0 in
each conversation and ``segment_ids``, from which the model builds a block-diagonal causal
attention mask (`pretrain.models.packed_attention`). Pure numpy / torch: the loader and
prepare-text both import it, and only the batch functions import torch (prepare-text never
needs it, and importing it costs ~1 s of every run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from data_pipelines.members import npy_member

FORMAT = "chat"
MASK_KEY = "mask.npy"
SEGMENTS_KEY = "segments.npy"
IGNORE_INDEX = -100  # what torch's cross_entropy skips by default


def segment_dtype(window: int) -> np.dtype:
    """A window of n tokens has at most n segments."""
    return np.dtype(np.uint16) if window <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


class ConversationPacker:
    """Greedy packing of whole conversations into windows of ``seq_len + 1`` tokens, in order.

    A conversation that does not fit in what is left of the current window closes it (the rest
    is padded with ``pad_id``, mask 0) and starts the next one. A conversation longer than a
    window keeps its first ``seq_len + 1`` tokens; the cut is counted (``truncated``,
    ``truncated_tokens``).
    """

    def __init__(self, seq_len: int, pad_id: int, dtype: np.dtype | type = np.uint16) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.window = seq_len + 1
        self.pad_id = pad_id
        self.dtype = np.dtype(dtype)
        self.seg_dtype = segment_dtype(self.window)
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._used = 0
        self.documents = 0
        self.windows = 0
        self.trained_tokens = 0  # mask 1, in written windows
        self.padding_tokens = 0
        self.truncated = 0
        self.truncated_tokens = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Add one conversation; return the windows (tokens, mask, segments) it closed."""
        ids, mask = np.asarray(ids), np.asarray(mask, dtype=np.uint8)
        if ids.shape != mask.shape or ids.ndim != 1:
            raise ValueError(f"ids {ids.shape} and mask {mask.shape} must be 1-D of one length")
        if ids.size == 0:
            return []
        if ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max:
            raise ValueError(f"token id out of range for {self.dtype}: min {ids.min()}, max {ids.max()}")
        if ids.size > self.window:
            self.truncated += 1
            self.truncated_tokens += ids.size - self.window
            ids, mask = ids[: self.window], mask[: self.window]
        done = []
        if self._used + ids.size > self.window:
            done.append(self._close())
        self._tokens.append(ids.astype(self.dtype))
        self._masks.append(mask)
        self._used += ids.size
        self.documents += 1
        return done

    def _close(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pad = self.window - self._used
        lengths = [len(t) for t in self._tokens] + ([pad] if pad else [])
        tokens = np.concatenate([*self._tokens, np.full(pad, self.pad_id, dtype=self.dtype)])
        mask = np.concatenate([*self._masks, np.zeros(pad, dtype=np.uint8)])
        segments = np.repeat(np.arange(len(lengths), dtype=self.seg_dtype), lengths)
        self._tokens, self._masks, self._used = [], [], 0
        self.windows += 1
        self.trained_tokens += int(mask.sum())
        self.padding_tokens += pad
        return tokens, mask, segments

    def finish(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The last, partly filled window (padded): conversations are too precious to drop."""
        return [self._close()] if self._tokens else []


def window_sample(key: str, window: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, Any]:
    tokens, mask, segments = window
    return {"__key__": key, "tokens.npy": tokens, MASK_KEY: mask, SEGMENTS_KEY: segments}


def _array(sample: dict, key: str, where: str, bad: type[Exception]) -> np.ndarray:
    data = sample.get(key)
    if data is None:
        raise bad("missing_mask", f"{where} has no {key} (a chat dataset stores it with every window)")
    return npy_member(data, f"{where}: {key}", bad)


def decode_packed(sample: dict, tokens: np.ndarray, where: str, bad: type[Exception]) -> np.ndarray:
    """tokens (already checked), mask and segments of a chat sample as one (3, seq_len + 1) int64
    array, so the loader's shuffle buffer and eval padding handle it as one item. ``bad(reason,
    detail)`` is the loader's bad-sample exception."""
    mask = _array(sample, MASK_KEY, where, bad)
    segments = _array(sample, SEGMENTS_KEY, where, bad)
    for name, arr in ((MASK_KEY, mask), (SEGMENTS_KEY, segments)):
        if arr.shape != tokens.shape or arr.dtype.kind not in "iu":
            raise bad(
                "bad_mask", f"{where}: {name} is {arr.dtype}{arr.shape}, expected integers of shape {tokens.shape}"
            )
    if mask.size and int(mask.max()) > 1:
        raise bad("bad_mask", f"{where}: {MASK_KEY} holds values other than 0 and 1")
    if segments.size > 1 and (np.diff(segments.astype(np.int64)) < 0).any():
        raise bad("bad_mask", f"{where}: {SEGMENTS_KEY} is not non-decreasing")
    return np.stack([tokens.astype(np.int64), mask.astype(np.int64), segments.astype(np.int64)])


def packed_batch(windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """(batch, 3, seq_len + 1) windows -> model inputs and labels for packed conversations."""
    tokens, mask, segments = windows[:, 0], windows[:, 1], windows[:, 2]
    labels = tokens[:, 1:].clone()
    # A label is trained on when the token it predicts is an assistant token of the same conversation.
    keep = (mask[:, 1:] == 1) & (segments[:, 1:] == segments[:, :-1])
    labels[~keep] = IGNORE_INDEX
    seg = segments[:, :-1].contiguous()
    return {
        "input_ids": tokens[:, :-1].contiguous(),
        "labels": labels,
        "position_ids": positions_in_segments(seg),
        "segment_ids": seg,
    }


def positions_in_segments(segments: torch.Tensor) -> torch.Tensor:
    """0, 1, ... restarting where the segment id changes (each conversation starts at position 0)."""
    import torch

    index = torch.arange(segments.shape[-1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=-1).values
    return (index - first).contiguous()
