"""What ``deepspeed.initialize`` gets from the run (the AdamW parameter groups under the one
weight-decay rule, the optimizer unless the DeepSpeed config names one, the LR schedule as a
callable) and what the engine reports back for ``resolved-config.json``."""

from __future__ import annotations

from typing import Any

import torch

from pretrain.run.ds_config import toolkit_scheduler
from pretrain.run.resolved import ResolvedRun
from pretrain.run.schedules import lambda_scheduler, lr_function, warmup_cosine


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay) -> list[dict]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def optimizer_and_schedule(model: torch.nn.Module, run: ResolvedRun, no_decay):
    """(parameter groups, the optimizer or None, the scheduler callable or None): the recipe's AdamW
    and warmup-cosine unless the DeepSpeed config names its own; a callable scheduler, because
    DeepSpeed then hands it the base optimizer, which works under every ZeRO stage."""
    tr, opt, ds = run.recipe.training, run.optimization, run.deepspeed
    groups = param_groups(model, tr.weight_decay, no_decay)
    optimizer = None
    if "optimizer" not in ds:
        optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tr.betas, eps=tr.eps, weight_decay=tr.weight_decay)
    scheduler = None
    own = toolkit_scheduler(ds)
    if own is not None or "scheduler" not in ds:
        if own is not None:
            fn = lr_function(own["type"], own.get("params", {}), opt.lr)
        else:
            fn = lambda step: warmup_cosine(step, opt.lr, opt.min_lr, opt.warmup_steps, opt.max_steps)  # noqa: E731
        scheduler = lambda o: lambda_scheduler(o, fn)  # noqa: E731
    return groups, optimizer, scheduler


def engine_settings(engine) -> dict[str, Any]:
    """What the engine trains with, read back from it (not from the configs that asked for it), so
    resolved-config.json shows the values in use. Group lr is the first step's (the schedule's start)."""
    groups = getattr(engine.optimizer, "param_groups", None) or []
    return {
        "optimizer": type(getattr(engine, "basic_optimizer", None) or engine.optimizer).__name__,
        "param_groups": [
            {
                "lr": g.get("lr"),
                "weight_decay": g.get("weight_decay"),
                "betas": g.get("betas"),
                "eps": g.get("eps"),
                "params": len(g.get("params", [])),
            }
            for g in groups
        ],
        "gradient_clipping": engine.gradient_clipping(),
        "precision": "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32",
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "global_batch": engine.train_batch_size(),
        "zero_stage": engine.zero_optimization_stage(),
    }


def replay_cpu_adam_steps(optimizer) -> int:
    """After a checkpoint is loaded into DeepSpeed's Adam on a CPU: replay its step counter, so that
    the resumed run's updates are bit for bit the uninterrupted run's. Returns the steps replayed.

    The CPU kernel (``multi_tensor_adam`` of DeepSpeed's CPU FusedAdam) keeps beta^t in process-wide
    state and, from one step to the next, multiplies it by beta; a fresh process (a resume) or a jump
    (a rewind) computes pow(beta, t) instead, which differs in the last bits, so every later weight
    drifts from the uninterrupted run's (found by `benchmarks/chaos.py`: CLIP on 2 ranks, 2e-6 after
    60 steps). Calling the kernel for steps 1..t on a one-element tensor with lr 0 rebuilds the same
    product. GPU kernels compute beta^t from the step at each call and need nothing."""
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the base optimizer
    kernel = getattr(base, "multi_tensor_adam", None)
    if kernel is None or not hasattr(base, "adam_w_mode"):
        return 0
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return 0
    steps = {int(s["step"]) for s in base.state.values() if "step" in s}
    betas = {tuple(g["betas"]) for g in base.param_groups}
    if len(steps) != 1 or len(betas) != 1:  # one product per process: several would not match either way
        return 0
    (step,), ((beta1, beta2),) = steps, betas
    one = [[torch.zeros(1)] for _ in range(4)]  # grads, params, exp_avg, exp_avg_sq
    noop = torch.zeros(1, dtype=torch.int)
    for t in range(1, step + 1):
        kernel(2048, noop, one, 0.0, beta1, beta2, 1e-8, t, int(base.adam_w_mode), 1, 0.0)
    return step
