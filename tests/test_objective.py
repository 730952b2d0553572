"""What a step optimises does not depend on how its batch is split: the summed token losses of all
micro-batches (and replicas) over the step's trained tokens, for pretraining text and for chat data
whose windows train very different numbers of tokens; for CLIP, the contrastive loss of every pair
against all the step's pairs. In one process (a gloo world of one, real DeepSpeed engines), and
across 2 ranks through the launcher (tests/objective_ranks.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipelines.text.packed import IGNORE_INDEX
from tests.launch import REPO, deepspeed_cmd, run
from tests.launch import world_of_one as launch_world_of_one
from tests.objective_ranks import CHAT_TRAINED, one_step, rows_of, windows


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    with launch_world_of_one():
        yield


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from data_pipelines.image.synthetic import main

    out = tmp_path_factory.mktemp("clip") / "shapes"
    assert main(["--output", str(out), "--count", "64", "--image-size", "32", "--no-progress"]) == 0
    return out


def _argv(
    tmp_path: Path, data: Path, micro: int, gas: int, ds: str, name: str = "", recipe_name="gpt-tiny", **model
) -> list[str]:
    recipe = json.loads((REPO / f"pretrain/recipes/{recipe_name}.json").read_text())
    recipe["training"].update(micro_batch_size=micro, gradient_accumulation_steps=gas, warmup_steps=0)
    recipe["model"].update(zero3_init=False, **model)
    path = tmp_path / f"{recipe_name}-{micro}x{gas}-{ds}{name}.json"
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


def _trainer(tmp_path: Path, data: Path, micro: int, gas: int, ds: str, recipe_name: str = "gpt-tiny", **model):
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    argv = _argv(tmp_path, data, micro, gas, ds, "", recipe_name, **model)
    args = build_parser().parse_args([*argv, "--no-progress"])
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


@pytest.mark.parametrize(
    "ds, model",
    [
        ("zero0_fp32", {}),
        ("zero2_fp32", {}),
        ("zero3_fp32", {}),
        ("zero2_fp32", {"freeze": ["vision"]}),  # locked-image tuning
        ("zero2_fp32", {"lora": {"r": 4, "alpha": 8}}),  # adapters on a pretrained CLIP (init_from)
        ("zero2_fp32", {"dropout": 0.2}),  # the cached pass and the live one draw the same masks
    ],
    ids=["zero0", "zero2", "zero3", "frozen-vision", "lora", "dropout"],
)
def test_clip_sees_the_whole_step_as_one_contrastive_batch(shapes, tmp_path, ds, model):
    """(micro 4, accumulation 1) = (micro 2, accumulation 2) = (micro 1, accumulation 4): every pair is
    scored against all four, so the loss, the gradient and the update are one batch's."""
    if "lora" in model:  # a pretrained CLIP to adapt: one built by a run, saved as Hugging Face writes it
        from pretrain.models import clip

        clip.to_hf(_trainer(tmp_path, shapes, 4, 1, ds, "clip-tiny").engine.module).save_pretrained(tmp_path / "init")
        model = {**model, "init_from": str(tmp_path / "init")}
    whole = _trainer(tmp_path, shapes, 4, 1, ds, "clip-tiny", **model)
    rows = rows_of("clip", whole)
    out, grads, weights = one_step(whole, rows)
    for micro, gas in ((2, 2), (1, 4)):
        trainer = _trainer(tmp_path, shapes, micro, gas, ds, "clip-tiny", **model)
        split, grads_split, weights_split = one_step(trainer, rows)
        if "dropout" in model:
            # other masks than the one-batch run's; but each micro-batch, run again with gradients,
            # drew the masks of its cached pass: its loss is the one the cache holds
            cached = trainer.step_loss.columns.row_losses().mean()
            assert split["loss"] == pytest.approx(float(cached), rel=1e-6)
            assert split["loss"] != pytest.approx(out["loss"], rel=1e-4), "dropout drew no masks"
            continue
        _same_step((out, grads), (split, grads_split))
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
    """The same loss, gradient norm and gradient (fp32: 1e-6 relative over the whole gradient; per
    tensor 1e-5 relative, tensors whose gradient is ~0, such as attention key biases, by the whole's)."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert out_b["loss"] == pytest.approx(out_a["loss"], rel=1e-6)
    assert out_b["grad_norm"] == pytest.approx(out_a["grad_norm"], rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    whole = torch.cat([g.flatten() for g in grads_a.values()]).norm()
    error = torch.cat([(grads_b[k] - g).flatten() for k, g in grads_a.items()]).norm()
    assert float(error) <= 1e-6 * float(whole)
    for name, g in grads_a.items():
        assert float((grads_b[name] - g).norm()) <= 1e-5 * float(g.norm()) + 1e-7 * float(whole), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "chat", "clip"])
def test_one_step_on_two_ranks_is_one_rank_holding_the_whole_batch(prepared_stdlib, shapes, tmp_path, kind):
    """(micro 1, accumulation 1, 2 ranks) against (micro 2, accumulation 1, 1 rank), ZeRO-2; for CLIP
    (micro 1, accumulation 2, 2 ranks) against (micro 4, accumulation 1, 1 rank)."""
    data, recipe = (shapes, "clip-tiny") if kind == "clip" else (prepared_stdlib, "gpt-tiny")
    count = 4 if kind == "clip" else 2
    trainer = _trainer(tmp_path, data, count, 1, "zero2_fp32", recipe)
    out, grads, _ = one_step(trainer, rows_of(kind, trainer))
    saved = tmp_path / "ranks.pt"
    gas = count // 2
    run(
        deepspeed_cmd(
            2,
            [saved.as_posix(), kind, "--", *_argv(tmp_path, data, 1, gas, "zero2_fp32", "-2r", recipe)],
            script=str(REPO / "tests" / "objective_ranks.py"),
        ),
        timeout=300,
    )
    ranks = torch.load(saved, weights_only=False)
    assert not torch.equal(*ranks["draws"]), "the two model replicas would draw the same dropout masks"
    _same_step((out, grads), (ranks["out"], ranks["grads"]))
