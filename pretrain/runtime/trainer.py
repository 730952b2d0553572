"""The training loop: one DeepSpeed engine, one data stream, explicit steps.

Reads top to bottom: ``Trainer.setup`` builds the engine, the checkpoint manager and the data
stream, ``fit`` runs ``train_step`` / ``evaluate`` / ``save`` until max_steps. What a run is
configured with arrives settled (`ResolvedRun`); the model family, the data stream's position
and the checkpoints are each one object the trainer calls.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipelines.sources.redact import redact_all
from pretrain.evals.harness import during_training as harness_tasks
from pretrain.finetune.adapters import describe_counts, parameter_counts
from pretrain.models import EvalRequest, RunData, StreamRequest, family_name, get_family
from pretrain.run import features
from pretrain.run.build import build_model
from pretrain.run.data import empty_split_note
from pretrain.run.ds_config import for_deepspeed
from pretrain.run.feature import RunContext, StepLoss
from pretrain.run.resolved import ResolvedRun, eval_loss_batch
from pretrain.runtime.accumulate import Accumulation
from pretrain.runtime.checkpoint import RESOLVED, CheckpointManager, Restored
from pretrain.runtime.engine import engine_settings, optimizer_and_schedule
from pretrain.runtime.flops import peak_tflops, this_accelerator, utilisation
from pretrain.runtime.hooks import TrainerHooks
from pretrain.runtime.metrics import MetricsLogger, rewind
from pretrain.runtime.rewind import DataSkips
from pretrain.runtime.rng import seed_everything, seed_replica
from pretrain.runtime.state import (  # noqa: F401 - the trainer's rules, importable from it
    PREEMPTED_EXIT,
    RunState,
    TrainingStopped,
    bad_data_verdict,
    count_skip,
    describe_eval,
    refused_step,
)
from pretrain.runtime.trackers import trackers_for


class Trainer(Accumulation, DataSkips):
    def __init__(
        self,
        run: ResolvedRun,
        inputs: RunData,
        run_dir: Path,
        resume: str = "auto",
        progress: bool = True,
        hooks: TrainerHooks | None = None,
    ):
        self.run, self.recipe, self.inputs, self.run_dir = run, run.recipe, inputs, run_dir
        self.resume, self.progress = resume, progress
        self.hooks = hooks or TrainerHooks()
        self.family = get_family(family_name(run.recipe))
        self.state = RunState()
        self._logged_skips: tuple[int, dict[str, int]] = (0, {})
        self._signal: int | None = None
        self._data_wait = 0.0  # seconds rank 0 waited for batches since the last train line
        self._first_step = 1  # the first step this process trains (set again on a resume)
        self._spike_limit: float | None = None  # loss_spike action skip: the limit of the step in flight

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        # the ranks of a TP/SP group share one micro-batch: data and batch arithmetic follow the DP rank and size
        self.layout = self.run.layout(self.rank)
        seed_everything(self.recipe.training.seed)
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints",
            rank=self.rank,
            world=self.world,
            zero_stage=self.run.zero_stage,
            seed=self.recipe.training.seed,
            resume=self.resume,
            keep_last=self.recipe.checkpoint.keep_last,
            in_save=self.hooks.in_save,
            background=self.recipe.checkpoint.background,
            on_error=self.recipe.checkpoint.on_error,
            before_write=self.hooks.before_write,
            tp=self.layout.tp,
            replica=self.layout.dp_rank,
        )
        self.ctx = RunContext(
            self.recipe,
            self.family,
            self.inputs.model_config,
            self.inputs.data,
            self.layout,
            self.run.deepspeed,
            is_main=self.is_main,
        )
        self.engine = self._engine(self._model())
        # every rank built the same weights; from here each model replica draws its own dropout masks
        seed_replica(self.recipe.training.seed, self.layout.dp_rank)
        for line in features.started(self.engine, self.ctx):  # per rank: a TP rank says what it holds
            if self.is_main or self.layout.tp > 1:
                print(f"layout: {line}", flush=True)
        self.micro, self.gas = self.engine.train_micro_batch_size_per_gpu(), self.engine.gradient_accumulation_steps()
        self.global_batch = self.micro * self.gas * self.layout.dp
        self.peak_tflops = self.recipe.training.peak_tflops or peak_tflops(*self._accelerator())
        if self.is_main:
            self._write_run_files()
        restored = self.ckpt.load(self.engine)
        if restored is not None:
            self.state = RunState.from_dict(restored.run_state)
        self._first_step = self.state.step + 1  # where this process starts training (batch checks)
        self.stream = self._stream(restored)
        if self.is_main:
            for line in self.stream.coverage():  # shards that do not divide ranks x workers
                print(f"data: {line}", flush=True)
        self.metrics = self._metrics(restored)
        self._setup_skips(resumed=restored is not None)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _model(self) -> torch.nn.Module:
        model_cfg, config = self.recipe.model, self.inputs.model_config
        zero3 = self.run.zero_stage == 3
        zero3_init = model_cfg.zero3_init
        if zero3_init == "auto":  # loaded weights do not depend on the init order, so init_from always partitions
            zero3_init = self.family.zero_init and (
                bool(model_cfg.init_from) or self.family.count_params(config) > 1_000_000_000
            )
        if zero3 and zero3_init:
            # transformers then builds (and initialises) the model partitioned across ranks, so no
            # rank ever holds it whole; the object must stay alive while the engine exists.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.run.deepspeed)
        built = build_model(self.family, model_cfg, config)
        for done in built.done:
            if self.is_main:
                print(f"model: {done}", flush=True)
        self.param_counts = parameter_counts(built.model)
        if self.is_main:
            print(describe_counts(self.param_counts), flush=True)
        if zero3:
            self.family.register_external_parameters(built.model)
        for done in features.parallelize(built.model, self.ctx):
            if self.is_main:
                print(f"layout: {done}", flush=True)
        return built.model

    def _engine(self, model: torch.nn.Module):
        """deepspeed.initialize with the run's optimizer and LR schedule (`pretrain.runtime.engine`)
        and what the features give it (their process groups, loss and kernels, made first: collective)."""
        import deepspeed

        groups, optimizer, scheduler = optimizer_and_schedule(model, self.run, self.family.no_decay)
        config = self.ckpt.deepspeed_config(for_deepspeed(self.run.deepspeed))
        self.parts = features.engine_parts(model, self.ctx)
        self.step_loss = self.parts.step_loss or StepLoss(self.parts.loss_sum or self.family.loss_sum)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=config,
            mpu=self.parts.mpu,
        )
        self.device = engine.device
        return engine

    def _stream(self, restored: Restored | None):
        """This rank's training stream, continued from the checkpoint's position (the stream replays
        or re-divides as it needs: same layout or another world size, micro-batch or worker count)."""
        d = self.recipe.data
        stream = self.family.train_stream(
            self.inputs,
            StreamRequest(
                data=d,
                micro_batch_size=self.micro,
                seed=self.recipe.training.seed,
                rank=self.layout.dp_rank,
                world=self.layout.dp,
                sample_ids=self.hooks.sample_ids,
            ),
        )
        if restored is not None and restored.data_state is not None:
            try:
                stream.load_state_dict(restored.data_state)
            except ValueError as e:
                raise TrainingStopped(f"cannot continue the data stream of {restored.tag}: {e}") from None
        return stream

    def _metrics(self, restored: Restored | None) -> MetricsLogger:
        discarded = rewind(self.run_dir, self.state.step) if self.is_main and restored else 0
        report_to = self.recipe.logging.report_to
        metrics = MetricsLogger(
            self.run_dir,
            enabled=self.is_main,
            tensorboard="tensorboard" in report_to,
            append=self.state.step > 0,
            # wandb / MLflow: only the process writing metrics.jsonl, fed from it (see runtime/trackers.py)
            trackers=trackers_for(self.run_dir, self.recipe, fresh=self.state.step == 0) if self.is_main else None,
        )
        if restored:
            metrics.log(
                {
                    "step": self.state.step,
                    "event": "resumed",
                    "checkpoint": restored.tag.name,
                    "world_size": self.world,
                    "discarded_lines": discarded,
                }
            )
        return metrics

    def _peak_memory_gb(self) -> float | None:
        """The most accelerator memory this rank's tensors held so far (None on a CPU, where process
        RSS would not show what the model states take)."""
        if getattr(self.device, "type", str(self.device)) != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 1e9

    def _accelerator(self) -> tuple[str | None, str, bool]:
        name, tf32 = this_accelerator()
        return name, self.run.precision, tf32

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the step in flight finishes, then every rank agrees to save and stop.
        self._signal = signum

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # the parameter counts are known only once the model (and any adapters) exist
        resolved = {**self.run.to_json(), "parameters": self.param_counts, "engine": engine_settings(self.engine)}
        # source URLs keep their scheme, host and path; passwords and signatures stay out of every file
        (self.run_dir / RESOLVED).write_text(json.dumps(redact_all(resolved), indent=2))
        self.inputs.model_config.save_pretrained(self.run_dir / "model")
        if not (self.run_dir / "tokenizer").exists():
            shutil.copytree(self.inputs.tokenizer_dir, self.run_dir / "tokenizer")

    # ------------------------------------------------------------------ steps
    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t)
        return t.tolist()

    def _next_batch(self, step: int) -> dict[str, torch.Tensor]:
        """The stream's next micro-batch on the device."""
        waited = time.perf_counter()
        raw = next(self.stream)
        self._data_wait += time.perf_counter() - waited
        self.hooks.on_batch(step, self.rank, raw.meta.get("ids"))
        return {k: v.to(self.device) for k, v in raw.items()}  # raw.meta, the stream's bookkeeping, stays here

    def train_step(self, log: bool = True) -> dict[str, Any]:
        """One optimizer step: ``gas`` micro-batches through the engine. The gradient norm is read
        (a wait for the device) only when ``log`` is set or DeepSpeed refused the update."""
        self.engine.train()
        factor = self._lr_factor(self.state.step + 1)
        if factor != 1.0:  # after a rewind; the schedule sets the next step's LR afresh
            for group in self.engine.optimizer.param_groups:
                group["lr"] *= factor
        lr = self.engine.get_lr()[0]
        refused_before = getattr(self.engine, "skipped_steps", 0)
        if self.gas > 1 and self.run.zero_stage >= 1:
            total, count, (stop, read, bad), nonfinite, dropped = self._accumulate_checked_once()
        else:
            total, count, (stop, read, bad), nonfinite, dropped = self._accumulate_checked_each()
        features.after_step(self.engine, self.ctx)
        refused = getattr(self.engine, "skipped_steps", 0) > refused_before
        if dropped and not nonfinite:
            if not refused:
                raise TrainingStopped(
                    f"loss spike at step {self.state.step + 1}: the optimizer applied the update meant to be dropped "
                    "(loss_spike.action skip needs ZeRO stage 1-3); resume from the last checkpoint"
                )
            self.state.spike_skips += 1
        if nonfinite:  # raises, or counts the skipped step
            self._nonfinite_gradient(
                refused,
                f"non-finite loss at step {self.state.step + 1} in {nonfinite} "
                f"micro-batch(es) of {self.gas} x {self.world} rank(s)",
                "the optimizer applied the step (is the DeepSpeed config's gradient overflow check off?)",
            )
        self.state.step += 1
        self.state.samples += self.global_batch
        self.state.tokens += self.global_batch * self.run.tokens_per_sample
        z_loss = None
        take = getattr(self.parts.loss_sum, "take", None)  # training.z_loss: its term is logged apart
        if take is not None:
            term = take()
            z_total = self._sum_over_ranks([float(term) if term is not None else 0.0])[0]
            total -= z_total
            z_loss = z_total / count if count else 0.0
        # the step's loss over its items, the estimator of the val loss (ranks of one TP or SP group
        # count the same sum and items, so the ratio holds): the gap compares like with like
        mean_loss = total / count if count else 0.0
        if nonfinite:
            mean_loss = float("nan")
        elif not dropped:  # a dropped spike trained nothing: it stays out of the gap's train loss
            self.state.train_losses.append(mean_loss)
            self.state.train_loss_sum += total
            self.state.train_items += count
        norm = None
        if (log or refused) and not nonfinite and not dropped:
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else None
        finite_norm = None if norm is None else bool(np.isfinite(norm))
        if dropped:
            pass  # the update was refused on purpose: neither an overflow nor a non-finite gradient
        elif refused_step(self.run.precision, refused, nonfinite, finite_norm) == "overflow":
            self.state.loss_scale_overflows += 1  # fp16's scaler lowered its scale: normal, never a stop
            norm = None  # the norm at the scale that overflowed says nothing of the gradient
        elif finite_norm is False:
            # Where the update was applied and this step is not logged, the next non-finite loss
            # finds the weights broken and stops the run just the same.
            self._nonfinite_gradient(refused=refused)
        verdict = bad and bad_data_verdict(read, bad, self.recipe.data.max_bad_fraction, self._first_bad())
        if verdict:
            raise TrainingStopped(verdict)
        return {
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": norm,
            "data_skipped": int(bad),
            "stop": stop > 0,
            "spike_skipped": bool(dropped),
            **({"z_loss": z_loss} if z_loss is not None else {}),
        }

    def _data_counts(self) -> tuple[int, dict[str, int]]:
        """This rank's share of the samples read and skipped, for sums over ranks: the ranks of a
        TP or SP group read the same samples, so only the first of each group counts them."""
        read, skipped = self.stream.counts()
        if self.layout.rank % self.layout.model_parallel:  # TP and SP are the inner ranks of the order
            return 0, {}
        return read, skipped

    def _skips_by_reason(self) -> dict[str, int]:
        """Skipped samples and shards by reason, summed over every rank and worker (collective)."""
        import torch.distributed as dist

        everyone: list[dict] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(everyone, self._data_counts()[1])
        total: dict[str, int] = {}
        for counts in everyone:
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        return dict(sorted(total.items()))

    def _samples_by_source(self) -> dict[str, int]:
        """Samples consumed so far from each data source, summed over the model replicas (collective)."""
        import torch.distributed as dist

        mine = self.stream.samples_by_source()
        t = torch.tensor(list(mine.values()), dtype=torch.float64, device=self.device)  # NCCL: device tensors
        dist.all_reduce(t, group=self._dp_group())
        return {name: int(n) for name, n in zip(mine, t.tolist())}

    def _first_bad(self) -> str:
        skipped = self.stream.counts()[1]
        return ", ".join(f"{k}={v}" for k, v in skipped.items()) if skipped else "(on another rank)"

    def evaluate(self) -> dict[str, Any]:
        ev = self.recipe.eval
        self.hooks.on_evaluate(self.state.step, self.rank)
        self.engine.eval()
        request = EvalRequest(
            split=self.recipe.data.eval_split,
            batch_size=ev.batch_size or self.micro,
            max_samples=ev.max_samples,
            rank=self.layout.dp_rank,
            world=self.layout.dp,
            device=self.device,
            group=self._dp_group(),
            # a contrastive loss is over the pairs scored together: the step's, as in training
            loss_batch=eval_loss_batch(ev.batch_size, self.layout.dp, self.global_batch),
        )
        result = self.family.evaluate(self.engine, self.inputs, request)
        sums = (self.state.train_loss_sum, self.state.train_items)
        train_loss = sums[0] / sums[1] if sums[1] else float("nan")  # over the items since the last eval
        self.state.train_losses, self.state.train_loss_sum, self.state.train_items = [], 0.0, 0.0
        self.engine.train()
        out = {
            "step": self.state.step,
            "split": self.recipe.data.eval_split,
            **result,
            "train_loss": train_loss,
            "gap": result["loss"] - train_loss,
            "tokens_seen": self.state.tokens,
        }
        if not result.get("samples"):  # a loss of nothing is not a number: say why instead
            out.update(loss=None, gap=None, note=empty_split_note(self.inputs.data, self.recipe.data.eval_split))
        return out

    def _dp_group(self):
        """The process group over which model replicas meet (None: all ranks), from the feature
        that made the groups."""
        return self.parts.dp_group() if self.parts.dp_group else None

    def save(self) -> None:
        self.ckpt.save(self.engine, self.state.step, self.state.to_dict(), self.stream.state_dict())
        self._saves_ended()

    def _saves_ended(self, wait: bool = False) -> None:
        """Seal a background save whose writes ended on every rank (``wait``: wait for them) and log
        its event (save_s, save_blocking_s) or its failure (collective while a save is in flight)."""
        self.ckpt.flush() if wait else self.ckpt.poll()
        for record in self.ckpt.take_records():
            self.metrics.log(record)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        tr, ev, ck = self.recipe.training, self.recipe.eval, self.recipe.checkpoint
        bar = tqdm(
            total=tr.max_steps,
            initial=self.state.step,
            disable=(not self.is_main or not self.progress) or None,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        start = time.time()
        window_start, window_steps = time.time(), 0
        last_eval: dict[str, Any] = {}
        spike = tr.loss_spike
        while self.state.step < tr.max_steps:
            step = self.state.step + 1
            if self._skip_ahead(step):  # the data of skipped steps is read and not trained
                bar.update(self.state.step - bar.n)
                if self.state.step >= tr.max_steps:  # skipped to the end: the end's evaluation and save
                    last_eval = self.evaluate()
                    self.metrics.log(last_eval)
                    if ck.at_end:
                        self.save()
                continue
            log = step % tr.log_every == 0 or step == tr.max_steps
            self._spike_limit = self.spikes.limit() if spike and spike.action == "skip" else None
            out = self.train_step(log)
            preempted = out.pop("stop")
            window_steps += 1
            if log:
                now = time.time()
                sps = window_steps * self.global_batch / max(now - window_start, 1e-9)
                tps = sps * self.run.tokens_per_sample
                tflops, mfu = utilisation(
                    self.run.flops_per_step, window_steps, now - window_start, self.world, self.peak_tflops
                )
                data_wait = self._data_wait / window_steps
                window_start, window_steps, self._data_wait = now, 0, 0.0
                # throughput is in the family's unit: tokens/s for language models, pairs/s for CLIP
                tput = tps if self.family.unit == "tokens" else sps
                if out["data_skipped"]:
                    if out["data_skipped"] != self._logged_skips[0]:  # the total is already summed over ranks
                        self._logged_skips = (out["data_skipped"], self._skips_by_reason())
                    out["data_skipped_by_reason"] = self._logged_skips[1]
                self.metrics.log(
                    {
                        "step": step,
                        **out,
                        "samples": self.state.samples,
                        "tokens": self.state.tokens,
                        "nonfinite_skips": self.state.nonfinite_skips,
                        "loss_scale_overflows": self.state.loss_scale_overflows,
                        "samples_skipped": self.state.samples_skipped,
                        "throughput": tput,
                        "throughput_unit": f"{self.family.unit}/s",
                        "tokens_per_s": tps,
                        "samples_per_s": sps,
                        "model_flops_per_step": self.run.flops_per_step,
                        "tflops_per_gpu": tflops,
                        "mfu": mfu,
                        "data_wait_s": data_wait,
                        "peak_memory_gb": self._peak_memory_gb(),
                        "samples_by_source": self._samples_by_source(),
                        "elapsed_s": now - start,
                    }
                )
                bar.set_postfix(
                    loss=f"{out['loss']:.3f}", lr=f"{out['lr']:.2e}", **{self.family.unit[:3] + "_s": f"{tput:,.0f}"}
                )
            bar.update(1)
            if self._spike_step(step, out):  # rewound: the counters are the checkpoint's, moved past the spike
                bar.update(self.state.step - bar.n)
                continue
            if (ev.every and step % ev.every == 0) or step == tr.max_steps:
                last_eval = self.evaluate()
                self.metrics.log(last_eval)
                if self.is_main:
                    tqdm.write(f"step {step}: {describe_eval(last_eval)}")
            harness_tasks(self, step)  # eval.tasks (lm-evaluation-harness) when due, on rank 0
            if (ck.every and step % ck.every == 0) or (ck.at_end and step == tr.max_steps) or preempted:
                self.save()
            else:
                self._saves_ended()
            if preempted:
                self._saves_ended(wait=True)
                self.metrics.log({"step": step, "event": "preempted", "signal": self._signal})
                bar.close()
                self.metrics.close()
                self.preempted = True
                return last_eval
        self._saves_ended(wait=True)
        bar.close()
        self.metrics.close(finished=True)  # the last step: every line is final, the trackers get them all
        self.preempted = False
        return last_eval
