"""Warmup as configured: the first optimizer step trains at lr/W (lr with no warmup), under every shipped
DeepSpeed config, in the schedule functions and in a real engine's first step."""

import json
from pathlib import Path

import pytest
import torch

from pretrain.run.config import parse_recipe
from pretrain.run.ds_config import resolve_ds_config
from pretrain.run.schedules import lambda_scheduler, lrs_for_config, warmup_cosine
from tests.launch import REPO, world_of_one

SHIPPED = sorted((REPO / "ds_configs").glob("*.json"))


def test_warmup_cosine_first_step_is_lr_over_w_and_zero_warmup_is_none():
    assert warmup_cosine(0, 1.0, 0.1, 4, 100) == pytest.approx(0.25)
    assert [warmup_cosine(t, 1.0, 0.1, 4, 100) for t in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert warmup_cosine(0, 1.0, 0.1, 0, 100) == 1.0, "warmup_steps 0: step 1 at the peak"
    assert warmup_cosine(1, 1.0, 0.1, 0, 100) < 1.0, "then the cosine"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.parametrize("warmup", [20, 0])
def test_every_shipped_config_trains_step_one_at_lr_over_w(path, warmup):
    recipe = parse_recipe({"training": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": warmup, "max_steps": 100}})
    ds, notes = resolve_ds_config(json.loads(path.read_text()), recipe, 2, 64, str(path))
    lrs = lrs_for_config(ds, 1e-3, 1e-4, warmup, 100, 25)
    if warmup:
        assert lrs[:3] == pytest.approx([1e-3 / 20, 2e-3 / 20, 3e-3 / 20]) and lrs[19] == pytest.approx(1e-3)
    else:
        assert lrs[0] == pytest.approx(1e-3) and lrs[1] < 1e-3
    assert not any("scheduler" in n for n in notes)


def test_a_deepspeed_warmup_scheduler_is_noted():
    recipe = parse_recipe({"training": {"warmup_steps": 0}})
    ds = {"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}}}
    _, notes = resolve_ds_config(ds, recipe, 1, 8)
    assert any("WarmupCosineLR" in n and "max(2, warmup_num_steps) = 2" in n for n in notes)


def test_a_run_saved_under_deepspeeds_warmup_cosine_resumes_on_the_toolkit_schedule():
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    p = torch.nn.Parameter(torch.zeros(1))
    old = WarmupCosineLR(torch.optim.SGD([p], lr=1e-3), total_num_steps=100, warmup_num_steps=10, warmup_type="linear")
    for _ in range(5):
        old.step()
    fn = lambda t: warmup_cosine(t, 1e-3, 1e-4, 10, 100)  # noqa: E731
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = lambda_scheduler(opt, fn)
    sched.load_state_dict(old.state_dict())
    assert sched.last_epoch == 5 and opt.param_groups[0]["lr"] == pytest.approx(fn(5))
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(fn(6))
    again = lambda_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), fn)
    again.load_state_dict(sched.state_dict())
    assert again.last_epoch == 6, "its own state as before"


# ------------------------------------------------------------------------------- a real engine's first step


@pytest.fixture(scope="module")
def world():
    with world_of_one():
        yield


def _bias_shift(trainer) -> float:
    """The largest change of a bias (not decayed) in one AdamW step: lr x |g| / (|g| + eps), i.e. the step's LR."""
    from deepspeed.utils import safe_get_full_fp32_param

    names = [n for n, _ in trainer.engine.module.named_parameters() if n.endswith(".bias")]
    params = dict(trainer.engine.module.named_parameters())
    before = {n: safe_get_full_fp32_param(params[n]).clone() for n in names}
    out = trainer.train_step(log=False)
    shift = max(float((safe_get_full_fp32_param(params[n]) - before[n]).abs().max()) for n in names)
    return out["lr"], shift


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["ds_configs/zero2_fp32.json", "ds_configs/zero1_bf16.json"])
@pytest.mark.parametrize("warmup", [20, 0])
def test_the_first_optimizer_step_of_a_real_engine_trains_at_lr_over_w(
    world, prepared_stdlib, tmp_path, ds_config, warmup
):
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    r = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    # a written precision must agree with the config's (gpt-tiny writes fp32)
    r["training"].update(warmup_steps=warmup, grad_clip=0.0, precision="bf16" if "bf16" in ds_config else "fp32")
    recipe = Path(tmp_path / "recipe.json")
    recipe.write_text(json.dumps(r))
    args = build_parser().parse_args(
        [
            "--config",
            str(recipe),
            "--data",
            str(prepared_stdlib),
            "--deepspeed_config",
            ds_config,
            "--output-dir",
            str(tmp_path / "run"),
            "--max-steps",
            "50",
            "--eval-every",
            "0",
            "--checkpoint-every",
            "0",
            "--no-progress",
        ]
    )
    trainer = Trainer(*prepare(args), args.resume, progress=False)
    trainer.setup()
    expected = 2e-3 / warmup if warmup else 2e-3
    lr, shift = _bias_shift(trainer)
    assert lr == pytest.approx(expected), "the LR the optimizer holds for step 1"
    assert shift == pytest.approx(expected, rel=1e-2), "the update step 1 made"
    lr2, _ = _bias_shift(trainer)
    assert lr2 == pytest.approx(2 * expected if warmup else warmup_cosine(1, 2e-3, 2e-4, 0, 50))
