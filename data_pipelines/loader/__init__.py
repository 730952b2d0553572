"""Streaming loaders over prepared WebDataset shards.

Training streams are endless: every epoch re-shuffles the shard list with (seed, epoch)
*before* it is divided among ranks and workers (webdataset shuffles after the split, so each
worker would otherwise keep the same shards forever), then samples are shuffled in seeded
blocks. Because no rank ever runs out, no rank waits at an epoch end for another one; the
trainer decides the length of a run in steps. Every choice is a pure function of
(seed, epoch, rank, worker, position), so the stream is reproducible and resumes from a small
cursor in O(1) of the run's length. Several weighted sources mix into one stream.

Evaluation reads a split once, in order, and gives every rank the same number of batches
(short ranks get zero-weight padding), which ZeRO-3's collective forward passes need.

The stages, one module each: `shard_io` (opening and reading shards, retries), `accounting`
(skipped samples and shards), `slots` (who reads what, seeds, cursors), `prepared` (a prepared
folder), `mixing` (weighted sources), `stream` (the per-rank `EpochStream`), `replay` (a change
of layout), `train_stream` (the stateful `TrainStream`), `text` (token windows and the text
stream) and `evaluation` (evaluation batches).
"""

from data_pipelines.loader.accounting import BadSample, SkipLog, unreachable_count
from data_pipelines.loader.evaluation import eval_batches
from data_pipelines.loader.mixing import StreamSource, stream_sources
from data_pipelines.loader.prepared import PreparedShards
from data_pipelines.loader.shard_io import ShardUnreachable, read_checked, read_samples, read_shard
from data_pipelines.loader.slots import Slot, epoch_shards, stable_seed
from data_pipelines.loader.stream import EpochStream
from data_pipelines.loader.text import (
    TextShards,
    TextTrainStream,
    checked_window,
    checked_windows,
    decode_tokens,
    train_loader,
)
from data_pipelines.loader.train_stream import TrainStream

__all__ = [
    "BadSample",
    "EpochStream",
    "PreparedShards",
    "ShardUnreachable",
    "SkipLog",
    "Slot",
    "StreamSource",
    "TextShards",
    "TextTrainStream",
    "TrainStream",
    "checked_window",
    "checked_windows",
    "decode_tokens",
    "epoch_shards",
    "eval_batches",
    "read_checked",
    "read_samples",
    "read_shard",
    "stable_seed",
    "stream_sources",
    "train_loader",
    "unreachable_count",
]
