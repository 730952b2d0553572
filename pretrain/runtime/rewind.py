"""Skipping data and rewinding past loss spikes (the `Trainer`'s part for weeks-long runs, a mixin).

Skipped steps keep their numbers. The batches of a skipped step are read from the stream and
dropped; the step counter and the LR schedule move past the step as if it had been trained, with
no update (Megatron's ``--skip-train-iteration-range``). So a rewind from a spike at step S to the
checkpoint of step C < S continues with step S + 1, on the data after what steps C + 1 .. S read,
exactly as a run given ``skip_steps: [[C + 1, S]]`` from the start would: same weights, same
schedule, same later data.

What a skip consumed is recorded as a range of the data stream's position (`TrainStream.skips`,
saved with every checkpoint) and, for rewinds, in the run's ledger (`pretrain.runtime.spikes`),
which a resume merges in: a kill -9 between a rewind and the next checkpoint resumes from the older
checkpoint and skips the same data again at the same step, instead of meeting the spike twice.

The trainer provides ``recipe``, ``engine``, ``stream``, ``state``, ``ckpt``, ``metrics``,
``gas``, ``global_batch``, ``world``, ``rank``, ``is_main``, ``run_dir`` and ``_local_loss``.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.runtime.checkpoint import load_rank_state
from pretrain.runtime.metrics import rewind as rewind_metrics
from pretrain.runtime.spikes import SPIKES_EXIT, SkipLedger, SpikeDetector
from pretrain.runtime.state import RunState, TrainingStopped


class SpikesStopped(TrainingStopped):
    """More loss spikes than training.loss_spike.max_rewinds allows."""

    exit_code = SPIKES_EXIT


class DataSkips:
    def _setup_skips(self, resumed: bool) -> None:
        """The ledger and the spike detector, once the run state and the stream are restored."""
        self.ledger = SkipLedger(self.run_dir, write=self.is_main)
        if not hasattr(self.stream, "pending_skip"):  # a stream without a position to skip in (a labelled folder)
            self.ledger.ranges = []
        elif resumed:
            self.stream.add_skips(self.ledger.ranges)
        else:
            self.ledger.reset()
        cfg = self.recipe.training.loss_spike
        self.spikes = None
        if cfg:
            # a rank's loss is over its micro x accumulation items, and the step is judged by its loudest rank: the
            # spread of that maximum depends on the layout, so a window judged on another layout starts afresh
            layout = [self.world, self.micro, self.gas]
            same = self.state.spike_layout == layout
            window, seen = (self.state.loss_window, self.state.spike_seen) if same else ([], 0)
            self.spikes = SpikeDetector(cfg, window, seen)
            self.state.spike_layout = layout

    # ------------------------------------------------------------------ skipping
    def _skip_due(self, step: int) -> tuple[int, int, str, dict | None] | None:
        """What to skip before training ``step``: (steps, micro-batches, why, recorded range or None)."""
        for first, last in self.recipe.training.skip_steps:
            if first == step:
                n = last - first + 1
                return n, n * self.gas, f"skip_steps {first}:{last}", None
        if not hasattr(self.stream, "pending_skip"):
            return None
        r = self.stream.pending_skip(step)
        if r is not None:
            return int(r["steps"]), int(r["last"]) - int(r["first"]) + 1, str(r.get("why", "ledger")), r
        for r in self.stream.skips:
            # a range ahead of a checkpoint resumed on another layout: its data was left out of the
            # re-divided epoch when the segment closed; the steps still move past it, at the same step
            if int(r["segment"]) < self.stream.segment and int(r.get("at_step", -1)) == step:
                return int(r["steps"]), 0, str(r.get("why", "ledger")), r
        return None

    def _skip_ahead(self, step: int) -> bool:
        """Skip the data due at ``step`` (a skip_steps range, or a range the ledger recorded); True
        if the step counter moved past it."""
        due = self._skip_due(step)
        if due is None:
            return False
        steps, micro_batches, why, recorded = due
        first, last = self.stream.skip(micro_batches)
        data_range = recorded or {
            "segment": self.stream.segment,
            "first": first,
            "last": last,
            "steps": steps,
            "at_step": step,
            "why": why,
        }
        self.stream.add_skips([data_range])
        self._move_past(steps, data_range)
        return True

    def _move_past(self, steps: int, data_range: dict) -> None:
        """The counters and the LR schedule step past ``steps`` skipped steps; one event in the log."""
        first_step = self.state.step + 1
        for _ in range(steps):
            if self.engine.lr_scheduler is not None:
                self.engine.lr_scheduler.step()
        self.state.step += steps
        self.state.samples_skipped += steps * self.global_batch
        self.metrics.log(
            {
                "step": self.state.step,
                "event": "skipped_data",
                "steps": [first_step, self.state.step],
                "micro_batches": [int(data_range["first"]), int(data_range["last"])],
                "segment": int(data_range["segment"]),
                "samples": steps * self.global_batch,
                "why": data_range.get("why"),
            }
        )
        if self.is_main:
            print(
                f"skipped the data of steps {first_step}..{self.state.step} ({data_range.get('why')}): micro-batches "
                f"{data_range['first']}..{data_range['last']} of each rank's stream, {steps * self.global_batch} "
                "samples",
                flush=True,
            )

    # ------------------------------------------------------------------ spikes
    def _rank_losses(self) -> list[float]:
        """Every rank's own loss of the step just trained (its loss sum over its items)."""
        import torch.distributed as dist

        local = self._local_loss
        mine = local[0:1] / local[1:2].clamp(min=1) if float(local[1]) > 0 else local[0:1] * float("nan")
        everyone = torch.zeros(2, self.world, dtype=torch.float64, device=self.device)
        finite = bool(torch.isfinite(mine).all())
        everyone[0, self.rank] = mine.reshape(()) if finite else 0.0
        everyone[1, self.rank] = 0.0 if finite else 1.0
        dist.all_reduce(everyone)  # a gather by sum: each rank fills its own column
        return [float("nan") if m else v for v, m in zip(everyone[0].tolist(), everyone[1].tolist())]

    def _lr_factor(self, step: int) -> float:
        lowered = self.ledger.lr_lowered(step)
        return lowered[0] if lowered else 1.0

    def _spike_step(self, step: int, out: dict[str, Any]) -> bool:
        """Judge the step just trained; act on a spike. True if the run rewound."""
        if self.spikes is None:
            return False
        verdict = self.spikes.judge(step, self._rank_losses())
        self.state.loss_window, self.state.spike_seen = list(self.spikes.window), self.spikes.seen
        if verdict is None:
            return False
        verdict["loss"] = out["loss"]
        if self.is_main:
            print(
                f"warning: loss spike at step {step}: rank {verdict['rank']}'s loss {verdict['loss_max']:.4f} > limit "
                f"{verdict['limit']:.4f} (window median {verdict['median']:.4f}); action {verdict['action']}",
                flush=True,
            )
        if verdict["action"] == "rewind":
            return self._rewind(step, verdict)
        if verdict["action"] == "skip":
            verdict["skipped_update"] = bool(out.get("spike_skipped"))
        self.metrics.log(verdict)
        return False

    def _rewind(self, step: int, verdict: dict) -> bool:
        """Back to the last sealed checkpoint before ``step``, past the data read since it."""
        cfg = self.recipe.training.loss_spike
        self.ckpt.flush()  # a checkpoint still being written in the background is sealed first
        target = self.ckpt.sealed_before(step)
        saved = load_rank_state(target, self.rank) if target is not None else None
        data = (saved or {}).get("data") or {}
        usable = (
            target is not None
            and len(data.get("data_history", [])) == self.stream.segment
            and {k: int(data.get(k, -1)) for k in ("world", "workers", "micro")} == self.stream.layout()
        )
        if not usable:
            verdict["rewound"] = False
            verdict["note"] = "no sealed checkpoint of this data layout before the spike: nothing to rewind to"
            self.metrics.log(verdict)
            if self.is_main:
                print(f"warning: {verdict['note']}; training goes on", flush=True)
            return False
        if len(self.ledger.rewinds) >= cfg.max_rewinds:
            raise SpikesStopped(
                f"loss spike at step {step} (rank {verdict['rank']}'s loss {verdict['loss_max']:.4f} > "
                f"{verdict['limit']:.4f}) after {len(self.ledger.rewinds)} rewinds: more than "
                f"training.loss_spike.max_rewinds={cfg.max_rewinds}; the run needs a look (its data, its LR) "
                f"before it goes on; {self.ledger.path} lists the ranges skipped so far"
            )
        last = self.stream.micro_batches
        restored = self.ckpt.reload(self.engine, target)
        self.state = RunState.from_dict(restored.run_state)
        # the reference too is the checkpoint's: the steps since it were undone (as a run given skip_steps judges)
        self.spikes = SpikeDetector(cfg, self.state.loss_window, self.state.spike_seen)
        base = self.state.step
        data_range = {
            "segment": self.stream.segment,
            "first": int(data["micro_batches"]) + 1,
            "last": last,
            "steps": step - base,
            "at_step": base + 1,
            "why": f"rewind: loss spike at step {step}",
        }
        lr_until = step + cfg.lr_steps
        record = {
            "spike_step": step,
            "checkpoint": target.name,
            "loss_max": verdict["loss_max"],
            "rank": verdict["rank"],
            "limit": verdict["limit"],
            "lr_factor": cfg.lr_factor,
            "lr_steps": cfg.lr_steps,
            "lr_until": lr_until,
        }
        self.ledger.add(data_range, record)
        self.stream.add_skips([data_range])
        # the lines the rewound steps logged go to metrics-discarded.jsonl, as on a resume
        self.metrics.close()
        discarded = rewind_metrics(self.run_dir, base) if self.is_main else 0
        self.metrics = self._metrics(None)
        self.metrics.log({**verdict, "step": base, "event": "rewind", **record, "discarded_lines": discarded})
        if self.is_main:
            print(f"rewound to {target.name} (step {base}) after the loss spike at step {step}", flush=True)
        self._move_past(step - base, data_range)
        if cfg.lr_steps and cfg.lr_factor != 1.0:
            self.metrics.log(
                {"step": step, "event": "lr_lowered", "lr_factor": cfg.lr_factor, "steps": [step + 1, lr_until]}
            )
        return True
