"""Evaluation batches: a split read once, in order, every rank given the same number of batches
(short ranks get zero-weight padding), which ZeRO-3's collective forward passes need.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from data_pipelines.eval_split import EvalShare
from data_pipelines.loader.accounting import SkipLog
from data_pipelines.loader.shard_io import read_checked
from data_pipelines.loader.text import TextShards, checked_windows, collate_windows


def eval_batches(
    data: TextShards, split: str, batch_size: int, rank: int = 0, world_size: int = 1, max_samples: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """The split's first ``max_samples`` windows, sample i on rank i % world_size, in order.

    Every rank yields the same number of batches; padding rows carry ``weight`` 0 so they
    do not count. Summing loss x weight over ranks gives the loss over the split exactly,
    whatever the world size. Bad windows are skipped (and counted) before the division, so
    every rank agrees on which window is i.
    """
    skips = SkipLog(f"eval {split}: ")
    samples = read_checked(data.shards(split), skips, data.shard_samples(split), data.keep(split), data.fetch)
    windows = checked_windows(samples, skips, data.seq_len, data.vocab_size, data.chat)
    share: EvalShare[np.ndarray, np.ndarray] = EvalShare(
        data.num_samples(split), max_samples, rank, world_size, batch_size
    )
    for rows, template in itertools.chain(share.read(windows, lambda i, window, mine: window), share.rest()):
        batch = collate_windows([template if window is None else window for window in rows])
        batch["weight"] = torch.tensor([0.0 if window is None else 1.0 for window in rows])
        yield batch
