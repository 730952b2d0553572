"""Learning-rate schedules as pure functions of the step, and the DeepSpeed ``scheduler`` section.

DeepSpeed's own scheduler types (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest)
are left to DeepSpeed. The types it lacks are provided here under PyTorch's names and with
PyTorch's parameter semantics, so ``lr(t)`` equals what ``torch.optim.lr_scheduler.<Name>``
gives after ``t`` calls to ``step()``. Every type also accepts ``warmup_num_steps``: a linear
ramp ``lr * (t + 1) / W`` in front, after which the schedule starts at its own step 0.

They are handed to ``deepspeed.initialize`` as a callable that receives the base optimizer,
which works under every ZeRO stage and bf16 (DeepSpeed's own fallback to torch schedulers by
name hands them the wrapped optimizer and fails there).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEEPSPEED_TYPES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest")

# name -> (required params, optional params with defaults); "lr" is the optimizer's peak LR.
TOOLKIT_TYPES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "StepLR": (("step_size",), {"gamma": 0.1}),
    "MultiStepLR": (("milestones",), {"gamma": 0.1}),
    "CyclicLR": (
        ("base_lr", "max_lr"),
        {"step_size_up": 2000, "step_size_down": None, "mode": "triangular", "gamma": 1.0},
    ),
    "CosineAnnealingWarmRestarts": (("T_0",), {"T_mult": 1, "eta_min": 0.0}),
    "WarmupStableDecay": (
        ("total_num_steps",),
        {"decay_num_steps": None, "decay_fraction": 0.1, "min_lr": 0.0, "decay_type": "linear"},
    ),
}
COMMON = {"warmup_num_steps": 0}


def warmup_cosine(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``.

    ``step`` is the number of optimizer steps already taken; the value is the LR of the next one.
    With warmup W, optimizer step s (1-based) trains at ``lr * s / W`` up to step W, so the first
    step already learns (at lr/W) and step W is at the peak; W = 0 is no warmup (step 1 at ``lr``).
    DeepSpeed's WarmupLR/WarmupCosineLR differ: steps 1 and 2 at their minimum, and at least 2.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def step_lr(t: int, lr: float, step_size: int, gamma: float = 0.1) -> float:
    return lr * gamma ** (t // step_size)


def multistep_lr(t: int, lr: float, milestones: list[int], gamma: float = 0.1) -> float:
    return lr * gamma ** bisect.bisect_right(sorted(milestones), t)


def cyclic_lr(
    t: int,
    base_lr: float,
    max_lr: float,
    step_size_up: int = 2000,
    step_size_down: int | None = None,
    mode: str = "triangular",
    gamma: float = 1.0,
) -> float:
    """torch.optim.lr_scheduler.CyclicLR (scale_mode by mode, as PyTorch defaults it)."""
    down = step_size_up if step_size_down is None else step_size_down
    total = step_size_up + down
    ratio = step_size_up / total
    cycle = math.floor(1 + t / total)
    x = 1.0 + t / total - cycle
    scale = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
    height = (max_lr - base_lr) * scale
    if mode == "triangular":
        return base_lr + height
    if mode == "triangular2":
        return base_lr + height * (1 / (2.0 ** (cycle - 1)))
    if mode == "exp_range":
        return base_lr + height * gamma**t
    raise ValueError(f"CyclicLR mode must be triangular, triangular2 or exp_range (got {mode!r})")


def cosine_warm_restarts(t: int, lr: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0) -> float:
    """torch.optim.lr_scheduler.CosineAnnealingWarmRestarts, closed form."""
    if T_mult == 1:
        t_cur, t_i = t % T_0, T_0
    else:
        n = int(math.log(t / T_0 * (T_mult - 1) + 1, T_mult)) if t >= T_0 else 0
        t_cur = t - T_0 * (T_mult**n - 1) / (T_mult - 1)
        t_i = T_0 * T_mult**n
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


def warmup_stable_decay(
    t: int,
    lr: float,
    total_num_steps: int,
    decay_num_steps: int | None = None,
    decay_fraction: float = 0.1,
    min_lr: float = 0.0,
    decay_type: str = "linear",
) -> float:
    """Constant ``lr`` then a cooldown to ``min_lr`` over the last ``decay_num_steps`` (WSD; MiniCPM,
    Hägele et al. 2024).

    ``t`` counts from the end of the warmup; ``total_num_steps`` is the whole run, so the caller
    passes the run length minus the warmup.
    """
    decay = decay_num_steps if decay_num_steps is not None else int(round(decay_fraction * total_num_steps))
    start = total_num_steps - decay
    if t < start or decay <= 0:
        return lr
    progress = min(1.0, (t - start) / decay)
    if decay_type == "linear":
        return lr + (min_lr - lr) * progress
    if decay_type == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    raise ValueError(f"WarmupStableDecay decay_type must be linear or cosine (got {decay_type!r})")


def check_params(kind: str, params: dict) -> list[str]:
    """Problems with a toolkit scheduler section, as 'scheduler.params.<key>: ...' lines."""
    required, optional = TOOLKIT_TYPES[kind]
    known = set(required) | set(optional) | set(COMMON)
    problems = [
        f"scheduler.params.{k}: unknown for {kind} (known: {', '.join(sorted(known))})"
        for k in params
        if k not in known
    ]
    problems += [f"scheduler.params.{k}: required by {kind}" for k in required if k not in params]
    if kind == "CyclicLR" and params.get("mode", "triangular") not in ("triangular", "triangular2", "exp_range"):
        problems.append(f"scheduler.params.mode: must be triangular, triangular2 or exp_range (got {params['mode']!r})")
    if kind == "WarmupStableDecay" and params.get("decay_type", "linear") not in ("linear", "cosine"):
        problems.append(f"scheduler.params.decay_type: must be linear or cosine (got {params['decay_type']!r})")
    for k in ("step_size", "T_0", "step_size_up", "total_num_steps"):
        if k in params and (not isinstance(params[k], int) or params[k] <= 0):
            problems.append(f"scheduler.params.{k}: must be a positive integer (got {params[k]!r})")
    w = params.get("warmup_num_steps", 0)
    if not isinstance(w, int) or w < 0:
        problems.append(f"scheduler.params.warmup_num_steps: must be a non-negative integer (got {w!r})")
    return problems


def lr_function(kind: str, params: dict, lr: float) -> Callable[[int], float]:
    """lr(t) for a toolkit scheduler section: ``t`` optimizer steps taken -> LR of the next step."""
    params = dict(params)
    warmup = int(params.pop("warmup_num_steps", 0))
    required, optional = TOOLKIT_TYPES[kind]
    kw = {**optional, **params}
    if kind == "StepLR":
        inner = lambda t: step_lr(t, lr, kw["step_size"], kw["gamma"])  # noqa: E731
        peak = lr
    elif kind == "MultiStepLR":
        inner = lambda t: multistep_lr(t, lr, kw["milestones"], kw["gamma"])  # noqa: E731
        peak = lr
    elif kind == "CyclicLR":
        inner = lambda t: cyclic_lr(
            t,
            kw["base_lr"],
            kw["max_lr"],
            kw["step_size_up"],
            kw["step_size_down"],  # noqa: E731
            kw["mode"],
            kw["gamma"],
        )
        peak = kw["base_lr"]  # PyTorch's CyclicLR starts each cycle at base_lr
    elif kind == "CosineAnnealingWarmRestarts":
        inner = lambda t: cosine_warm_restarts(t, lr, kw["T_0"], kw["T_mult"], kw["eta_min"])  # noqa: E731
        peak = lr
    elif kind == "WarmupStableDecay":
        # total_num_steps and decay_fraction refer to the whole run, warmup included.
        decay = kw["decay_num_steps"]
        if decay is None:
            decay = int(round(kw["decay_fraction"] * kw["total_num_steps"]))
        total = kw["total_num_steps"] - warmup
        inner = lambda t: warmup_stable_decay(t, lr, total, decay, 0.0, kw["min_lr"], kw["decay_type"])  # noqa: E731
        peak = lr
    else:
        raise ValueError(f"unknown scheduler type {kind!r}")
    if warmup <= 0:
        return inner
    return lambda t: peak * (t + 1) / warmup if t < warmup else inner(t - warmup)


def lambda_scheduler(optimizer, fn: Callable[[int], float]):
    """A torch LambdaLR that sets every group's LR to ``fn(step)`` (``fn`` returns an absolute LR).

    LambdaLR multiplies a base LR by the lambda's value, so the base is pinned to 1.0.
    Its state (last_epoch) is saved in DeepSpeed checkpoints, so a resumed run continues exactly.
    It also takes the state of DeepSpeed's own schedulers (``last_batch_iteration``, steps taken - 1):
    the shipped configs named DeepSpeed's WarmupCosineLR before, and their runs must still resume.
    """
    import torch

    class AbsoluteLambdaLR(torch.optim.lr_scheduler.LambdaLR):
        def load_state_dict(self, state_dict: dict) -> None:
            if "last_epoch" in state_dict or "last_batch_iteration" not in state_dict:
                return super().load_state_dict(state_dict)
            taken = int(state_dict["last_batch_iteration"]) + 1
            self.last_epoch, self._step_count = taken, taken + 1
            self._last_lr = [fn(taken)] * len(self.optimizer.param_groups)
            for group in self.optimizer.param_groups:
                group["lr"] = fn(taken)

    for group in optimizer.param_groups:
        group["lr"] = 1.0
        group["initial_lr"] = 1.0
    return AbsoluteLambdaLR(optimizer, fn)


def scale_lr(lr: float, batch: int, reference: int, rule: str) -> float:
    """Peak LR for a global batch other than the one it was tuned at.

    linear: lr x B/B_ref (Goyal et al. 2017, for SGD); sqrt: lr x sqrt(B/B_ref) (Krizhevsky 2014;
    Malladi et al. 2022 for Adam); none: unchanged.
    """
    if rule == "none" or batch == reference:
        return lr
    k = batch / reference
    if rule == "linear":
        return lr * k
    if rule == "sqrt":
        return lr * math.sqrt(k)
    raise ValueError(f"unknown LR scaling rule {rule!r}")


def scale_warmup(steps: int, batch: int, reference: int) -> int:
    """Warmup steps that cover the same number of samples at another global batch."""
    return max(0, int(round(steps * reference / batch)))


@dataclass(frozen=True)
class Optimization:
    """The schedule's numbers as a run uses them: the recipe's, scaled to the run's global batch
    when the recipe asks for it (``training.lr_scaling``). Derived, never written back into the recipe."""

    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    note: str | None = None  # what was scaled, for the log; None when nothing was

    def to_dict(self) -> dict:
        return {"lr": self.lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps, "max_steps": self.max_steps}


def effective_optimization(training, global_batch: int | None) -> Optimization:
    """The recipe's training section (lr, min_lr, warmup_steps, max_steps, lr_scaling,
    reference_batch_size, scale_warmup) at a global batch of ``global_batch`` sequences."""
    tr = training
    lr, min_lr, warmup = tr.lr, tr.min_lr, tr.warmup_steps
    ref = tr.reference_batch_size
    if tr.lr_scaling == "none" or ref is None or not isinstance(global_batch, int):
        return Optimization(lr, min_lr, warmup, tr.max_steps)
    new_lr, new_min = scale_lr(lr, global_batch, ref, tr.lr_scaling), scale_lr(min_lr, global_batch, ref, tr.lr_scaling)
    note = (
        f"global batch {global_batch} vs reference {ref}: {tr.lr_scaling} scaling, lr {lr:g} -> {new_lr:g}, "
        f"min_lr {min_lr:g} -> {new_min:g}"
    )
    if tr.scale_warmup:
        new_warmup = scale_warmup(warmup, global_batch, ref)
        note += f", warmup_steps {warmup} -> {new_warmup}"
        warmup = new_warmup
    return Optimization(new_lr, new_min, warmup, tr.max_steps, note)


def lrs_for_config(ds: dict, lr: float, min_lr: float, warmup_steps: int, max_steps: int, steps: int) -> list[float]:
    """The LR of each of ``steps`` optimizer steps under a resolved DeepSpeed config, the way a run would use it:
    DeepSpeed's own types through DeepSpeed's classes, the toolkit's through ``lr_function``."""
    import torch

    sched = ds.get("scheduler")
    if sched is None:
        fn = lambda t: warmup_cosine(t, lr, min_lr, warmup_steps, max_steps)  # noqa: E731
    elif sched.get("type") in TOOLKIT_TYPES:
        fn = lr_function(sched["type"], sched.get("params", {}), lr)
    else:
        from deepspeed.runtime import lr_schedules

        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=lr)
        ds_sched = getattr(lr_schedules, sched["type"])(opt, **sched.get("params", {}))
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            ds_sched.step()
        return out
    return [fn(t) for t in range(steps)]
