"""One rank's share of an evaluation split, for the text and the image-text eval loaders.

Evaluation reads the split's first n samples once, in order, sample i on rank i % world_size.
Under ZeRO-3 every forward pass is a collective, so every rank must run the same number of
batches: each yields ceil(n / world_size) rows, the short ranks topped up with padding. A
padding row, like a sample that could not be used, carries weight 0; it is filled from a
template, the first usable sample of the split on any rank, so that it is an ordinary input
(a blank one could give NaN, and NaN x 0 is still NaN).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

Sample = TypeVar("Sample")
Row = TypeVar("Row")


class EvalShare(Generic[Sample, Row]):
    """Batches of one rank's rows, as ``(rows, template)``: a row of None is a weight-0 row that
    the caller fills from ``template``.

    ``read`` yields the full batches while reading, so only a batch of rows is held; ``rest``
    yields the last rows and the padding. A caller can report what reading found in between.
    """

    def __init__(self, total: int | None, max_samples: int | None, rank: int, world_size: int, batch_size: int):
        # total None: a split whose size is known only by reading it (keys held out of raw shards).
        self.n = max_samples if total is None else total if max_samples is None else min(total, max_samples)
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
        for i, sample in enumerate(itertools.islice(samples, self.n)):
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

    def rest(self) -> Iterator[tuple[list[Row | None], Row]]:
        """The remaining rows, padded to ``rows_per_rank``; nothing when no sample was usable,
        as there is nothing to pad with (the caller decides whether that is an error)."""
        if self.template is None:
            return
        # Pad to what was read, not to what was promised: a split that ends early (a held-out
        # fraction, truncated shards) ends early on every rank alike.
        rows_per_rank = -(-self.seen // self.world_size)
        self._rows += [None] * (rows_per_rank - self._yielded - len(self._rows))
        yield from self._batches(full_only=False)

    def _batches(self, full_only: bool) -> Iterator[tuple[list[Row | None], Row]]:
        assert self.template is not None
        while len(self._rows) >= self.batch_size or (self._rows and not full_only):
            batch, self._rows = self._rows[: self.batch_size], self._rows[self.batch_size :]
            self._yielded += len(batch)
            yield batch, self.template
