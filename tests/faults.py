"""Faults and probes for tests, passed into a real run as `TrainerHooks` (never by the command line).

    python tests/faults.py [--nan-loss-at 3] [--nan-grad-at 3] [--stall-in-save 12] [--trace-samples DIR] \
        [--disk-full-at 4[:RANK]] [--slow-write RANK:SECONDS] -- <pretrain/train.py arguments>

runs `pretrain.train.main` with a `FaultPlan`; the deepspeed launcher and torchrun start it like
`pretrain/train.py`. Steps are 1-based optimizer steps; faults hit rank 0, once.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # started as a script by a launcher
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from pretrain.runtime.hooks import TrainerHooks  # noqa: E402


class NanGradient(torch.autograd.Function):
    """The identity forward, NaN gradients backward: a finite loss with a broken backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class FaultPlan(TrainerHooks):
    def __init__(
        self,
        nan_loss_at=(),
        nan_grad_at=(),
        stall_in_save: int | None = None,
        trace_dir: str | Path | None = None,
        disk_full_at: tuple[int, int | None] | None = None,
        slow_write: tuple[int, float] | None = None,
        kill_at: int | None = None,
    ):
        self.nan_loss_at, self.nan_grad_at = set(nan_loss_at), set(nan_grad_at)
        self.stall_in_save = stall_in_save
        self.trace_dir = Path(trace_dir) if trace_dir else None
        self.sample_ids = self.trace_dir is not None
        self._trace = None
        self.losses_seen: list[tuple[int, int]] = []
        self.disk_full_at = disk_full_at  # (step, rank or None for every rank): its checkpoint's writes fail
        self.slow_write = slow_write  # (rank, seconds): that rank's writer sleeps before each checkpoint file
        self.kill_at = kill_at  # step at whose first micro-batch every process of the run kills itself

    def on_batch(self, step, rank, ids):
        if step == self.kill_at:  # kill -9 of this process as its step begins: no handler, no flush
            os.kill(os.getpid(), signal.SIGKILL)
        if self.trace_dir is None or ids is None:
            return
        if self._trace is None:
            self._trace = open(self.trace_dir / f"trace-rank{rank}.txt", "a")
        self._trace.write(f"{step}\t{' '.join(ids)}\n")
        self._trace.flush()

    def on_loss(self, step, micro, rank, loss):
        self.losses_seen.append((step, micro))
        if rank != 0:
            return loss
        if step in self.nan_loss_at:
            self.nan_loss_at.discard(step)  # one poisoned micro-batch
            return loss * float("nan")
        if step in self.nan_grad_at and micro == 0:
            self.nan_grad_at.discard(step)
            return NanGradient.apply(loss)
        return loss

    def in_save(self, step, rank, tag_dir):
        if step == self.stall_in_save:
            # Hold every rank inside the save (files written, not sealed) for a kill -9.
            (tag_dir.parent.parent / f"stalled-in-save-rank{rank}").write_text(str(step))
            time.sleep(3600)

    def before_write(self, step, rank, path):
        if self.slow_write is not None and rank == self.slow_write[0]:
            # what `latest` named when this rank had not yet written this file: never the tag being written
            latest = path.parent.parent / "latest"
            named = latest.read_text().strip() if latest.is_file() else ""
            with open(path.parent.parent.parent / f"slow-write-rank{rank}.txt", "a") as f:
                f.write(f"{path.parent.name}\t{path.name}\t{named}\n")
            time.sleep(self.slow_write[1])
        if self.disk_full_at is not None and step == self.disk_full_at[0] and self.disk_full_at[1] in (None, rank):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def close(self):
        if self._trace is not None:
            self._trace.close()


def _steps(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="tests/faults.py")
    p.add_argument("--nan-loss-at", type=_steps, default=[], help="steps whose first micro-batch loss is NaN (rank 0)")
    p.add_argument("--nan-grad-at", type=_steps, default=[], help="steps with a finite loss and NaN gradients (rank 0)")
    p.add_argument("--stall-in-save", type=int, help="every rank sleeps inside this step's save, before the seal")
    p.add_argument("--trace-samples", help="directory for trace-rank<r>.txt: step, then the ids of its samples")
    p.add_argument("--disk-full-at", help="STEP[:RANK]: that step's checkpoint writes fail with ENOSPC (every rank)")
    p.add_argument("--slow-write", help="RANK:SECONDS: that rank's checkpoint writer sleeps before each file")
    p.add_argument("--kill-at", type=int, help="every process kills itself (SIGKILL) as this step begins")
    p.add_argument("--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher; passed on")
    args = p.parse_args(argv[:split])
    disk_full = slow = None
    if args.disk_full_at:
        step, _, rank = args.disk_full_at.partition(":")
        disk_full = (int(step), int(rank) if rank else None)
    if args.slow_write:
        rank, _, seconds = args.slow_write.partition(":")
        slow = (int(rank), float(seconds))
    plan = FaultPlan(
        args.nan_loss_at, args.nan_grad_at, args.stall_in_save, args.trace_samples, disk_full, slow, args.kill_at
    )
    from pretrain.train import main as train_main

    return train_main(argv[split + 1 :], hooks=plan)


if __name__ == "__main__":
    sys.exit(main())
