"""One rank's share of an evaluation split, for the text and the image-text eval loaders.

Evaluation reads the split once, in order, sample i on rank i % world_size. With ``max_samples``
below the split's size it scores a fixed, seeded subset spread over the whole split
(`subset_indices`), not its first samples: a split stored class by class or source by source
would otherwise be scored on its first classes or first source only. (Where the size is known
only by reading, a held-out fraction of raw shards, the first ``max_samples`` are taken: those
are chosen by a hash of their content already.)
Under ZeRO-3 every forward pass is a collective, so every rank must run the same number of
batches: each yields ceil(n / world_size) rows, the short ranks topped up with padding. A
padding row, like a sample that could not be used, carries weight 0; it is filled from a
template, the first usable sample of the split on any rank, so that it is an ordinary input
(a blank one could give NaN, and NaN x 0 is still NaN).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

Sample = TypeVar("Sample")
Row = TypeVar("Row")
T = TypeVar("T")


SUBSET_SEED = "eval-subset"  # fixed: every evaluation of a run, and pretrain-eval, scores the same subset


def subset_indices(total: int, max_samples: int | None) -> list[int] | None:
    """The positions (ascending) of the ``max_samples`` of ``total`` samples an evaluation scores:
    one drawn with a fixed seed from each of ``max_samples`` equal stretches of the split, so every
    run of ``total / max_samples`` consecutive samples (a class, a source) is represented; None when
    it scores them all."""
    if max_samples is None or max_samples >= total:
        return None
    rng = random.Random(f"{SUBSET_SEED}/{total}")
    bounds = [k * total // max_samples for k in range(max_samples + 1)]
    return [rng.randrange(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def eval_subset(items: Sequence[T], max_samples: int | None) -> list[T]:
    """The items an evaluation with ``max_samples`` scores (`subset_indices`), in their order."""
    chosen = subset_indices(len(items), max_samples)
    return list(items) if chosen is None else [items[i] for i in chosen]


class EvalShare(Generic[Sample, Row]):
    """Batches of one rank's rows, as ``(rows, template)``: a row of None is a weight-0 row that
    the caller fills from ``template``.

    ``read`` yields the full batches while reading, so only a batch of rows is held; ``rest``
    yields the last rows and the padding. A caller can report what reading found in between.
    """

    def __init__(self, total: int | None, max_samples: int | None, rank: int, world_size: int, batch_size: int):
        # total None: a split whose size is known only by reading it (keys held out of raw shards).
        self.n = max_samples if total is None else total if max_samples is None else min(total, max_samples)
        self.chosen = None if total is None else subset_indices(total, max_samples)
        self.total = total
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seen = 0  # samples read; every rank reads every sample, so all agree on it
        self.template: Row | None = None
        self._rows: list[Row | None] = []
        self._yielded = 0

    def read(
        self, samples: Iterable[Sample], row: Callable[[int, Sample, bool], Row | None]
    ) -> Iterator[tuple[list[Row | None], Row]]:
        """``row(i, sample, mine)`` turns sample i into a row, or None when it cannot be used;
        another rank's samples are only turned into rows until there is a template."""
        for i, sample in enumerate(itertools.islice(self._chosen(samples), self.n)):
            self.seen = i + 1
            mine = i % self.world_size == self.rank
            if not mine and self.template is not None:
                continue
            item = row(i, sample, mine)
            if self.template is None:
                self.template = item
            if mine:
                self._rows.append(item)
            if self.template is not None:
                yield from self._batches(full_only=True)

    def _chosen(self, samples: Iterable[Sample]) -> Iterator[Sample]:
        """The samples of the subset (all of them without one); reading stops at the last."""
        if self.chosen is None:
            yield from samples
            return
        wanted = iter(self.chosen)
        want = next(wanted)
        for position, sample in enumerate(samples):
            if position == want:
                yield sample
                want = next(wanted, None)
                if want is None:
                    return

    def rest(self) -> Iterator[tuple[list[Row | None], Row]]:
        """The remaining rows, padded to ``rows_per_rank``; nothing when no sample was usable,
        as there is nothing to pad with (the caller decides whether that is an error)."""
        if self.template is None:
            return
        # Pad to what was promised where the split's size is known: a shard that one rank could not
        # fetch must not give it fewer batches than the others (ZeRO-3's forwards and CLIP's gather
        # are collective). Where it is known only by reading, to what was read (ranks read alike,
        # and `check_batch_counts` catches a rank that did not).
        rows_per_rank = -(-(self.seen if self.total is None else max(self.n, self.seen)) // self.world_size)
        self._rows += [None] * (rows_per_rank - self._yielded - len(self._rows))
        yield from self._batches(full_only=False)

    def _batches(self, full_only: bool) -> Iterator[tuple[list[Row | None], Row]]:
        assert self.template is not None
        while len(self._rows) >= self.batch_size or (self._rows and not full_only):
            batch, self._rows = self._rows[: self.batch_size], self._rows[self.batch_size :]
            self._yielded += len(batch)
            yield batch, self.template


def check_batch_counts(batches: int, where: str, group=None) -> None:
    """After an evaluation on several ranks: every rank must have run as many batches (a rank that
    ran fewer counted samples twice or never). Collective over ``group``; raises naming both counts."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor([batches, -batches], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    most, fewest = int(t[0]), -int(t[1])
    if most != fewest:
        raise RuntimeError(
            f"{where}: the ranks ran {fewest} to {most} evaluation batches (a shard read on some ranks and not "
            "others, or data that changed during the evaluation): the result would count samples twice or never"
        )
