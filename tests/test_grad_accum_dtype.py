"""bf16 runs accumulate gradients in fp32 by default: shipped in the bf16 configs, filled when a bf16 config leaves
data_types.grad_accum_dtype unset, an explicit value kept. ZeRO-2/3 only: DeepSpeed 0.19 refuses it under ZeRO-0, and
under ZeRO-1 it switches to BF16_Optimizer, whose checkpoints its zero_to_fp32 (eval, export) cannot read."""

import json

import pytest
import torch

from pretrain.run.config import parse_recipe
from pretrain.run.ds_config import resolve_ds_config
from tests.launch import REPO, world_of_one

BF16 = parse_recipe({"training": {"precision": "bf16"}})


def _resolve(ds: dict, recipe=BF16) -> tuple[dict, list[str]]:
    return resolve_ds_config(ds, recipe, 1, 8)


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*bf16*.json")), ids=lambda p: p.name)
def test_shipped_bf16_configs_accumulate_in_fp32_where_deepspeed_allows(path):
    ds = json.loads(path.read_text())
    stage = ds["zero_optimization"]["stage"]
    assert ds.get("data_types", {}).get("grad_accum_dtype") == ("fp32" if stage >= 2 else None)
    resolved, _ = _resolve(ds)
    assert resolved.get("data_types", {}).get("grad_accum_dtype") == ("fp32" if stage >= 2 else None)


@pytest.mark.parametrize("stage", [2, 3])
def test_an_unset_grad_accum_dtype_is_filled_with_fp32_and_said(stage):
    raw = {"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": stage}}
    ds, notes = _resolve(raw)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and "data_types" not in raw
    assert any(n.startswith("data_types.grad_accum_dtype: fp32") for n in notes)
    ds, _ = _resolve(
        {"bf16": {"enabled": True}, "zero_optimization": {"stage": stage}, "data_types": {"grad_accum_dtype": "auto"}}
    )
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}


def test_an_explicit_value_fp32_runs_zero0_zero1_and_other_precisions_are_left_alone():
    ds, notes = _resolve(
        {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "bf16"}}
    )
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"} and not any("grad_accum" in n for n in notes)
    for stage in (0, 1):
        ds, notes = _resolve(
            {"bf16": {"enabled": True}, "zero_optimization": {"stage": stage}, "gradient_accumulation_steps": 4}
        )
        assert "data_types" not in ds and any(f"left bf16 under ZeRO-{stage}" in n for n in notes)
        ds, _ = _resolve(
            {
                "bf16": {"enabled": True},
                "zero_optimization": {"stage": stage},
                "data_types": {"grad_accum_dtype": "auto"},
            }
        )
        assert ds["data_types"] == {"grad_accum_dtype": "bf16"}
    fp32 = parse_recipe({"training": {"precision": "fp32"}})
    ds, notes = _resolve({"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}, fp32)
    assert "data_types" not in ds and not any("grad_accum" in n for n in notes)


def test_deepspeed_accepts_the_filled_configs_and_accumulates_in_fp32():
    import deepspeed

    with world_of_one():
        for stage in (0, 1, 2, 3):
            ds, _ = _resolve(
                {
                    "bf16": {"enabled": "auto"},
                    "zero_optimization": {"stage": stage},
                    "gradient_accumulation_steps": 2,
                    "train_micro_batch_size_per_gpu": 2,
                }
            )
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
            engine, *_ = deepspeed.initialize(
                model=model, optimizer=torch.optim.AdamW(model.parameters()), config={**ds, "steps_per_print": 10**9}
            )
            assert engine.get_data_types() == (torch.bfloat16, torch.float32 if stage >= 2 else torch.bfloat16), stage
            for _ in range(2):
                engine.backward(engine(torch.randn(2, 8, dtype=torch.bfloat16)).float().pow(2).mean())
                engine.step()
            assert engine.global_steps == 1 and engine.skipped_steps == 0
            engine.destroy()


@pytest.mark.parametrize("path", sorted((REPO / "pretrain/recipes").glob("*.json")), ids=lambda p: p.stem)
def test_no_shipped_recipe_accumulates_gradients_in_bf16(path):
    """A recipe that accumulates (gradient_accumulation_steps > 1) in bf16 ships a ZeRO-2/3 config, where
    the gradients are summed in fp32 (gpt2-124m used ZeRO-1 and summed 4 micro-batches in bf16)."""
    recipe = json.loads(path.read_text())
    ds, _ = resolve_ds_config(
        json.loads((REPO / recipe["deepspeed_config"]).read_text()), parse_recipe(recipe), 8, 1024
    )
    if ds.get("gradient_accumulation_steps", 1) > 1 and ds.get("bf16", {}).get("enabled") is True:
        assert ds.get("data_types", {}).get("grad_accum_dtype") == "fp32", recipe["deepspeed_config"]
