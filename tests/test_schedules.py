"""Each toolkit schedule against PyTorch's scheduler of the same name, step by step."""

import math

import pytest
import torch
from torch.optim import lr_scheduler as tls

from pretrain.run.schedules import (
    TOOLKIT_TYPES,
    check_params,
    lambda_scheduler,
    lr_function,
    scale_lr,
    scale_warmup,
    warmup_cosine,
    warmup_stable_decay,
)

LR = 0.5
STEPS = 120


def torch_lrs(make, steps=STEPS, lr=LR, momentum=False):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr, momentum=0.9 if momentum else 0.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


CASES = {
    "StepLR": ({"step_size": 7, "gamma": 0.5}, lambda o: tls.StepLR(o, 7, 0.5)),
    "MultiStepLR": (
        {"milestones": [10, 30, 31, 80], "gamma": 0.3},
        lambda o: tls.MultiStepLR(o, [10, 30, 31, 80], 0.3),
    ),
    "CyclicLR-triangular": (
        {"base_lr": 0.01, "max_lr": 0.4, "step_size_up": 9, "step_size_down": 5},
        lambda o: tls.CyclicLR(o, 0.01, 0.4, 9, 5, cycle_momentum=False),
    ),
    "CyclicLR-triangular2": (
        {"base_lr": 0.01, "max_lr": 0.4, "step_size_up": 6, "mode": "triangular2"},
        lambda o: tls.CyclicLR(o, 0.01, 0.4, 6, mode="triangular2", cycle_momentum=False),
    ),
    "CyclicLR-exp_range": (
        {"base_lr": 0.01, "max_lr": 0.4, "step_size_up": 6, "mode": "exp_range", "gamma": 0.98},
        lambda o: tls.CyclicLR(o, 0.01, 0.4, 6, mode="exp_range", gamma=0.98, cycle_momentum=False),
    ),
    "CosineAnnealingWarmRestarts": (
        {"T_0": 10, "T_mult": 1, "eta_min": 0.01},
        lambda o: tls.CosineAnnealingWarmRestarts(o, 10, 1, 0.01),
    ),
    "CosineAnnealingWarmRestarts-mult2": (
        {"T_0": 5, "T_mult": 2, "eta_min": 0.0},
        lambda o: tls.CosineAnnealingWarmRestarts(o, 5, 2, 0.0),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_pytorch_step_by_step(case):
    params, make = CASES[case]
    kind = case.split("-")[0]
    assert check_params(kind, params) == []
    ours = [lr_function(kind, params, LR)(t) for t in range(STEPS)]
    assert ours == pytest.approx(torch_lrs(make), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", ["StepLR", "CosineAnnealingWarmRestarts", "MultiStepLR"])
def test_warmup_in_front_equals_pytorch_sequential_linear_then_schedule(case):
    params, make = CASES[case]
    kind, w = case.split("-")[0], 8
    ours = [lr_function(kind, {**params, "warmup_num_steps": w}, LR)(t) for t in range(STEPS)]
    ref = torch_lrs(lambda o: tls.SequentialLR(o, [tls.LinearLR(o, 1 / w, 1.0, w - 1), make(o)], milestones=[w]))
    assert ours == pytest.approx(ref, rel=1e-9)


def test_lambda_scheduler_drives_a_real_optimizer_with_absolute_lrs():
    fn = lr_function("StepLR", {"step_size": 3, "warmup_num_steps": 2}, 0.2)
    assert torch_lrs(lambda o: lambda_scheduler(o, fn), steps=10, lr=123.0) == pytest.approx([fn(t) for t in range(10)])


def test_warmup_stable_decay_shape():
    f = lr_function(
        "WarmupStableDecay",
        {"total_num_steps": 100, "warmup_num_steps": 10, "decay_fraction": 0.2, "min_lr": 0.05},
        1.0,
    )
    lrs = [f(t) for t in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert set(lrs[10:81]) == {1.0}, "stable until the last 20% of the 100-step run"
    assert lrs[90] == pytest.approx(1.0 - 0.95 * 0.5) and lrs[100] == pytest.approx(0.05) and lrs[81] < 1.0
    assert warmup_stable_decay(50, 1.0, 100, decay_num_steps=20, decay_type="cosine") == 1.0
    assert warmup_stable_decay(90, 1.0, 100, decay_num_steps=20, decay_type="cosine") == pytest.approx(0.5)


def test_warmup_then_cosine_endpoints():
    lrs = [warmup_cosine(s, 1.0, 0.1, 10, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "monotone decay after warmup"


def test_bad_params_are_named():
    assert any("step_size: required" in p for p in check_params("StepLR", {}))
    assert any("gama: unknown" in p for p in check_params("StepLR", {"step_size": 3, "gama": 0.1}))
    assert any("mode" in p for p in check_params("CyclicLR", {"base_lr": 0, "max_lr": 1, "mode": "sine"}))
    assert set(TOOLKIT_TYPES) >= {
        "StepLR",
        "MultiStepLR",
        "CyclicLR",
        "CosineAnnealingWarmRestarts",
        "WarmupStableDecay",
    }


def test_batch_scaling_arithmetic():
    assert scale_lr(3e-4, 512, 256, "linear") == pytest.approx(6e-4)
    assert scale_lr(3e-4, 1024, 256, "sqrt") == pytest.approx(6e-4)
    assert scale_lr(3e-4, 64, 256, "sqrt") == pytest.approx(1.5e-4)
    assert scale_lr(3e-4, 1024, 256, "none") == 3e-4
    assert scale_warmup(2000, 1024, 256) == 500 and scale_warmup(100, 64, 256) == 400
