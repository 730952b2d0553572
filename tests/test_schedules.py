import math

import pytest
import torch

from pretrain.schedules import lambda_scheduler, warmup_cosine


def test_warmup_then_cosine_endpoints():
    lrs = [warmup_cosine(s, 1.0, 0.1, 10, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "monotone decay after warmup"


def test_lambda_scheduler_drives_a_real_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=123.0)
    sched = lambda_scheduler(opt, lambda s: warmup_cosine(s, 0.5, 0.0, 4, 20), 0.5)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([warmup_cosine(s, 0.5, 0.0, 4, 20) for s in range(6)])
