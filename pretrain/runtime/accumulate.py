"""How one optimizer step runs its micro-batches (the `Trainer`'s step machinery, a mixin): the
step's items counted once, each micro-batch's share of the step's loss, non-finite losses caught
before their backward (one host read per micro-batch under ZeRO-0, one per step under ZeRO-1/2/3)
and non-finite gradients counted or stopped at. The trainer provides ``engine``, ``family``,
``layout``, ``gas``, ``device``, ``step_loss``, ``stream``, ``state``, ``recipe``, ``hooks`` and the
host-side counters."""

from __future__ import annotations

import hashlib

import torch

from pretrain.runtime.state import TrainingStopped, count_skip


def batch_digest(batches: list[dict[str, torch.Tensor]]) -> int:
    """A 56-bit hash of a step's micro-batches (every tensor's bytes, in key order): equal on two
    ranks only if they hold the same batches."""
    h = hashlib.blake2b(digest_size=7)
    for batch in batches:
        for key in sorted(batch):
            t = batch[key].detach().contiguous().cpu()
            h.update(key.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return int.from_bytes(h.digest(), "little")


def diverged_replicas(rows: list[tuple[int, int, int]]) -> dict[int, dict[int, list[int]]]:
    """From (rank, data-parallel rank, batch digest) of every rank: for each model replica whose
    ranks hold different batches, its ranks grouped by digest (empty when every group agrees)."""
    replicas: dict[int, dict[int, list[int]]] = {}
    for rank, replica, digest in rows:
        replicas.setdefault(replica, {}).setdefault(digest, []).append(rank)
    return {r: groups for r, groups in sorted(replicas.items()) if len(groups) > 1}


class Accumulation:
    def _step_items(self, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the step's loss items over every micro-batch and model replica, each micro-batch's own):
        trained tokens for a language model, samples for CLIP. Stays on the device (an all-reduce
        over the data-parallel group, no host read)."""
        import torch.distributed as dist

        mine = [self.family.loss_items(b).to(torch.float64) for b in batches]
        total = torch.stack(mine).sum().reshape(1)
        if self.layout.dp > 1:
            dist.all_reduce(total, group=self._dp_group())
        return total, mine

    def _loss(
        self, step: int, micro: int, batch: dict[str, torch.Tensor], items: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(what micro-batch ``micro`` back-propagates, its share of the step's loss sum, not yet
        read back to the host). The step's objective is the sum of item losses over all its
        micro-batches and replicas divided by the step's items, whatever the (micro, gas, world)
        split; DeepSpeed divides by gas and averages over the replicas, so each micro-batch's sum is
        scaled by gas x DP / items. A micro-batch without items (a chat window whose assistant turn
        was cut) adds nothing and dilutes nothing."""
        scale = (self.gas * self.layout.dp) / items.clamp(min=1)
        summed = self.step_loss(self.engine, micro, batch)
        loss = self.hooks.on_loss(step, micro, self.rank, summed * scale.to(summed.dtype).reshape(()))
        return loss, loss.detach().double().reshape(1) / scale  # NaN injected by a hook stays NaN

    def _read_sums(self, device_values: list[torch.Tensor]) -> list[float]:
        """The step's one host read: the device values, then [stop requests, samples read, samples
        skipped] from the host, each summed over ranks in one all-reduce."""
        import torch.distributed as dist

        read, skipped = self._data_counts()
        host = torch.tensor([float(self._signal is not None), read, sum(skipped.values())], dtype=torch.float64)
        sums = torch.cat([*device_values, host.to(self.device)])
        dist.all_reduce(sums)
        return sums.tolist()

    def _over_limit(self, local: torch.Tensor) -> torch.Tensor:
        """1 where this rank's loss so far in the step (``local``: [loss sum, items], on the device)
        is above the loss-spike limit of a ``skip`` action, else 0; stays on the device."""
        if self._spike_limit is None:
            return torch.zeros(1, dtype=torch.float64, device=local.device)
        mean = local[0:1] / local[1:2].clamp(min=1)
        return (mean > self._spike_limit).double()

    def _forward_finite(
        self,
        step: int,
        micro: int,
        batch: dict[str, torch.Tensor],
        items: torch.Tensor,
        mine: torch.Tensor,
        local: torch.Tensor,
    ) -> tuple[torch.Tensor, list[float]]:
        """The loss of micro-batch ``micro``, or of the next one whose loss is finite on every rank
        (the others are dropped by all ranks), and the sums over ranks of [loss sum, items, ranks
        over the loss-spike limit, stop requests, samples read, samples skipped]. One host read per
        micro-batch: the finiteness of the loss must be known before its backward, so its flag
        travels with the loss value and the counters in one all-reduce, and nothing else in the step
        waits for the device. ``local`` ([loss sum, items] of this rank's step so far) gains the
        accepted micro-batch's."""
        while True:
            loss, share = self._loss(step, micro, batch, items)
            finite = torch.isfinite(share)
            part = torch.cat([torch.where(finite, share, torch.zeros_like(share)), mine.reshape(1)])
            bad_ranks, *totals = self._read_sums(
                [(~finite).double(), part, self._over_limit(local + part) if micro == self.gas - 1 else part[:0]]
            )
            if micro != self.gas - 1:
                totals.insert(2, 0.0)
            if bad_ranks == 0:
                local += part
                return loss, totals
            where = (
                f"non-finite loss at step {step}, micro-batch {self.stream.micro_batches} "
                f"of the stream, on {int(bad_ranks)} rank(s)"
            )
            if not self._weights_finite():
                raise TrainingStopped(
                    f"{where}: the weights themselves are non-finite (an earlier update was applied "
                    f"with non-finite gradients, after step {self.state.step} at the latest); resume "
                    "from the last checkpoint (--resume auto) after finding the cause"
                )
            tr = self.recipe.training
            self.state.nonfinite_skips = count_skip(
                self.state.nonfinite_skips, tr.on_nonfinite, tr.max_nonfinite_skips, where
            )
            if self.is_main:
                print(f"warning: {where}; skipped ({self.state.nonfinite_skips} so far)", flush=True)
            batch = self._next_batch(step)
            if self.gas == 1:  # the step is this one micro-batch: its items are the replacement's
                items, (mine,) = self._step_items([batch])
            else:
                # earlier micro-batches are back-propagated already, divided by the items of the batches
                # drawn for the step; the replacement keeps that divisor (ZeRO-0 with accumulation only)
                mine = self.family.loss_items(batch).to(torch.float64)

    def _accumulate_checked_each(self) -> tuple[float, float, list[float], int]:
        """``gas`` micro-batches, each checked before its backward (a non-finite one is replaced by
        the next): one host read per micro-batch. Used where nothing else would stop a non-finite
        gradient from being applied (ZeRO-0), and at gas 1, where it is the step's only read anyway."""
        step = self.state.step + 1
        batches = [self._next_batch(step) for _ in range(self.gas)]
        self._check_replica_batches(step, batches)
        items, mine = self._step_items(batches)
        self.step_loss.begin(self.engine, batches)
        total = count = 0.0
        self._local_loss = torch.zeros(2, dtype=torch.float64, device=self.device)
        for micro in range(self.gas):
            loss, (loss_sum, micro_items, over, *counters) = self._forward_finite(
                step, micro, batches[micro], items, mine[micro], self._local_loss
            )
            if over:  # a loss spike with action skip: a NaN gradient makes the optimizer refuse the update
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            total += loss_sum
            count += micro_items
        return total, count, counters, 0, int(over)

    def _accumulate_checked_once(self) -> tuple[float, float, list[float], int]:
        """``gas`` micro-batches with one host read per optimizer step (on a GPU a read per
        micro-batch would stall the host until the device drains, ``gas`` times a step). The losses'
        finiteness is summed on the device; before the last backward every rank learns, through a
        device-side all-reduce, whether any micro-batch of the step was non-finite anywhere, and if
        so multiplies its last loss by NaN. Every rank's gradient is then non-finite, so the ZeRO
        optimizer (which checks the gradient norm) refuses the update on every rank, whatever its
        process groups: the step is skipped whole, weights, moments and LR schedule untouched.
        Returns the loss sum over finite micro-batches and ranks, their items, the counters, and how
        many micro-batch losses were non-finite (summed over ranks)."""
        import torch.distributed as dist

        step = self.state.step + 1
        batches = [self._next_batch(step) for _ in range(self.gas)]
        self._check_replica_batches(step, batches)
        items, mine = self._step_items(batches)
        self.step_loss.begin(self.engine, batches)
        bad = torch.zeros(1, dtype=torch.float64, device=self.device)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        self._local_loss = local = torch.zeros(2, dtype=torch.float64, device=self.device)
        over = torch.zeros(1, dtype=torch.float64, device=self.device)
        for micro in range(self.gas):
            loss, share = self._loss(step, micro, batches[micro], items)
            finite = torch.isfinite(share)
            bad += (~finite).double()
            part = torch.where(finite, share, torch.zeros_like(share))
            loss_sum += part
            local += torch.cat([part, mine[micro].reshape(1)])
            if micro == self.gas - 1:
                over = self._over_limit(local)  # a loss spike with action skip poisons the step like a NaN
                anywhere = bad + over
                dist.all_reduce(anywhere)  # stays on the device: nothing here waits for it
                poison = torch.where(anywhere > 0, torch.full_like(anywhere, float("nan")), torch.ones_like(anywhere))
                loss = loss * poison.to(loss.dtype).reshape(())
            self.engine.backward(loss)
            self.engine.step()
        bad_total, over_total, total, count, *counters = self._read_sums(
            [bad, over, loss_sum, torch.stack(mine).sum().reshape(1)]
        )
        return total, count, counters, int(bad_total), int(over_total)

    def _weights_finite(self) -> bool:
        """Whether every rank's weights (its ZeRO-3 partition, or the whole model) are finite."""
        finite = True
        for p in self.engine.module.parameters():
            data = getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else p.data
            if data.numel() and not bool(torch.isfinite(data).all()):
                finite = False
                break
        return self._sum_over_ranks([0.0 if finite else 1.0])[0] == 0

    def _nonfinite_gradient(
        self, refused: bool, where: str | None = None, applied: str = "the optimizer applied it"
    ) -> None:
        """A step with a non-finite gradient (norm), or with non-finite losses that
        ``_accumulate_checked_once`` turned into one. Where DeepSpeed's optimizer checks the norm
        (ZeRO-1/2/3 in fp32, bf16 and fp16) it refused the step and the weights are intact: that
        counts as a skipped step under on_nonfinite=skip. Elsewhere the update has been applied
        and the run stops."""
        last = self.stream.micro_batches
        where = where or f"non-finite gradient norm at step {self.state.step}"
        where += f" (micro-batches {last - self.gas + 1}..{last} of the stream)"
        if not refused:
            raise TrainingStopped(
                f"{where}: {applied}, so the weights are no longer usable; resume from "
                "the last checkpoint (--resume auto) after finding the cause"
            )
        tr = self.recipe.training
        self.state.nonfinite_skips = count_skip(
            self.state.nonfinite_skips,
            tr.on_nonfinite,
            tr.max_nonfinite_skips,
            f"{where}; the optimizer skipped the step",
            "non-finite losses or gradients",
        )
        if self.is_main:
            print(
                f"warning: {where}; the optimizer skipped the step ({self.state.nonfinite_skips} skips so far)",
                flush=True,
            )

    def _check_replica_batches(self, step: int, batches: list[dict[str, torch.Tensor]]) -> None:
        """The ranks of one tensor- or sequence-parallel group read their batch each on its own and
        must hold the same one: compared by digest across the world at the first step this process
        trains and every ``training.check_batches_every`` steps (one all-gather of three numbers a
        rank). A mismatch stops the run naming the ranks, the step and the data."""
        import torch.distributed as dist

        every = self.recipe.training.check_batches_every
        if self.layout.model_parallel == 1 or not (step == self._first_step or (every and step % every == 0)):
            return
        mine = torch.tensor([self.rank, self.layout.dp_rank, batch_digest(batches)], dtype=torch.int64)
        rows = [torch.zeros_like(mine).to(self.device) for _ in range(self.world)]
        dist.all_gather(rows, mine.to(self.device))
        diverged = diverged_replicas([tuple(int(v) for v in r.tolist()) for r in rows])
        if diverged:
            replica, groups = next(iter(diverged.items()))
            held = "; ".join(f"ranks {', '.join(map(str, ranks))} hold one" for ranks in groups.values())
            sources = ", ".join(self.stream.samples_by_source()) or str(self.recipe.data.path)
            raise TrainingStopped(
                f"the ranks of model replica {replica} (one tensor/sequence-parallel group) hold different batches "
                f"at step {step} (micro-batches up to {self.stream.micro_batches} of the stream from {sources}): "
                f"{held}. Every rank of a group must read the same data: check that --data and the shards are the "
                "same on every node, and that the data did not change under a running job"
            )
