"""What a step optimises does not depend on how its batch is split: the summed token losses of all
micro-batches (and replicas) over the step's trained tokens, for pretraining text and for chat data
whose windows train very different numbers of tokens. In one process (a gloo world of one, real
DeepSpeed engines), and across 2 ranks through the launcher (tests/objective_ranks.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipelines.text.packed import IGNORE_INDEX
from tests.launch import REPO, deepspeed_cmd, run
from tests.launch import world_of_one as launch_world_of_one
from tests.objective_ranks import CHAT_TRAINED, one_step, windows


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    with launch_world_of_one():
        yield


def _argv(tmp_path: Path, data: Path, micro: int, gas: int, ds: str, name: str = "") -> list[str]:
    recipe = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    recipe["training"].update(micro_batch_size=micro, gradient_accumulation_steps=gas, warmup_steps=0)
    path = tmp_path / f"recipe-{micro}x{gas}-{ds}{name}.json"
    path.write_text(json.dumps(recipe))
    return [
        "--config",
        str(path),
        "--deepspeed_config",
        str(REPO / f"ds_configs/{ds}.json"),
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / path.stem),
        "--eval-every",
        "0",
        "--checkpoint-every",
        "0",
    ]


def _trainer(tmp_path: Path, data: Path, micro: int, gas: int, ds: str):
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    args = build_parser().parse_args([*_argv(tmp_path, data, micro, gas, ds), "--no-progress"])
    resolved, inputs, run_dir = prepare(args)
    trainer = Trainer(resolved, inputs, run_dir, "none", progress=False)
    trainer.setup()
    return trainer


@pytest.mark.parametrize("ds", ["zero0_fp32", "zero2_fp32"])
# [0, 8]: a window whose assistant turn was cut away trains nothing and dilutes nothing
@pytest.mark.parametrize(
    "trained", [None, CHAT_TRAINED, [0, 8]], ids=["text", "chat-1-and-8-tokens", "chat-0-and-8-tokens"]
)
def test_one_step_is_the_same_for_micro_2_and_for_micro_1_accumulated_twice(prepared_stdlib, tmp_path, ds, trained):
    seq_len = json.loads((prepared_stdlib / "manifest.json").read_text())["seq_len"]
    rows = windows(seq_len, trained)
    if trained:
        assert [int(n) for n in (rows["labels"] != IGNORE_INDEX).sum(dim=1)] == trained
    whole, grads, weights = one_step(_trainer(tmp_path, prepared_stdlib, 2, 1, ds), rows)
    split, grads_split, weights_split = one_step(_trainer(tmp_path, prepared_stdlib, 1, 2, ds), rows)
    # the same loss (over the step's trained tokens, as the val loss is over the split's) and gradient
    _same_step((whole, grads), (split, grads_split))
    # Adam's first update is about lr x sign(g): an element whose gradient is ~0 may go either way
    moved = sum(int((weights_split[k] - w).abs().gt(1e-6).sum()) for k, w in weights.items())
    assert moved <= 1e-4 * sum(w.numel() for w in weights.values()), f"{moved} weights differ"


def test_the_logged_loss_is_the_token_mean_of_the_step(prepared_stdlib, tmp_path):
    from pretrain.models import gpt

    seq_len = json.loads((prepared_stdlib / "manifest.json").read_text())["seq_len"]
    rows = windows(seq_len, CHAT_TRAINED)
    trainer = _trainer(tmp_path, prepared_stdlib, 1, 2, "zero2_fp32")
    with torch.no_grad():
        per_token = gpt.token_losses(trainer.engine, rows)
    expected = float(per_token.sum() / (rows["labels"] != IGNORE_INDEX).sum())
    out, _, _ = one_step(trainer, rows)
    assert out["loss"] == pytest.approx(expected, rel=1e-6)


def _same_step(a, b) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert out_b["loss"] == pytest.approx(out_a["loss"], rel=1e-6)
    assert out_b["grad_norm"] == pytest.approx(out_a["grad_norm"], rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name, g in grads_a.items():
        assert float((grads_b[name] - g).norm()) <= 1e-6 * float(g.norm()) + 1e-12, name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "chat"])
def test_one_step_on_two_ranks_is_micro_2_on_one(prepared_stdlib, tmp_path, kind):
    """(micro 1, accumulation 1, 2 ranks) against (micro 2, accumulation 1, 1 rank), ZeRO-2."""
    seq_len = json.loads((prepared_stdlib / "manifest.json").read_text())["seq_len"]
    out, grads, _ = one_step(
        _trainer(tmp_path, prepared_stdlib, 2, 1, "zero2_fp32"),
        windows(seq_len, CHAT_TRAINED if kind == "chat" else None),
    )
    saved = tmp_path / "ranks.pt"
    run(
        deepspeed_cmd(
            2,
            [saved.as_posix(), kind, "--", *_argv(tmp_path, prepared_stdlib, 1, 1, "zero2_fp32", "-2r")],
            script=str(REPO / "tests" / "objective_ranks.py"),
        ),
        timeout=300,
    )
    ranks = torch.load(saved, weights_only=False)
    _same_step((out, grads), (ranks["out"], ranks["grads"]))
