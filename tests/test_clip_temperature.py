"""CLIP's learnable temperature is bounded after each optimizer step (OpenCLIP's clamp), not inside the
forward, where the clamp zeroed the gradient above the bound so a parameter that crossed it never came
back; exports carry the bounded value (issue 22 item 5). Real DeepSpeed engines in one process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.launch import REPO
from tests.launch import world_of_one as launch_world_of_one

BOUND = math.log(100.0)


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    with launch_world_of_one():
        yield


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from data_pipelines.image.synthetic import main

    out = tmp_path_factory.mktemp("clip") / "shapes"
    assert main(["--output", str(out), "--count", "200", "--image-size", "32", "--no-progress"]) == 0
    return out


def _trainer(tmp_path: Path, data: Path, ds: str):
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    recipe = json.loads((REPO / "pretrain/recipes/clip-tiny.json").read_text())
    recipe["model"]["logit_scale_init"] = 5.0  # above ln(100), as a run that crossed the bound is
    recipe["model"]["zero3_init"] = False
    recipe["training"].update(micro_batch_size=8, warmup_steps=0)
    (tmp_path / f"{ds}.json").write_text(json.dumps(recipe))
    args = build_parser().parse_args(
        [
            "--config",
            str(tmp_path / f"{ds}.json"),
            "--deepspeed_config",
            str(REPO / f"ds_configs/{ds}.json"),
            "--data",
            str(data),
            "--output-dir",
            str(tmp_path / ds),
            "--eval-every",
            "0",
            "--checkpoint-every",
            "0",
            "--no-progress",
        ]
    )
    trainer = Trainer(*prepare(args), "none", progress=False)
    trainer.setup()
    return trainer


@pytest.mark.parametrize("ds", ["zero0_fp32", "zero2_fp32", "zero3_fp32"])
def test_the_temperature_is_bounded_after_each_step_on_the_weights_and_the_master_copy(shapes, tmp_path, ds):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    trainer = _trainer(tmp_path, shapes, ds)
    param = trainer.engine.module.clip.logit_scale
    for _ in range(2):
        trainer.train_step(log=False)
        with deepspeed.zero.GatheredParameters([param]):
            assert float(param.detach().reshape(())) <= BOUND + 1e-6
        master = safe_get_full_fp32_param(param)
        assert master is None or float(master.reshape(())) <= BOUND + 1e-6


def test_the_temperature_gets_a_gradient_at_its_bound_and_exports_bounded(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from pretrain.models.clip import ContrastiveCLIP, to_hf

    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 8,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        projection_dim=16,
        logit_scale_init_value=5.0,
    )
    model = ContrastiveCLIP(CLIPModel(config))
    g = torch.Generator().manual_seed(0)
    loss = model(
        pixel_values=torch.randn(4, 3, 16, 16, generator=g),
        input_ids=torch.randint(0, 64, (4, 8), generator=g),
        attention_mask=torch.ones(4, 8, dtype=torch.long),
    )
    loss.backward()
    assert float(model.clip.logit_scale.grad.abs().sum()) > 0, "above the bound the temperature still learns"
    model.clamp_logit_scale()
    assert float(model.clip.logit_scale) == pytest.approx(BOUND)
    model.clip.logit_scale.data.fill_(5.0)
    assert float(to_hf(model).logit_scale) == pytest.approx(BOUND), "CLIPModel does not clamp: the export is bounded"


@pytest.mark.slow
def test_the_temperature_is_bounded_under_zero3_on_two_ranks(shapes, tmp_path):
    """A 1-element parameter is smaller than a 2-rank ZeRO-3 partition: each rank bounds its own part."""
    from tests.launch import deepspeed_cmd, metrics, run

    recipe = json.loads((REPO / "pretrain/recipes/clip-tiny.json").read_text())
    recipe["model"].update(logit_scale_init=5.0, zero3_init=False)
    recipe["training"].update(micro_batch_size=8, warmup_steps=0, log_every=1)
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    out = tmp_path / "z3"
    args = [
        "--config",
        str(tmp_path / "r.json"),
        "--data",
        str(shapes),
        "--deepspeed_config",
        str(REPO / "ds_configs/zero3_fp32.json"),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--eval-every",
        "0",
        "--no-progress",
    ]
    run(deepspeed_cmd(2, args), timeout=300)
    assert [m["step"] for m in metrics(out)[0]] == [1, 2]
    from pretrain.run.build import load_model

    assert float(load_model(str(out)).model.clip.logit_scale.reshape(())) <= BOUND + 1e-6
