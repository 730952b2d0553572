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
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

from data_pipelines.eval_split import EvalShare
from data_pipelines.manifest import read_manifest
from data_pipelines.members import npy_member
from data_pipelines.sources import FetchError, FetchPolicy, open_shard
from data_pipelines.text.packed import FORMAT as PACKED_FORMAT
from data_pipelines.text.packed import decode_packed, packed_batch

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


def read_samples(urls: Iterable[str], handler: Callable[[Exception], bool] | None = None,
                 fetch: FetchPolicy | None = None) -> Iterator[dict]:
    """Raw samples (key -> bytes) of tar shards: each shard opened by `data_pipelines.sources.open_shard`
    (local files, http(s) and ``pipe:`` with ``fetch.timeout``, fsspec) and read by webdataset's tar
    expander and grouping. An error goes to ``handler`` (webdataset's convention: True skips the
    shard, False ends the stream); without one it is raised. The stream is closed (a ``pipe:``
    command ended) when the shard is done or abandoned."""
    raise_ = handler or wds.reraise_exception
    for url in urls:
        try:
            stream = open_shard(url, fetch)
        except Exception as exn:  # noqa: BLE001 - FetchError, or a local file that cannot be opened
            if raise_(exn):
                continue
            return
        try:
            files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=raise_)
            yield from wds.tariterators.group_by_keys(files, handler=raise_)
        finally:
            stream.close()


class ShardUnreachable(Exception):
    """A shard that could not be fetched after ``data.fetch_retries`` retries; ``samples`` of it
    had been read (and handed on) before the last failure."""

    def __init__(self, url: str, tries: int, samples: int, last: FetchError):
        super().__init__(f"{url}: unreachable after {tries} tries ({last.reason})"
                         + (f"; {samples} samples read before" if samples else ""))
        self.url, self.tries, self.samples, self.last = url, tries, samples, last


def read_shard(url: str, log: "SkipLog", fetch: FetchPolicy | None = None, limit: int | None = None) -> Iterator[dict]:
    """The samples of one shard. A failure to fetch it (`FetchError`: an HTTP error, a dropped
    connection, a failed ``pipe:`` command, no data for ``fetch.timeout`` seconds) is retried up to
    ``fetch.retries`` times with doubling waits of ``fetch.backoff`` seconds, each try re-opening the
    shard and passing over the samples already handed on; then `ShardUnreachable`. Other errors
    (a malformed tar) go to ``log.handler`` (counted, the shard skipped). ``limit``: stop after that
    many samples, without fetching more (a shard found unreachable there when first read)."""
    fetch = fetch or FetchPolicy()

    def handler(exn: Exception) -> bool:
        if isinstance(exn, FetchError):
            raise exn
        return log.handler(exn)

    done, failures = 0, 0
    while limit is None or done < limit:
        seen = 0
        try:
            for sample in read_samples([url], handler, fetch):
                seen += 1
                if seen <= done:
                    continue
                done += 1
                yield sample
                if limit is not None and done >= limit:
                    return
            return
        except FetchError as e:
            failures += 1
            if failures > fetch.retries:
                raise ShardUnreachable(url, failures, done, e) from None
            wait = fetch.delay(failures)
            logger.warning("%s (try %d of %d); trying again in %.1f s", e, failures, fetch.retries + 1, wait)
            time.sleep(wait)


def read_checked(urls: Iterable[str], log: "SkipLog", expected: dict[str, int] | None = None,
                 keep: Callable[[dict], bool] | None = None, fetch: FetchPolicy | None = None) -> Iterator[dict]:
    """read_samples, shard by shard, that also notices a shard yielding fewer samples than the
    manifest says: a tar cut at a member boundary ends without any error, and its lost samples
    are counted (reason "short_shard") and the shard named. A shard that cannot be fetched after
    retries (`read_shard`) is counted as "shard_unreachable" (its missing samples where known).
    ``keep`` (a split's filter of held-out keys, `data_pipelines.sources.KeyFilter`) drops samples
    after they are counted."""
    for url in urls:
        n = 0
        want = (expected or {}).get(url)
        try:
            for sample in read_shard(url, log, fetch):
                n += 1
                if keep is None or keep(sample):
                    yield sample
        except ShardUnreachable as e:
            log.add("shard_unreachable", str(e), count=unreachable_count(want, n))
            continue
        if want is not None and n < want:
            log.add("short_shard", f"{url}: {n} of {want} samples (truncated?)", count=want - n)


def unreachable_count(want: int | None, read: int) -> int:
    """The samples an unreachable shard counts for: those of it not read, where its size is known;
    else 1 (the shard itself)."""
    return max(1, want - read) if want is not None else 1


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
        self.mute = 0  # > 0 while samples counted before (re-read to resume a stream) are read again

    def add(self, reason: str, detail: str, count: int = 1) -> None:
        """One event (a sample, or a shard that lost ``count`` samples); none while muted."""
        if self.mute:
            return
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
        if isinstance(exn, FetchError):  # read_samples without retries: still its own reason
            self.add("shard_unreachable", str(exn))
        else:
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
    data = npy_member(data, where, BadSample)
    if data.dtype.kind not in "iu":
        raise BadSample("wrong_dtype", f"{where}: token dtype {data.dtype}, expected an integer type")
    if seq_len is not None and data.shape != (seq_len + 1,):
        raise BadSample("wrong_length", f"{where}: shape {data.shape}, expected ({seq_len + 1},)")
    if vocab_size is not None and data.size and (int(data.max()) >= vocab_size or int(data.min()) < 0):
        raise BadSample("token_out_of_range", f"{where}: token ids outside [0, {vocab_size})")
    return data


def checked_window(sample: dict, log: SkipLog, seq_len: int | None, vocab_size: int | None,
                   chat: bool = False) -> np.ndarray | None:
    """decode_tokens (for chat data stacked with its loss mask and segments, see
    `data_pipelines.text.packed`), or None after logging and counting the reason."""
    try:
        window = decode_tokens(sample, seq_len, vocab_size)
        return decode_packed(sample, window, _url_and_key(sample), BadSample) if chat else window
    except BadSample as e:
        log.add(e.reason, str(e))
        return None


def checked_windows(samples: Iterable[dict], log: SkipLog, seq_len: int | None, vocab_size: int | None,
                    chat: bool = False) -> Iterator[np.ndarray]:
    for sample in samples:
        window = checked_window(sample, log, seq_len, vocab_size, chat)
        if window is not None:
            yield window


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

    def keep(self, split: str) -> Callable[[dict], bool] | None:
        """A filter of the split's samples (sources whose splits share shards have one); none here."""
        return None


class TextShards(PreparedShards):
    """A prepared text dataset: manifest plus shard paths."""

    KIND = "text"

    def __init__(self, root: str | Path):
        super().__init__(root)
        self.seq_len: int = int(self.manifest["seq_len"])
        self.vocab_size: int | None = self.manifest.get("tokenizer", {}).get("vocab_size")
        # packed conversations with assistant-only loss masks (prepare-text on chat records)
        self.chat: bool = self.manifest.get("format") == PACKED_FORMAT


def _collate(windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    arr = torch.from_numpy(np.stack(windows).astype(np.int64))
    if arr.ndim == 3:  # chat windows: tokens, loss mask, segments
        return packed_batch(arr)
    return {"input_ids": arr[:, :-1].contiguous(), "labels": arr[:, 1:].contiguous()}


@dataclass(frozen=True)
class StreamSource:
    """One source of a training stream: its shard URLs, the samples each shard holds where known
    (for the short-shard check and to step over a finished shard without opening it) and its
    weight in a mixture."""

    name: str
    shards: tuple[str, ...]
    counts: dict[str, int] | None = None
    weight: float = 1.0

    @classmethod
    def of(cls, spec) -> "StreamSource":
        """From a StreamSource or a tuple (name, shard urls, counts, weight); counts: one per
        shard, a dict by url, or None."""
        if isinstance(spec, cls):
            return spec
        name, urls, counts, weight = spec
        urls = tuple(urls)
        if counts is not None and not isinstance(counts, dict):
            counts = dict(zip(urls, map(int, counts)))
        if not weight > 0:
            raise ValueError(f"source {name!r}: weight must be > 0 (got {weight})")
        return cls(str(name), urls, counts or None, float(weight))


def stream_sources(data, split: str) -> list[StreamSource]:
    """What a split is read from: a data object with weighted ``sources`` (data.sources:
    `data_pipelines.sources.SourceData`) gives one stream source per train source; anything else
    (a prepared folder) is one source, the split's shards."""
    many = getattr(data, "sources", None)
    if split == "train" and many:
        return [StreamSource(s.name, tuple(s.shards), dict(s.shard_samples) or None, float(s.weight)) for s in many]
    return [StreamSource(Path(str(data.root)).name or split, tuple(data.shards(split)), data.shard_samples(split))]


def _fresh_cursor() -> dict:
    return {"epoch": 0, "shard": 0, "offset": 0, "kept": 0, "emitted": 0}


_LEDGERS: dict[tuple, tuple[set, list[int]]] = {}


class EpochStream(torch.utils.data.IterableDataset):
    """The training stream of one rank, shared by text and image-text data; endless.

    Each epoch's shard list is shuffled with (seed, epoch), divided among the world's slots
    (rank x DataLoader worker; by sample when there are fewer shards than slots), read, shuffled
    in blocks and batched. Under a DataLoader with workers, DataLoader interleaves the workers'
    batches in a fixed round-robin, so the rank's stream stays deterministic.

    **Sources.** The stream draws from one or more sources (``sources``: `StreamSource`s or tuples
    (name, shard urls, counts, weight); default: the split's shards, or the data's own weighted
    ``sources``). Each source is read as above on its own; each sample of a batch comes from a
    source drawn in proportion to the weights by a generator seeded by (seed, slot, batch).

    **Shuffle.** Each source's samples are shuffled in blocks of ``shuffle_buffer``: a block is
    read, permuted by a generator seeded by (seed, slot, epoch, where the block starts) and handed
    out; blocks do not cross epochs. So the whole state of a slot in a source is a *cursor*: the
    epoch, the reading position where the current block began (shard in the slot's order, samples
    read in that shard, samples of the epoch kept) and how many of the block's items are out.

    **Resume in O(1).** Every batch carries its slot's state (cursors, batches, counters) in
    ``_stats``; `TrainStream` keeps the latest per slot. Resuming a slot skips the shards before
    its cursor without opening them, re-reads its current shard up to the cursor and the block
    (at most one shard and ``shuffle_buffer`` samples), re-permutes it and drops the items already
    handed out: the same batches follow, whatever the length of the run. Samples re-read this way
    are not counted or warned about twice. Augmentation draws come from a generator per (slot, batch).

    ``history`` lists earlier segments of the same run that used other layouts (world size,
    micro-batch size, worker count), oldest first, each ``{"world", "workers", "micro",
    "micro_batches"}`` (micro-batches pulled per rank). The stream then starts with the
    *remainder*: every sample of the epochs those segments touched that they did not consume,
    re-divided among this world's slots, and goes on from the next epoch. Within an epoch no
    sample is lost or repeated across a change of layout. Finding the consumed samples replays
    the earlier segments: a change of layout costs O(samples seen) once (the positions of the
    other layout's slots do not say which samples of their blocks this world's slots may take), and so
    does a resume that lands inside the remainder; later resumes are O(1) again.
    With ``trace`` each batch carries ``_ids``: "epoch:shard:key" of its samples.

    Subclasses say how a raw sample is decoded (``decode``: None to skip it, after logging),
    whether that happens before the shuffle (``DECODE_EARLY``: small decoded items) or after it
    (compressed images are cheaper to hold), and how items become a batch (``collate``).
    """

    DECODE_EARLY = True

    def __init__(self, data: PreparedShards, split: str, batch_size: int, rank: int = 0, world_size: int = 1, *,
                 seed: int = 0, shuffle_buffer: int = 1000, resampled: bool = False, num_workers: int = 0,
                 history: Sequence[dict] = (), trace: bool = False, sources: Sequence | None = None):
        super().__init__()
        self.data, self.split = data, split
        self.sources = [StreamSource.of(s) for s in sources] if sources else stream_sources(data, split)
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must differ: {names}")
        self.shards = [u for s in self.sources for u in s.shards]
        empty = [s.name for s in self.sources if not s.shards]
        if empty:
            raise ValueError(f"{data.root}: split {split!r} has no shards" + (f" (source {empty[0]})" if sources else ""))
        self._source_of = {u: k for k, s in enumerate(self.sources) for u in s.shards}
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.buffer, self.resampled = seed, shuffle_buffer, resampled
        self.num_workers = max(1, num_workers)
        self.set_history(history)
        self.trace = trace
        self.expected = data.shard_samples(split)
        self.keep = data.keep(split) if hasattr(data, "keep") else None
        # retries and timeout of shard fetches: the data object's (data.fetch_* of the recipe), else the defaults
        self.fetch = getattr(data, "fetch", None) or FetchPolicy()
        self.skips = SkipLog(f"rank {rank}: ")
        self.samples_read = 0
        self.io: Counter[str] = Counter()  # shards opened and raw samples read by this process (resume cost)
        self.rotation = 0  # DataLoader worker w plays slot (w + rotation) % workers: a resume continues the round-robin
        self._resume: dict[int, dict] = {}
        self._decoded = [0] * len(self.sources)

    def set_history(self, history: Sequence[dict]) -> None:
        """Earlier segments of the run read with other layouts (see the class docstring)."""
        if history and self.resampled:
            raise ValueError("data.resampled draws shards with replacement: there is no epoch position to re-divide "
                             "when the world size, micro_batch_size or data.num_workers changes")
        self.history = [dict(h) for h in history]

    def resume_from(self, slots: dict[int, dict], rotation: int = 0) -> None:
        """Continue each slot from its saved state (``_stats`` of its last batch handed out)."""
        self._resume = {int(k): dict(v) for k, v in slots.items()}
        self.rotation = rotation

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    # -- what a subclass provides
    def decode(self, sample: dict):
        raise NotImplementedError

    def collate(self, items: list, state) -> dict:
        raise NotImplementedError

    def finish(self, batch: dict) -> dict:
        """Last touches in the consuming process, after a batch left a DataLoader worker
        (the image stream normalises uint8 pixels here); by default none."""
        return batch

    def slot_state(self, slot: Slot, batch: int):
        """State for collating a slot's ``batch``-th batch (e.g. the augmentation generator)."""
        return None

    def replica(self, batch_size: int, rank: int, world_size: int, num_workers: int,
                history: Sequence[dict]) -> "EpochStream":
        """The same stream as another world had it (for replaying earlier segments)."""
        raise NotImplementedError

    # -- the shared machinery
    def _slot(self) -> Slot:
        info = torch.utils.data.get_worker_info()
        worker = (info.id + self.rotation) % self.num_workers if info is not None else 0
        return Slot(self.rank, self.world_size, worker, self.num_workers)

    def _source_seed(self, k: int) -> int:
        # One source keeps the run's seed, so a plain run reads its shards as it always has.
        return self.seed if len(self.sources) == 1 else _seed(self.seed, "source", self.sources[k].name)

    def _read(self, k: int, urls: list[str], by_sample: bool, slot: Slot, epoch: int, shard: int = 0,
              offset: int = 0, kept: int = 0, cut: Sequence[Sequence[int]] = ()) -> Iterator[tuple[tuple[int, int, int], tuple, dict]]:
        """(position after it, ident, raw sample) of the samples this slot takes from ``urls``, read
        from the position (shard, offset, kept): shards before ``shard`` are not opened, the first
        ``offset`` samples of ``shard`` are read and dropped quietly (a tar stream cannot be entered in
        the middle; they were counted when first read). ``kept`` counts the epoch's samples that
        passed the split's filter, by which slots share shards when there are fewer shards than slots.

        A shard that cannot be fetched after ``data.fetch_retries`` retries (`read_shard`) is counted
        ("shard_unreachable") and passed over: a *marker* (position after the shard, None, (shard,
        samples read of it)) follows its samples, so that a cursor moves past it. ``cut`` lists such
        (shard, samples) pairs found when a block now being rebuilt was first read: those shards are
        read to that many samples and passed over again, without fetching more or counting again."""
        log, src = self.skips, self.sources[k]
        cuts = {int(i): int(n) for i, n in cut}
        for i in range(shard, len(urls)):
            url = urls[i]
            skip = offset if i == shard else 0
            self.io["shards_opened"] += 1
            n = 0
            gone = None
            if skip:
                log.mute += 1
            try:
                for sample in read_shard(url, log, self.fetch, cuts.get(i)):
                    n += 1
                    self.io["raw_samples"] += 1
                    if skip:
                        if n == skip:
                            skip = 0
                            log.mute -= 1
                        continue
                    if self.keep is not None and not self.keep(sample):
                        continue
                    index, kept = kept, kept + 1
                    if by_sample and index % slot.count != slot.index:
                        continue
                    yield (i, n, kept), self._ident(epoch, sample), sample
            except ShardUnreachable as e:
                gone = e
            finally:
                if skip:
                    log.mute -= 1
            want = (src.counts or self.expected or {}).get(url)
            if gone is not None or i in cuts:
                if gone is not None:  # samples before offset were counted as read when first read
                    log.add("shard_unreachable", str(gone), count=unreachable_count(want, max(n, offset if i == shard else 0)))
                yield (i + 1, 0, kept), None, (i, n)
                continue
            if want is not None and n < want:
                log.add("short_shard", f"{url}: {n} of {want} samples (truncated?)", count=want - n)

    def _early(self, sample: dict):
        """The item the shuffle holds: decoded when DECODE_EARLY (None: a bad sample, skipped)."""
        if not self.DECODE_EARLY:
            return sample
        item = self.decode(sample)
        if item is not None and not self.skips.mute:
            self.samples_read += 1
        return item

    def samples(self, slot: Slot) -> Iterator[tuple[tuple, object]]:
        """(epoch, shard, key) and item of every sample this slot reads of the first source, in
        reading order, epoch after epoch (items decoded when DECODE_EARLY, raw otherwise)."""
        epoch = 0
        while True:
            urls, by_sample = epoch_shards(list(self.sources[0].shards), slot, epoch, self._source_seed(0), self.resampled)
            for _, ident, sample in self._read(0, urls, by_sample, slot, epoch):
                if ident is None:  # an unreachable shard passed over
                    continue
                item = self._early(sample)
                if item is not None:
                    yield ident, item
            epoch += 1

    def _source_items(self, k: int, slot: Slot, cur: dict) -> Iterator[tuple[tuple, object]]:
        """Endless (ident, item) of source k for this slot, block-shuffled. ``cur`` is the cursor
        (see the class docstring), kept current: after each item it says where the source is."""
        src, seed = self.sources[k], self._source_seed(k)
        size = max(1, self.buffer)
        mid_epoch = any(cur[f] for f in ("shard", "offset", "kept", "emitted"))
        while True:
            epoch = cur["epoch"]
            urls, by_sample = epoch_shards(list(src.shards), slot, epoch, seed, self.resampled)
            reader = self._read(k, urls, by_sample, slot, epoch, cur["shard"], cur["offset"], cur["kept"],
                                cur.get("unreachable", ()))
            got, decoded = int(mid_epoch), self._decoded[k]
            while True:
                start = (cur["shard"], cur["offset"], cur["kept"])
                rebuild = cur["emitted"] > 0  # this block was read before the checkpoint: quietly
                block, end, gone = [], start, []
                self.skips.mute += rebuild
                try:
                    for end, ident, sample in reader:
                        if ident is None:  # an unreachable shard: the cursor of a resume must pass it too
                            gone.append(list(sample))
                            continue
                        item = self._early(sample)
                        if item is not None:
                            block.append((ident, item))
                            if len(block) == size:
                                break
                finally:
                    self.skips.mute -= rebuild
                if rebuild and len(block) <= cur["emitted"]:
                    raise RuntimeError(f"cannot resume {src.name} at epoch {epoch}: the block at shard "
                                       f"{urls[min(start[0], len(urls) - 1)]} holds {len(block)} samples now, "
                                       f"{cur['emitted']}+ when saved (were the shards rewritten?)")
                if not block:
                    break
                if size > 1:
                    random.Random(_seed(seed, "block", slot.index, epoch, start[2])).shuffle(block)
                shard, offset, kept = end
                want = (src.counts or self.expected or {}).get(urls[shard]) if shard < len(urls) else None
                if want is not None and offset >= want:  # the shard is done: a resume need not open it
                    shard, offset = shard + 1, 0
                for j in range(cur["emitted"], len(block)):
                    if j + 1 == len(block):
                        cur.update(shard=shard, offset=offset, kept=kept, emitted=0)
                        cur.pop("unreachable", None)
                    else:
                        cur["emitted"] = j + 1
                        if gone:  # a resume inside this block rebuilds it passing over the same shards
                            cur["unreachable"] = gone
                    got += 1
                    yield block[j]
            if not self.DECODE_EARLY and not mid_epoch and got:
                # the consumer decodes each item before asking for the next: all of this epoch's are done
                got = self._decoded[k] - decoded
            if got == 0:
                raise RuntimeError(f"rank {self.rank}: a whole epoch of {len(urls)} shard(s) of {src.name} gave no "
                                   f"samples (skipped: {dict(self.skips.counts)}; first: {self.skips.examples[:3]}); "
                                   "fewer samples than ranks x workers, or unreadable shards")
            cur.update(_fresh_cursor(), epoch=epoch + 1)
            mid_epoch = False

    def _with_remainder(self, k: int, slot: Slot, cur: dict, ledger: tuple[set, list[int]]) -> Iterator[tuple[tuple, object]]:
        """Source k after a change of layout: the unconsumed rest of the epochs the earlier segments
        touched (shuffled in blocks too), then the source from the next epoch on. The cursor says
        "remainder" meanwhile: such a position is resumed by replaying."""
        consumed, last_epoch = ledger
        cur["remainder"] = True
        size, block, n = max(1, self.buffer), [], 0
        for item in self._remainder(k, slot, consumed, last_epoch[k]):
            block.append(item)
            if len(block) == size:
                random.Random(_seed(self._source_seed(k), "remainder", slot.index, n)).shuffle(block)
                yield from block
                block, n = [], n + 1
        random.Random(_seed(self._source_seed(k), "remainder", slot.index, n)).shuffle(block)
        yield from block
        cur.update(_fresh_cursor(), epoch=last_epoch[k] + 1)
        cur.pop("remainder")
        yield from self._source_items(k, slot, cur)

    @staticmethod
    def _ident(epoch: int, sample: dict) -> tuple:
        return epoch, sample.get("__url__"), sample.get("__key__")

    def _remainder(self, k: int, slot: Slot, consumed: set, last_epoch: int) -> Iterator[tuple[tuple, object]]:
        """Epochs 0..last_epoch of source k without the consumed samples, divided among this world's slots."""
        for epoch in range(last_epoch + 1):
            order, _ = epoch_shards(list(self.sources[k].shards), Slot(), epoch, self._source_seed(k))
            by_shard = len(order) >= slot.count
            urls = order[slot.index :: slot.count] if by_shard else order
            left = ((ident, s) for _, ident, s in self._read(k, urls, False, Slot(), epoch)
                    if ident is not None and ident not in consumed)
            for n, (ident, sample) in enumerate(left):
                if by_shard or n % slot.count == slot.index:
                    item = self._early(sample)
                    if item is not None:
                        yield ident, item

    def _ledger(self) -> tuple[set, list[int]]:
        """The samples all earlier segments consumed, and the last epoch they touched per source."""
        sources = tuple((s.name, s.shards[0], len(s.shards), s.weight) for s in self.sources)
        key = (str(self.data.root), sources, self.split, self.seed, self.buffer, type(self).__name__,
               repr(self.history))
        if key not in _LEDGERS:
            _LEDGERS.clear()  # one run's history at a time
            _LEDGERS[key] = self._replay()
        return _LEDGERS[key]

    def _replay(self) -> tuple[set, list[int]]:
        *earlier, last = self.history
        consumed: set = set()
        last_epoch = [-1] * len(self.sources)
        if earlier:
            before, last_epoch = self.replica(1, 0, 1, 0, earlier)._ledger()
            consumed |= before
            last_epoch = list(last_epoch)
        world, workers, micro = int(last["world"]), max(1, int(last["workers"])), int(last["micro"])
        for rank in range(world):
            old = self.replica(micro, rank, world, workers, earlier)
            for worker in range(workers):
                pulled = len(range(worker, int(last["micro_batches"]), workers))  # DataLoader round-robin
                for ids, _, _ in itertools.islice(old._batches(Slot(rank, world, worker, workers)), pulled):
                    consumed.update(ids)
                    for epoch, url, _ in ids:
                        k = self._source_of[url]
                        last_epoch[k] = max(last_epoch[k], epoch)
        return consumed, last_epoch

    def _batches(self, slot: Slot) -> Iterator[tuple[list[tuple], list, int]]:
        """(idents, items, batch index) of this slot's batches; ``self.slot_stats`` is the slot's
        state after the batch last yielded."""
        saved = self._resume.get(slot.index)
        n = len(self.sources)
        if saved is not None:
            cursors = [dict(c) for c in saved["cursors"]]
            batch, by_source = int(saved["batches"]), [int(saved["by_source"].get(s.name, 0)) for s in self.sources]
            self.samples_read = int(saved["read"])
            self.skips.counts = Counter(saved["skipped"])
            streams = [self._source_items(k, slot, cursors[k]) for k in range(n)]
        else:
            cursors, batch, by_source = [_fresh_cursor() for _ in range(n)], 0, [0] * n
            ledger = self._ledger() if self.history else None
            for c in cursors if ledger is not None else ():
                c["remainder"] = True  # now, not when first drawn from: a source may wait several batches
            streams = [self._source_items(k, slot, cursors[k]) if ledger is None
                       else self._with_remainder(k, slot, cursors[k], ledger) for k in range(n)]
        bounds = list(itertools.accumulate(s.weight for s in self.sources))
        self._decoded = [0] * n  # items of each source that decoded (the late-decoding streams' epoch check)
        while True:
            draw = random.Random(_seed(self.seed, "mix", slot.index, batch)).random if n > 1 else None
            ids, items, taken = [], [], []
            while len(items) < self.batch_size:
                k = 0 if draw is None else min(bisect.bisect_right(bounds, draw() * bounds[-1]), n - 1)
                ident, item = next(streams[k])
                if not self.DECODE_EARLY:
                    item = self.decode(item)
                    if item is None:
                        continue
                    self.samples_read += 1
                    self._decoded[k] += 1
                ids.append(ident)
                items.append(item)
                taken.append(k)
            for k in taken:
                by_source[k] += 1
            self.slot_stats = {"slot": slot.index, "read": self.samples_read, "skipped": dict(self.skips.counts),
                               "batches": batch + 1, "by_source": dict(zip(self.source_names, by_source)),
                               "cursors": [dict(c) for c in cursors]}
            yield ids, items, batch
            batch += 1

    def _trace_id(self, ident: tuple) -> str:
        epoch, url, key = ident
        name = Path(url).name if url else "?"
        if len(self.sources) > 1:
            name = f"{self.sources[self._source_of[url]].name}/{name}"
        return f"{epoch}:{name}:{key}"

    def __iter__(self) -> Iterator[dict]:
        slot = self._slot()
        for ids, items, batch in self._batches(slot):
            out = self.collate(items, self.slot_state(slot, batch))
            # The slot's state and counters travel with the batch: DataLoader workers are other processes.
            out["_stats"] = self.slot_stats
            if self.trace:
                out["_ids"] = [self._trace_id(i) for i in ids]
            yield out


class TextTrainStream(EpochStream):
    """Endless batches of ``{"input_ids", "labels"}`` (long, batch x seq_len) for one rank;
    token windows are checked (dtype, length, id range) and a bad one is skipped and counted."""

    DECODE_EARLY = True

    def __init__(self, data: TextShards, split: str, batch_size: int, rank: int = 0, world_size: int = 1, **options):
        super().__init__(data, split, batch_size, rank, world_size, **options)
        self.seq_len, self.vocab_size = data.seq_len, data.vocab_size

    def decode(self, sample: dict) -> np.ndarray | None:
        return checked_window(sample, self.skips, self.seq_len, self.vocab_size, getattr(self.data, "chat", False))

    def collate(self, items: list, state) -> dict:
        return _collate(items)

    def replica(self, batch_size, rank, world_size, num_workers, history) -> "TextTrainStream":
        return TextTrainStream(self.data, self.split, batch_size, rank, world_size, seed=self.seed,
                               shuffle_buffer=self.buffer, num_workers=num_workers, history=history,
                               sources=self.sources)


class TrainStream:
    """One rank's endless training batches, and where in them it is (an iterator with
    ``state_dict`` / ``load_state_dict``, the shape of torchdata's StatefulDataLoader).

    It runs an `EpochStream` in this process or in DataLoader workers and counts the batches it
    hands out. ``state_dict()`` is the whole position, a small dict of plain values:

        world, workers, micro   the layout it is read with (ranks, DataLoader workers, batch size)
        micro_batches           batches handed out in this layout
        data_history            earlier segments of the run that used other layouts
        sources                 the names of the sources mixed
        slots                   per slot (rank x worker) the state its last batch handed out carried:
                                a cursor per source, batches, samples read, skipped, taken per source

    ``load_state_dict(state)``, before the first batch, continues exactly where ``state`` was.
    In the same layout each slot starts from its cursors (O(1) in the length of the run; see
    `EpochStream`) and the DataLoader's round-robin is rotated to start at the worker whose turn
    it was. States without cursors (older checkpoints, or a position inside the remainder after a
    change of layout) are replayed batch by batch. In any other layout (another world size,
    micro_batch_size or data.num_workers) the saved segment is closed and the unconsumed samples
    of the epochs it touched are re-divided among the new slots, so that within an epoch no sample
    is lost or repeated. Every rank may be given the same state (any rank's, as all ranks pull the
    same number of batches) when the world size changes.

    It also keeps the latest counters of each slot it reads (``counts()``, ``samples_by_source()``):
    DataLoader workers are other processes, so the counters travel inside the batches as ``_stats``.
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
                "data_history": [dict(h) for h in self.dataset.history], "sources": self.dataset.source_names,
                "slots": {str(i): s for i, s in sorted(self.slot_stats.items())}}

    def load_state_dict(self, state: dict) -> None:
        if self._it is not None:
            raise RuntimeError("TrainStream.load_state_dict: the stream has already started")
        saved = {k: int(state[k]) for k in ("world", "workers", "micro")}
        names = state.get("sources")
        if names is not None and list(names) != self.dataset.source_names:
            raise ValueError(f"the data sources changed: the checkpoint read {list(names)}, this run reads "
                             f"{self.dataset.source_names}; keep data.sources' names and order to resume")
        history = [dict(h) for h in state.get("data_history", [])]
        pulled = int(state["micro_batches"])
        if _same_layout(saved, self.layout()):
            self.dataset.set_history(history)
            slots = {int(k): v for k, v in (state.get("slots") or {}).items()}
            if pulled and slots and all(_resumable(s) for s in slots.values()):
                self.dataset.resume_from(slots, rotation=pulled % max(1, self.num_workers))
                self.micro_batches, self.slot_stats = pulled, dict(slots)
            else:
                for _ in range(pulled):  # replay the deterministic stream to the position
                    next(self)
        else:
            self.dataset.set_history([*history, {**saved, "micro_batches": pulled}])
            self.micro_batches = 0

    def counts(self) -> tuple[int, dict[str, int]]:
        """(samples read, skipped samples by reason) of this rank, over its slots."""
        read, skipped = 0, Counter()
        for stats in self.slot_stats.values():
            read += stats["read"]
            skipped.update(stats["skipped"])
        return read, dict(skipped)

    def samples_by_source(self) -> dict[str, int]:
        """Samples this rank consumed from each source so far (in the batches handed out)."""
        total: Counter[str] = Counter()
        for stats in self.slot_stats.values():
            total.update(stats.get("by_source", {}))
        return {name: total.get(name, 0) for name in self.dataset.source_names}

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


def _resumable(slot_state: dict) -> bool:
    cursors = slot_state.get("cursors")
    return cursors is not None and not any(c.get("remainder") for c in cursors)


def _same_layout(a: dict[str, int], b: dict[str, int]) -> bool:
    """One DataLoader worker reads what the rank itself would: workers 0 and 1 are the same layout."""
    return (a["world"], max(1, a["workers"]), a["micro"]) == (b["world"], max(1, b["workers"]), b["micro"])


def train_loader(data: TextShards, split: str, batch_size: int, rank: int, world_size: int, *, seed: int,
                 shuffle_buffer: int = 1000, resampled: bool = False, num_workers: int = 0,
                 history: Sequence[dict] = (), trace: bool = False, sources: Sequence | None = None) -> TrainStream:
    """A text `TrainStream`; ``sources`` (a list of (name, shard urls, counts, weight) or
    `StreamSource`s) mixes several corpora instead of reading ``split`` of ``data``."""
    ds = TextTrainStream(data, split, batch_size, rank, world_size, seed=seed, shuffle_buffer=shuffle_buffer,
                         resampled=resampled, num_workers=num_workers, history=history, trace=trace, sources=sources)
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
    samples = read_checked(data.shards(split), skips, data.shard_samples(split), data.keep(split),
                           getattr(data, "fetch", None))
    windows = checked_windows(samples, skips, data.seq_len, data.vocab_size, data.chat)
    share: EvalShare[np.ndarray, np.ndarray] = EvalShare(data.num_samples(split), max_samples, rank, world_size,
                                                         batch_size)
    for rows, template in itertools.chain(share.read(windows, lambda i, window, mine: window), share.rest()):
        batch = _collate([template if window is None else window for window in rows])
        batch["weight"] = torch.tensor([0.0 if window is None else 1.0 for window in rows])
        yield batch
