"""Streaming loaders over prepared WebDataset shards.

Training streams are endless: every epoch re-shuffles the shard list with (seed, epoch)
*before* it is divided among ranks and workers (webdataset shuffles after the split, so each
worker would otherwise keep the same shards forever), then a seeded shuffle buffer mixes
samples. Because no rank ever runs out, no rank waits at an epoch end for another one; the
trainer decides the length of a run in steps. Every choice is a pure function of
(seed, epoch, rank, worker), so the stream is reproducible and can be resumed by position.

Evaluation reads a split once, in order, and gives every rank the same number of batches
(short ranks get zero-weight padding), which ZeRO-3's collective forward passes need.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

from data_pipelines.eval_split import EvalShare
from data_pipelines.manifest import read_manifest

logger = logging.getLogger("data_pipelines.loader")


def _seed(*parts: int | str) -> int:
    """A stable 64-bit seed from several parts (Python's hash() is salted per process)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class Slot:
    """One reader: a (rank, worker) pair out of world_size x num_workers."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def epoch_shards(shards: list[str], slot: Slot, epoch: int, seed: int, resampled: bool = False) -> tuple[list[str], bool]:
    """The shards this slot reads in an epoch, and whether it must also take every
    ``slot.count``-th sample of them (when there are fewer shards than slots)."""
    rng = random.Random(_seed(seed, "shards", epoch))
    if resampled:
        # Each slot draws its own shards with replacement: any shard count works for any world size.
        srng = random.Random(_seed(seed, "resample", epoch, slot.index))
        per_slot = max(1, len(shards) // slot.count)
        return [srng.choice(shards) for _ in range(per_slot)], False
    order = list(shards)
    rng.shuffle(order)
    if len(order) >= slot.count:
        return order[slot.index :: slot.count], False
    return order, True


def read_samples(urls: Iterable[str], handler: Callable[[Exception], bool] | None = None) -> Iterator[dict]:
    """Raw samples (key -> bytes) of tar shards, read with webdataset."""
    src = ({"url": u} for u in urls)
    kwargs = {"handler": handler} if handler is not None else {}
    return wds.tarfile_to_samples(**kwargs)(src)


def read_checked(urls: Iterable[str], log: "SkipLog", expected: dict[str, int] | None = None) -> Iterator[dict]:
    """read_samples, shard by shard, that also notices a shard yielding fewer samples than the
    manifest says: a tar cut at a member boundary ends without any error, and its lost samples
    are counted (reason "short_shard") and the shard named."""
    for url in urls:
        n = 0
        for sample in read_samples([url], log.handler):
            n += 1
            yield sample
        want = (expected or {}).get(url)
        if want is not None and n < want:
            log.add("short_shard", f"{url}: {n} of {want} samples (truncated?)", count=want - n)


class BadSample(ValueError):
    """A sample that cannot be trained on; ``reason`` is its counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class SkipLog:
    """Counts skipped samples and shards by reason and warns, naming the item.

    The first ``LOG_FIRST`` items of each reason are logged, then every ``LOG_EVERY``-th: dirty
    data must not flood the log any more than it may stall the run. Used as the webdataset
    handler: it never sleeps (webdataset's warn_and_continue sleeps 0.5 s per error).
    """

    LOG_FIRST, LOG_EVERY = 10, 1000

    def __init__(self, where: str = ""):
        self.where = where
        self.counts: Counter[str] = Counter()
        self._events: Counter[str] = Counter()
        self.examples: list[str] = []

    def add(self, reason: str, detail: str, count: int = 1) -> None:
        """One event (a sample, or a shard that lost ``count`` samples)."""
        self.counts[reason] += count
        self._events[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{reason}: {detail}")
        n = self._events[reason]
        if n <= self.LOG_FIRST or n % self.LOG_EVERY == 0:
            logger.warning("%sskipped (%s, %d so far): %s", self.where, reason, self.counts[reason], detail)

    def stats(self, slot: int, read: int) -> dict:
        """The counters a batch carries to the trainer (DataLoader workers are other processes)."""
        return {"slot": slot, "read": read, "skipped": dict(self.counts)}

    def handler(self, exn: Exception) -> bool:
        self.add("bad_shard", f"{type(exn).__name__}: {exn}")
        return True


def _url_and_key(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def decode_tokens(sample: dict, seq_len: int | None = None, vocab_size: int | None = None) -> np.ndarray:
    """The token window of a sample, checked; raises BadSample naming the shard and key."""
    data = sample.get("tokens.npy")
    where = _url_and_key(sample)
    if data is None:
        raise BadSample("missing_tokens", f"{where} has no tokens.npy (members: {sorted(k for k in sample if not k.startswith('__'))})")
    if isinstance(data, (bytes, bytearray)):
        try:
            data = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any unreadable payload is the same kind of bad sample
            raise BadSample("bad_npy", f"{where}: {type(e).__name__}: {e}") from None
    if data.dtype.kind not in "iu":
        raise BadSample("wrong_dtype", f"{where}: token dtype {data.dtype}, expected an integer type")
    if seq_len is not None and data.shape != (seq_len + 1,):
        raise BadSample("wrong_length", f"{where}: shape {data.shape}, expected ({seq_len + 1},)")
    if vocab_size is not None and data.size and (int(data.max()) >= vocab_size or int(data.min()) < 0):
        raise BadSample("token_out_of_range", f"{where}: token ids outside [0, {vocab_size})")
    return data


def checked_window(sample: dict, log: SkipLog, seq_len: int | None, vocab_size: int | None) -> np.ndarray | None:
    """decode_tokens, or None after logging and counting the reason."""
    try:
        return decode_tokens(sample, seq_len, vocab_size)
    except BadSample as e:
        log.add(e.reason, str(e))
        return None


def checked_windows(samples: Iterable[dict], log: SkipLog, seq_len: int | None, vocab_size: int | None) -> Iterator[np.ndarray]:
    for sample in samples:
        window = checked_window(sample, log, seq_len, vocab_size)
        if window is not None:
            yield window


def shuffle_buffer(samples: Iterable, size: int, rng: random.Random) -> Iterator:
    """Reservoir shuffle: hold ``size`` samples, emit a random one as each new one arrives."""
    if size <= 1:
        yield from samples
        return
    buf: list = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


class PreparedShards:
    """A prepared dataset directory: its manifest (checked to be of ``KIND``) and shard paths per split."""

    KIND = ""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if self.manifest.get("kind") != self.KIND:
            raise ValueError(f"{self.root}/manifest.json: kind is {self.manifest.get('kind')!r}, expected {self.KIND!r}")

    def shards(self, split: str) -> list[str]:
        info = self.manifest["splits"].get(split)
        if info is None:
            raise ValueError(f"{self.root}/manifest.json: no split {split!r} (have {sorted(self.manifest['splits'])})")
        return [str(self.root / s) for s in info["shards"]]

    def num_samples(self, split: str) -> int:
        return int(self.manifest["splits"][split]["samples"])

    def shard_samples(self, split: str) -> dict[str, int] | None:
        """Samples per shard path as the manifest records them (None for manifests without them)."""
        info = self.manifest["splits"][split]
        counts = info.get("shard_samples")
        if counts is None or len(counts) != len(info["shards"]):
            return None
        return dict(zip(self.shards(split), map(int, counts)))


class TextShards(PreparedShards):
    """A prepared text dataset: manifest plus shard paths."""

    KIND = "text"

    def __init__(self, root: str | Path):
        super().__init__(root)
        self.seq_len: int = int(self.manifest["seq_len"])
        self.vocab_size: int | None = self.manifest.get("tokenizer", {}).get("vocab_size")


def _collate(windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    arr = torch.from_numpy(np.stack(windows).astype(np.int64))
    return {"input_ids": arr[:, :-1].contiguous(), "labels": arr[:, 1:].contiguous()}


_LEDGERS: dict[tuple, tuple[set, int]] = {}


class EpochStream(torch.utils.data.IterableDataset):
    """The training stream of one rank, shared by text and image-text data; endless.

    Each epoch's shard list is shuffled with (seed, epoch), divided among the world's slots
    (rank x DataLoader worker; by sample when there are fewer shards than slots), read, passed
    through a seeded shuffle buffer and batched. Under a DataLoader with workers, DataLoader
    interleaves the workers' batches in a fixed round-robin, so the rank's stream stays
    deterministic and a resume can replay it.

    ``history`` lists earlier segments of the same run that ran on other world sizes, oldest
    first, each ``{"world", "workers", "micro", "micro_batches"}`` (micro-batches pulled per
    rank). The stream then starts with the *remainder*: every sample of the epochs those
    segments touched that they did not consume, re-divided among this world's slots, and goes
    on from the next epoch. Within an epoch no sample is lost or repeated across a change of
    world size. Finding the consumed samples replays the earlier streams (O(samples seen)).
    With ``trace`` each batch carries ``_ids``: "epoch:shard:key" of its samples.

    Subclasses say how a raw sample is decoded (``decode``: None to skip it, after logging),
    whether that happens before the shuffle buffer (``DECODE_EARLY``: small decoded items) or
    after it (compressed images are cheaper to hold), and how items become a batch (``collate``).
    """

    DECODE_EARLY = True

    def __init__(self, data: PreparedShards, split: str, batch_size: int, rank: int = 0, world_size: int = 1, *,
                 seed: int = 0, shuffle_buffer: int = 1000, resampled: bool = False, num_workers: int = 0,
                 history: Sequence[dict] = (), trace: bool = False):
        super().__init__()
        self.data, self.split = data, split
        self.shards = data.shards(split)
        if not self.shards:
            raise ValueError(f"{data.root}: split {split!r} has no shards")
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.buffer, self.resampled = seed, shuffle_buffer, resampled
        self.num_workers = max(1, num_workers)
        self.set_history(history)
        self.trace = trace
        self.expected = data.shard_samples(split)
        self.skips = SkipLog(f"rank {rank}: ")
        self.samples_read = 0

    def set_history(self, history: Sequence[dict]) -> None:
        """Earlier segments of the run read with other layouts (see the class docstring)."""
        if history and self.resampled:
            raise ValueError("data.resampled draws shards with replacement: there is no epoch position to re-divide "
                             "when the world size, micro_batch_size or data.num_workers changes")
        self.history = [dict(h) for h in history]

    # -- what a subclass provides
    def decode(self, sample: dict):
        raise NotImplementedError

    def collate(self, items: list, state) -> dict:
        raise NotImplementedError

    def finish(self, batch: dict) -> dict:
        """Last touches in the consuming process, after a batch left a DataLoader worker
        (the image stream normalises uint8 pixels here); by default none."""
        return batch

    def slot_state(self, slot: Slot):
        """Per-slot state for collate (e.g. the augmentation generator)."""
        return None

    def replica(self, batch_size: int, rank: int, world_size: int, num_workers: int,
                history: Sequence[dict]) -> "EpochStream":
        """The same stream as another world had it (for replaying earlier segments)."""
        raise NotImplementedError

    # -- the shared machinery
    def _slot(self) -> Slot:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        return Slot(self.rank, self.world_size, worker, self.num_workers)

    def _decoded(self, tagged: Iterable[tuple[tuple, dict]]) -> Iterator[tuple[tuple, object]]:
        for ident, sample in tagged:
            item = self.decode(sample)
            if item is not None:
                self.samples_read += 1
                yield ident, item

    def samples(self, slot: Slot) -> Iterator[tuple[tuple, object]]:
        """(epoch, shard, key) and item of every sample this slot reads, epoch after epoch
        (items decoded when DECODE_EARLY, raw otherwise)."""
        epoch = 0
        if self.history:
            consumed, last_epoch = self._ledger()
            yield from self._maybe_decoded(self._remainder(slot, consumed, last_epoch))
            epoch = last_epoch + 1
        while True:
            urls, by_sample = epoch_shards(self.shards, slot, epoch, self.seed, self.resampled)
            mine = ((self._ident(epoch, s), s) for i, s in enumerate(read_checked(urls, self.skips, self.expected))
                    if not by_sample or i % slot.count == slot.index)
            got = 0
            for item in self._maybe_decoded(mine):
                got += 1
                yield item
            if got == 0:
                raise RuntimeError(f"rank {self.rank}: a whole epoch of {len(urls)} shard(s) gave no samples "
                                   f"(skipped: {dict(self.skips.counts)}; first: {self.skips.examples[:3]}); "
                                   "fewer samples than ranks x workers, or unreadable shards")
            epoch += 1

    @staticmethod
    def _ident(epoch: int, sample: dict) -> tuple:
        return epoch, sample.get("__url__"), sample.get("__key__")

    def _maybe_decoded(self, tagged):
        return self._decoded(tagged) if self.DECODE_EARLY else tagged

    def _remainder(self, slot: Slot, consumed: set, last_epoch: int) -> Iterator[tuple[tuple, dict]]:
        """Epochs 0..last_epoch without the consumed samples, divided among this world's slots."""
        for epoch in range(last_epoch + 1):
            order, _ = epoch_shards(self.shards, Slot(), epoch, self.seed)
            by_shard = len(order) >= slot.count
            urls = order[slot.index :: slot.count] if by_shard else order
            left = ((self._ident(epoch, s), s) for s in read_checked(urls, self.skips, self.expected))
            left = ((i, s) for i, s in left if i not in consumed)
            yield from (t for n, t in enumerate(left) if by_shard or n % slot.count == slot.index)

    def _ledger(self) -> tuple[set, int]:
        """The samples all earlier segments consumed, and the last epoch they touched."""
        key = (str(self.data.root), self.split, self.seed, self.buffer, type(self).__name__, repr(self.history))
        if key not in _LEDGERS:
            _LEDGERS.clear()  # one run's history at a time
            _LEDGERS[key] = self._replay()
        return _LEDGERS[key]

    def _replay(self) -> tuple[set, int]:
        *earlier, last = self.history
        consumed: set = set()
        last_epoch = 0
        if earlier:
            before, last_epoch = self.replica(1, 0, 1, 0, earlier)._ledger()
            consumed |= before
        world, workers, micro = int(last["world"]), max(1, int(last["workers"])), int(last["micro"])
        for rank in range(world):
            old = self.replica(micro, rank, world, workers, earlier)
            for worker in range(workers):
                pulled = len(range(worker, int(last["micro_batches"]), workers))  # DataLoader round-robin
                for ids, _ in itertools.islice(old._batches(Slot(rank, world, worker, workers)), pulled):
                    consumed.update(ids)
                    last_epoch = max(last_epoch, max(i[0] for i in ids))
        return consumed, last_epoch

    def _batches(self, slot: Slot) -> Iterator[tuple[list[tuple], list]]:
        rng = random.Random(_seed(self.seed, "buffer", slot.index))
        ids: list[tuple] = []
        items: list = []
        for ident, item in shuffle_buffer(self.samples(slot), self.buffer, rng):
            if not self.DECODE_EARLY:
                item = self.decode(item)
                if item is None:
                    continue
                self.samples_read += 1
            ids.append(ident)
            items.append(item)
            if len(items) == self.batch_size:
                yield ids, items
                ids, items = [], []

    def __iter__(self) -> Iterator[dict]:
        slot = self._slot()
        state = self.slot_state(slot)
        for ids, items in self._batches(slot):
            out = self.collate(items, state)
            # Counters travel with the batch: DataLoader workers are other processes.
            out["_stats"] = self.skips.stats(slot.index, self.samples_read)
            if self.trace:
                out["_ids"] = [f"{e}:{Path(u).name}:{k}" for e, u, k in ids]
            yield out


class TextTrainStream(EpochStream):
    """Endless batches of ``{"input_ids", "labels"}`` (long, batch x seq_len) for one rank;
    token windows are checked (dtype, length, id range) and a bad one is skipped and counted."""

    DECODE_EARLY = True

    def __init__(self, data: TextShards, split: str, batch_size: int, rank: int = 0, world_size: int = 1, **options):
        super().__init__(data, split, batch_size, rank, world_size, **options)
        self.seq_len, self.vocab_size = data.seq_len, data.vocab_size

    def decode(self, sample: dict) -> np.ndarray | None:
        return checked_window(sample, self.skips, self.seq_len, self.vocab_size)

    def collate(self, items: list, state) -> dict:
        return _collate(items)

    def replica(self, batch_size, rank, world_size, num_workers, history) -> "TextTrainStream":
        return TextTrainStream(self.data, self.split, batch_size, rank, world_size, seed=self.seed,
                               shuffle_buffer=self.buffer, num_workers=num_workers, history=history)


class TrainStream:
    """One rank's endless training batches, and where in them it is (an iterator with
    ``state_dict`` / ``load_state_dict``, the shape of torchdata's StatefulDataLoader).

    It runs an `EpochStream` in this process or in DataLoader workers and counts the batches it
    hands out. ``state_dict()`` is the whole position, a small dict of plain values:

        world, workers, micro   the layout it is read with (ranks, DataLoader workers, batch size)
        micro_batches           batches handed out in this layout
        data_history            earlier segments of the run that used other layouts

    ``load_state_dict(state)``, before the first batch, continues exactly where ``state`` was.
    In the same layout the deterministic stream is replayed to the position. In any other layout
    (another world size, micro_batch_size or data.num_workers) the saved segment is closed and
    the unconsumed samples of the epochs it touched are re-divided among the new slots, so that
    within an epoch no sample is lost or repeated. Every rank may be given the same state (any
    rank's, as all ranks pull the same number of batches) when the world size changes.

    It also keeps the latest skip counters of each slot it reads (``counts()``): DataLoader
    workers are other processes, so the counters travel inside the batches as ``_stats``.
    """

    def __init__(self, dataset: EpochStream, num_workers: int = 0):
        self.dataset, self.num_workers = dataset, num_workers
        self.micro_batches = 0
        self.slot_stats: dict[int, dict] = {}
        self._it: Iterator[dict] | None = None

    def layout(self) -> dict[str, int]:
        return {"world": self.dataset.world_size, "workers": self.num_workers, "micro": self.dataset.batch_size}

    def state_dict(self) -> dict:
        return {**self.layout(), "micro_batches": self.micro_batches,
                "data_history": [dict(h) for h in self.dataset.history]}

    def load_state_dict(self, state: dict) -> None:
        if self._it is not None:
            raise RuntimeError("TrainStream.load_state_dict: the stream has already started")
        saved = {k: int(state[k]) for k in ("world", "workers", "micro")}
        history = [dict(h) for h in state.get("data_history", [])]
        if _same_layout(saved, self.layout()):
            self.dataset.set_history(history)
            for _ in range(int(state["micro_batches"])):  # replay the deterministic stream to the position
                next(self)
        else:
            self.dataset.set_history([*history, {**saved, "micro_batches": int(state["micro_batches"])}])
            self.micro_batches = 0

    def counts(self) -> tuple[int, dict[str, int]]:
        """(samples read, skipped samples by reason) of this rank, over its slots."""
        read, skipped = 0, Counter()
        for stats in self.slot_stats.values():
            read += stats["read"]
            skipped.update(stats["skipped"])
        return read, dict(skipped)

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._start()
        batch = self.dataset.finish(next(self._it))
        self.micro_batches += 1
        self.slot_stats[batch["_stats"]["slot"]] = batch["_stats"]
        return batch

    def _start(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return iter(self.dataset)
        return iter(torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                                persistent_workers=True, prefetch_factor=4))


def _same_layout(a: dict[str, int], b: dict[str, int]) -> bool:
    """One DataLoader worker reads what the rank itself would: workers 0 and 1 are the same layout."""
    return (a["world"], max(1, a["workers"]), a["micro"]) == (b["world"], max(1, b["workers"]), b["micro"])


def train_loader(data: TextShards, split: str, batch_size: int, rank: int, world_size: int, *, seed: int,
                 shuffle_buffer: int = 1000, resampled: bool = False, num_workers: int = 0,
                 history: Sequence[dict] = (), trace: bool = False) -> TrainStream:
    ds = TextTrainStream(data, split, batch_size, rank, world_size, seed=seed, shuffle_buffer=shuffle_buffer,
                         resampled=resampled, num_workers=num_workers, history=history, trace=trace)
    return TrainStream(ds, num_workers)


def eval_batches(data: TextShards, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_samples: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The split's first ``max_samples`` windows, sample i on rank i % world_size, in order.

    Every rank yields the same number of batches; padding rows carry ``weight`` 0 so they
    do not count. Summing loss x weight over ranks gives the loss over the split exactly,
    whatever the world size. Bad windows are skipped (and counted) before the division, so
    every rank agrees on which window is i.
    """
    skips = SkipLog(f"eval {split}: ")
    samples = read_checked(data.shards(split), skips, data.shard_samples(split))
    windows = checked_windows(samples, skips, data.seq_len, data.vocab_size)
    share: EvalShare[np.ndarray, np.ndarray] = EvalShare(data.num_samples(split), max_samples, rank, world_size,
                                                         batch_size)
    for rows, template in itertools.chain(share.read(windows, lambda i, window, mine: window), share.rest()):
        batch = _collate([template if window is None else window for window in rows])
        batch["weight"] = torch.tensor([0.0 if window is None else 1.0 for window in rows])
        yield batch
