"""The training loop: one DeepSpeed engine, one data stream, explicit steps.

Reads top to bottom: ``Trainer.setup`` builds the engine, ``fit`` runs
``train_step`` / ``evaluate`` / ``save`` until max_steps.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.checkpoint import (RESOLVED, capture_rng, complete_tags, load_rank_state, mark_complete, rank_state_path,
                                 restore_rng, resumable, tag_for)
from pretrain.config import Recipe
from pretrain.ds_config import for_deepspeed, precision, toolkit_scheduler, zero_stage
from pretrain.metrics import MetricsLogger, rewind
from pretrain.models import freeze_by_pattern, get_family
from pretrain.schedules import lambda_scheduler, lr_function, warmup_cosine


@dataclass
class RunState:
    """Counters saved with every checkpoint; enough to continue the data stream exactly."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    micro_batches: int = 0  # consumed by this rank's stream (skipped non-finite ones included)
    nonfinite_skips: int = 0
    train_losses: list[float] = field(default_factory=list)  # since the last eval, for the gap
    # Earlier segments of this run on other world sizes ({"world", "workers", "micro", "micro_batches"}):
    # the data stream re-divides their epochs' unconsumed samples before going on.
    data_history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "samples": self.samples, "tokens": self.tokens, "micro_batches": self.micro_batches,
                "nonfinite_skips": self.nonfinite_skips, "train_losses": self.train_losses,
                "data_history": self.data_history}


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a checkpoint was saved on SIGTERM/SIGUSR1; run the same command to continue


class TrainingStopped(RuntimeError):
    """The run cannot go on (too much bad data, non-finite losses); the message says where."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay) -> list[dict]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


class _NanGradient(torch.autograd.Function):
    """Test hook: the identity forward, NaN gradients backward (a finite loss, a broken backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def describe_eval(ev: dict[str, Any]) -> str:
    """One line for the console: the val loss, the family's headline metric, the gap."""
    extra = ""
    if "perplexity" in ev:
        extra = f" (ppl {ev['perplexity']:.1f})"
    elif "zero_shot_top1" in ev:
        extra = f", zero-shot top-1 {ev['zero_shot_top1']:.3f} of {ev['num_classes']} classes"
    if "image_to_text_R@1" in ev:
        extra += f", i->t R@1 {ev['image_to_text_R@1']:.3f}"
    return f"val loss {ev['loss']:.4f}{extra}, train loss {ev['train_loss']:.4f}, gap {ev['gap']:+.4f}"


class Trainer:
    def __init__(self, recipe: Recipe, ds_config: dict, run_dir: Path, data, tokenizer_dir: Path,
                 model_config, notes: list[str], resume: str = "auto", progress: bool = True):
        self.recipe, self.ds_config, self.run_dir = recipe, ds_config, run_dir
        self.data, self.tokenizer_dir, self.model_config, self.notes = data, tokenizer_dir, model_config, notes
        self.resume, self.progress = resume, progress
        self.family = get_family(recipe.family)
        self.state = RunState()
        self._slot_stats: dict[int, dict] = {}
        self._logged_skips: tuple[int, dict[str, int]] = (0, {})
        # Fault injection for the tests (never set in real runs): NaN losses at these steps; stall in this save.
        self._fault_nan_steps = {int(x) for x in os.environ.get("PRETRAIN_FAULT_NAN_STEPS", "").split(",") if x}
        self._fault_stall_save = int(os.environ.get("PRETRAIN_FAULT_STALL_IN_SAVE", "0") or 0)
        self._fault_nan_grad_steps = {int(x) for x in os.environ.get("PRETRAIN_FAULT_NAN_GRAD_STEPS", "").split(",") if x}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import deepspeed
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        tr = self.recipe.training
        seed_everything(tr.seed)
        stage = zero_stage(self.ds_config)
        zero3_init = self.recipe.model.zero3_init
        if zero3_init == "auto":
            zero3_init = self.family.count_params(self.model_config) > 1_000_000_000
        if stage == 3 and zero3_init:
            # transformers then builds (and initialises) the model partitioned across ranks, so no
            # rank ever holds it whole; the object must stay alive while the engine exists.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.ds_config)
        model = self.family.build_model(self.recipe.model, self.model_config)
        if self.recipe.model.freeze:
            frozen = freeze_by_pattern(self.family.hf_model(model), self.recipe.model.freeze, self.family.FREEZE_ALIASES)
            if self.is_main:
                print(f"froze {frozen} parameter tensors matching {self.recipe.model.freeze}", flush=True)
        if stage == 3 and hasattr(self.family, "register_external_parameters"):
            self.family.register_external_parameters(model)
        groups = param_groups(model, tr.weight_decay, self.family.no_decay)
        optimizer = None
        if "optimizer" not in self.ds_config:
            optimizer = torch.optim.AdamW(groups, lr=tr.lr, betas=tr.betas, eps=tr.eps, weight_decay=tr.weight_decay)
        scheduler = None
        own = toolkit_scheduler(self.ds_config)
        if own is not None or "scheduler" not in self.ds_config:
            if own is not None:
                fn = lr_function(own["type"], own.get("params", {}), tr.lr)
            else:
                fn = lambda step: warmup_cosine(step, tr.lr, tr.min_lr, tr.warmup_steps, tr.max_steps)  # noqa: E731
            # A callable: DeepSpeed hands it the base optimizer, which works under every ZeRO stage.
            scheduler = lambda opt: lambda_scheduler(opt, fn)  # noqa: E731
        target = self._resume_target()
        saved = json.loads((target / "toolkit.json").read_text()) if target is not None else None
        self._universal = None
        ds_init = for_deepspeed(self.ds_config)
        if saved is not None and saved.get("world_size", self.world) != self.world:
            self._universal = self._prepare_world_change(target, saved)
            if self._universal is not None:
                ds_init = {**ds_init, "checkpoint": {**ds_init.get("checkpoint", {}), "load_universal": True}}
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                                     lr_scheduler=scheduler, config=ds_init)
        self.device = self.engine.device
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.gas = self.engine.gradient_accumulation_steps()
        self.global_batch = self.micro * self.gas * self.world
        self.tokens_per_sample = self.family.tokens_per_sample(self.data, self.model_config)
        if self.is_main:
            self._write_run_files()
        resumed_from = self._maybe_resume(target, saved)
        discarded = rewind(self.run_dir, self.state.step) if self.is_main and resumed_from else 0
        self.metrics = MetricsLogger(self.run_dir, enabled=self.is_main, append=self.state.step > 0)
        if resumed_from:
            self.metrics.log({"step": self.state.step, "event": "resumed", "checkpoint": resumed_from.name,
                              "world_size": self.world, "discarded_lines": discarded})
        trace_dir = os.environ.get("PRETRAIN_TRACE_SAMPLES")  # tests: which samples each step trained on
        self._trace = open(Path(trace_dir) / f"trace-rank{self.rank}.txt", "a") if trace_dir else None
        self.stream = self.family.train_stream(self.data, self.recipe, self.micro, self.rank, self.world,
                                               self.tokenizer_dir, self.model_config, self.state.data_history,
                                               trace=self._trace is not None)
        for _ in range(self.state.micro_batches):  # replay the deterministic stream to where the checkpoint left it
            self._note_stats(next(self.stream).pop("_stats"))
        self._signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the step in flight finishes, then every rank agrees to save and stop.
        self._signal = signum

    def _note_stats(self, stats: dict) -> None:
        self._slot_stats[stats["slot"]] = stats

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {
            "recipe": self.recipe.model_dump(mode="json"),
            "deepspeed": self.ds_config,
            "world_size": self.world,
            "precision": precision(self.ds_config),
            "zero_stage": zero_stage(self.ds_config),
            "data": {"path": str(self.data.root.resolve()), "kind": self.data.KIND,
                     "tokens_per_sample": self.tokens_per_sample,
                     "tokens_per_step": self.global_batch * self.tokens_per_sample},
            "notes": self.notes,
        }
        (self.run_dir / RESOLVED).write_text(json.dumps(resolved, indent=2))
        self.model_config.save_pretrained(self.run_dir / "model")
        if not (self.run_dir / "tokenizer").exists():
            shutil.copytree(self.tokenizer_dir, self.run_dir / "tokenizer")

    def _resume_target(self) -> Path | None:
        if self.resume == "none":
            return None
        if self.resume == "auto":
            return resumable(self.run_dir / "checkpoints")
        p = Path(self.resume)
        target = resumable(p) if (p / "latest").is_file() or complete_tags(p) else p
        if target is None or not (target / "toolkit.json").is_file():
            raise RuntimeError(f"--resume {self.resume}: not a complete checkpoint (no toolkit.json)")
        return target

    def _prepare_world_change(self, target: Path, saved: dict) -> Path | None:
        """A checkpoint from another world size. ZeRO-1/2/3 optimizer state is partitioned by rank,
        so it goes through DeepSpeed's universal format (converted once, by rank 0, into the tag's
        universal/ folder); ZeRO-0 state is whole and loads as it is. Returns the universal folder."""
        import subprocess
        import sys

        import torch.distributed as dist

        if self.recipe.data.resampled:
            raise RuntimeError("data.resampled is on: there is no epoch position to re-divide on another world size")
        if saved.get("zero_stage", 0) == 0:
            return None
        universal = target / "universal"
        done = universal / "converted.json"
        if self.is_main and not done.is_file():
            print(f"converting {target} ({saved['world_size']} ranks) to a universal checkpoint for {self.world}",
                  flush=True)
            shutil.rmtree(universal, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(target),
                   "--output_folder", str(universal), "--inject_missing_state", "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            ok = proc.returncode == 0
            if ok:
                done.write_text(json.dumps({"from_world_size": saved["world_size"], "time": time.time()}))
            else:
                print(f"error: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", flush=True)
        dist.barrier()
        if not done.is_file():
            raise RuntimeError(f"could not convert {target} to a universal checkpoint (see rank 0's output)")
        return universal

    def _maybe_resume(self, target: Path | None, saved: dict | None) -> Path | None:
        if target is None:
            return None
        if self._universal is not None:
            path, client = self.engine.load_checkpoint(str(target), tag=self._universal.name)
        else:
            path, client = self.engine.load_checkpoint(str(target.parent), tag=target.name)
        if path is None:
            raise RuntimeError(f"could not load the checkpoint {target}")
        self.state = RunState(**client.get("run_state", {}))
        old_world = saved.get("world_size", self.world)
        if old_world != self.world:
            # The stream starts over in this world's numbering, after the earlier segments' samples.
            self.state.data_history.append({"world": old_world, "workers": saved.get("num_workers", 0),
                                            "micro": saved["micro"], "micro_batches": self.state.micro_batches})
            self.state.micro_batches = 0
            seed_everything(self.recipe.training.seed + self.state.step)  # rank RNG states do not map across worlds
        else:
            rank_state = load_rank_state(target, self.rank)
            if rank_state is not None:
                restore_rng(rank_state["rng"])
        if self.is_main:
            change = f" ({old_world} -> {self.world} ranks)" if old_world != self.world else ""
            print(f"resumed from {target} at step {self.state.step}{change}", flush=True)
        return target

    # ------------------------------------------------------------------ steps
    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def _data_counts(self) -> tuple[int, int]:
        read = sum(s["read"] for s in self._slot_stats.values())
        bad = sum(sum(s["skipped"].values()) for s in self._slot_stats.values())
        return read, bad

    def _forward_finite(self) -> torch.Tensor:
        """Loss of the next micro-batch whose loss is finite on every rank; the others are dropped by all ranks."""
        while True:
            raw = next(self.stream)
            self._note_stats(raw.pop("_stats"))
            ids = raw.pop("_ids", None)
            if self._trace is not None and ids is not None:
                self._trace.write(f"{self.state.step + 1}\t{' '.join(ids)}\n")
                self._trace.flush()
            self.state.micro_batches += 1
            batch = {k: v.to(self.device) for k, v in raw.items()}
            loss = self.family.loss(self.engine, batch)
            if self.state.step + 1 in self._fault_nan_steps and self.rank == 0:
                self._fault_nan_steps.discard(self.state.step + 1)  # test hook: one poisoned micro-batch
                loss = loss * float("nan")
            bad_ranks = self._sum_over_ranks([0.0 if torch.isfinite(loss).item() else 1.0])[0]
            if bad_ranks == 0:
                return loss
            where = (f"non-finite loss at step {self.state.step + 1}, micro-batch {self.state.micro_batches} "
                     f"of the stream, on {int(bad_ranks)} rank(s)")
            if not self._weights_finite():
                raise TrainingStopped(f"{where}: the weights themselves are non-finite (an earlier update was applied "
                                      f"with non-finite gradients, after step {self.state.step} at the latest); resume "
                                      "from the last checkpoint (--resume auto) after finding the cause")
            self.state.nonfinite_skips += 1
            if self.recipe.training.on_nonfinite == "stop":
                raise TrainingStopped(f"{where}; training.on_nonfinite is 'stop'")
            if self.state.nonfinite_skips > self.recipe.training.max_nonfinite_skips:
                raise TrainingStopped(f"{where}: {self.state.nonfinite_skips} skipped so far, more than "
                                      f"training.max_nonfinite_skips={self.recipe.training.max_nonfinite_skips}")
            if self.is_main:
                print(f"warning: {where}; skipped ({self.state.nonfinite_skips} so far)", flush=True)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step: ``gas`` micro-batches through the engine."""
        self.engine.train()
        lr = self.engine.get_lr()[0]
        total = 0.0
        refused_before = getattr(self.engine, "skipped_steps", 0)
        for micro in range(self.gas):
            loss = self._forward_finite()
            if self.state.step + 1 in self._fault_nan_grad_steps and micro == 0 and self.rank == 0:
                self._fault_nan_grad_steps.discard(self.state.step + 1)  # test hook: a finite loss, NaN gradients
                loss = _NanGradient.apply(loss)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item()
        self.state.step += 1
        self.state.samples += self.global_batch
        self.state.tokens += self.global_batch * self.tokens_per_sample
        read, bad = self._data_counts()
        loss_sum, stop, read, bad = self._sum_over_ranks([total / self.gas, float(self._signal is not None), read, bad])
        mean_loss = loss_sum / self.world
        self.state.train_losses.append(mean_loss)
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else None
        if norm is not None and not np.isfinite(norm):
            self._nonfinite_gradient(refused=getattr(self.engine, "skipped_steps", 0) > refused_before)
        limit = self.recipe.data.max_bad_fraction
        if read + bad >= 100 and bad / (read + bad) > limit:
            raise TrainingStopped(f"{int(bad)} of {int(read + bad)} samples read were bad (> data.max_bad_fraction={limit}); "
                                  f"first: {self._first_bad()}")
        return {"loss": mean_loss, "lr": lr, "grad_norm": norm, "data_skipped": int(bad), "stop": stop > 0}

    def _weights_finite(self) -> bool:
        """Whether every rank's weights (its ZeRO-3 partition, or the whole model) are finite."""
        finite = True
        for p in self.engine.module.parameters():
            data = getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else p.data
            if data.numel() and not bool(torch.isfinite(data).all()):
                finite = False
                break
        return self._sum_over_ranks([0.0 if finite else 1.0])[0] == 0

    def _nonfinite_gradient(self, refused: bool) -> None:
        """A non-finite gradient norm. Where DeepSpeed's optimizer checks for it (ZeRO-1/2 in
        fp32 and fp16) it refused the step and the weights are intact: that counts as a skipped
        step under on_nonfinite=skip. Elsewhere the update has been applied and the run stops."""
        where = f"non-finite gradient norm at step {self.state.step} (micro-batches {self.state.micro_batches - self.gas + 1}" \
                f"..{self.state.micro_batches} of the stream)"
        if not refused:
            raise TrainingStopped(f"{where}: the optimizer applied it, so the weights are no longer usable; resume from "
                                  "the last checkpoint (--resume auto) after finding the cause")
        if self.recipe.training.on_nonfinite == "stop":
            raise TrainingStopped(f"{where}; the optimizer skipped the step, and training.on_nonfinite is 'stop'")
        self.state.nonfinite_skips += 1
        if self.state.nonfinite_skips > self.recipe.training.max_nonfinite_skips:
            raise TrainingStopped(f"{where}: {self.state.nonfinite_skips} non-finite losses or gradients so far, more "
                                  f"than training.max_nonfinite_skips={self.recipe.training.max_nonfinite_skips}")
        if self.is_main:
            print(f"warning: {where}; the optimizer skipped the step ({self.state.nonfinite_skips} skips so far)",
                  flush=True)

    def _skips_by_reason(self) -> dict[str, int]:
        """Skipped samples and shards by reason, summed over every rank and worker (collective)."""
        import torch.distributed as dist

        mine: dict[str, int] = {}
        for stats in self._slot_stats.values():
            for reason, n in stats["skipped"].items():
                mine[reason] = mine.get(reason, 0) + n
        everyone: list[dict] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(everyone, mine)
        total: dict[str, int] = {}
        for counts in everyone:
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        return dict(sorted(total.items()))

    def _first_bad(self) -> str:
        for s in self._slot_stats.values():
            if s["skipped"]:
                return ", ".join(f"{k}={v}" for k, v in s["skipped"].items())
        return "(on another rank)"

    def evaluate(self) -> dict[str, Any]:
        ev = self.recipe.eval
        self.engine.eval()
        result = self.family.evaluate(self.engine, self.data, self.recipe.data.eval_split, ev.batch_size or self.micro,
                                      self.rank, self.world, self.device, ev.max_samples, self.tokenizer_dir,
                                      self.model_config)
        window = self.state.train_losses
        train_loss = sum(window) / len(window) if window else float("nan")
        self.state.train_losses = []
        self.engine.train()
        return {"step": self.state.step, "split": self.recipe.data.eval_split, **result,
                "train_loss": train_loss, "gap": result["loss"] - train_loss, "tokens_seen": self.state.tokens}

    def save(self) -> None:
        import torch.distributed as dist

        root = self.run_dir / "checkpoints"
        tag_dir = root / tag_for(self.state.step)
        if self.is_main:  # a tag being rewritten is not complete until every rank has written it again
            (tag_dir / "toolkit.json").unlink(missing_ok=True)
        dist.barrier()
        self.engine.save_checkpoint(str(root), tag=tag_dir.name, client_state={"run_state": self.state.to_dict()},
                                    save_latest=False)
        torch.save({"rng": capture_rng(), "micro_batches": self.state.micro_batches}, rank_state_path(tag_dir, self.rank))
        if self.state.step == self._fault_stall_save:
            # Test hook: hold every rank inside the save (files written, not sealed) for a kill -9.
            (self.run_dir / f"stalled-in-save-rank{self.rank}").write_text(str(self.state.step))
            time.sleep(3600)
        dist.barrier()
        if self.is_main:
            meta = {**self.state.to_dict(), "world_size": self.world, "zero_stage": zero_stage(self.ds_config),
                    "micro": self.micro, "num_workers": self.recipe.data.num_workers, "time": time.time()}
            mark_complete(tag_dir, meta, self.recipe.checkpoint.keep_last)
            print(f"saved checkpoint {tag_dir.name}", flush=True)
        dist.barrier()

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        tr, ev, ck = self.recipe.training, self.recipe.eval, self.recipe.checkpoint
        bar = tqdm(total=tr.max_steps, initial=self.state.step, disable=(not self.is_main or not self.progress) or None,
                   desc="train", unit="step", dynamic_ncols=True)
        start = time.time()
        window_start, window_samples = time.time(), 0
        last_eval: dict[str, Any] = {}
        while self.state.step < tr.max_steps:
            out = self.train_step()
            preempted = out.pop("stop")
            window_samples += self.global_batch
            step = self.state.step
            if step % tr.log_every == 0 or step == tr.max_steps:
                now = time.time()
                sps = window_samples / max(now - window_start, 1e-9)
                tps = sps * self.tokens_per_sample
                window_start, window_samples = now, 0
                # throughput is in the family's unit: tokens/s for language models, pairs/s for CLIP
                tput = tps if self.family.UNIT == "tokens" else sps
                if out["data_skipped"]:
                    if out["data_skipped"] != self._logged_skips[0]:  # the total is already summed over ranks
                        self._logged_skips = (out["data_skipped"], self._skips_by_reason())
                    out["data_skipped_by_reason"] = self._logged_skips[1]
                self.metrics.log({"step": step, **out, "samples": self.state.samples, "tokens": self.state.tokens,
                                  "nonfinite_skips": self.state.nonfinite_skips, "throughput": tput,
                                  "throughput_unit": f"{self.family.UNIT}/s", "tokens_per_s": tps, "samples_per_s": sps,
                                  "elapsed_s": now - start})
                bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{out['lr']:.2e}", **{self.family.UNIT[:3] + "_s": f"{tput:,.0f}"})
            bar.update(1)
            if (ev.every and step % ev.every == 0) or step == tr.max_steps:
                last_eval = self.evaluate()
                self.metrics.log(last_eval)
                if self.is_main:
                    tqdm.write(f"step {step}: {describe_eval(last_eval)}")
            if (ck.every and step % ck.every == 0) or (ck.at_end and step == tr.max_steps) or preempted:
                self.save()
            if preempted:
                self.metrics.log({"step": step, "event": "preempted", "signal": self._signal})
                bar.close()
                self.metrics.close()
                self.preempted = True
                return last_eval
        bar.close()
        self.metrics.close()
        if self._trace is not None:
            self._trace.close()
        self.preempted = False
        return last_eval
