"""Ulysses sequence parallelism (pretrain/parallel/sequence_parallel.py): layouts that cannot run are refused
before any rank starts; SP=2 on two ranks gives the losses of the same run without SP, and its
checkpoint resumes on one rank without SP and gives the trainer's val loss in pretrain-eval and export."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pretrain.parallel.layout import ParallelLayout
from pretrain.parallel.sequence_parallel import check
from pretrain.train import main
from tests.launch import REPO, deepspeed_cmd, free_port, metrics, run, world_of_one

ZERO3 = json.loads((REPO / "ds_configs/zero3_fp32.json").read_text())
LLAMA = {
    "arch": "llama",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
}


def _recipe(model: dict, **training) -> dict:
    r = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    r["model"] = model
    r["training"].update(micro_batch_size=2, max_steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2, **training)
    r["eval"] = {"every": 0, "max_samples": 8}
    r["checkpoint"] = {"every": 0, "at_end": False}
    return r


def test_check_names_every_size_that_does_not_divide():
    assert check("llama", ParallelLayout(world=2, sp=1), 0, 3, 3, 63, "eager", "ds.json") == [], "SP off: no rules"
    ok = check("llama", ParallelLayout(world=4, sp=2), 3, 4, 1, 64, "sdpa", "ds.json")
    assert ok == [], "one KV head is replicated to both SP ranks (GQA/MQA)"
    bad = "\n".join(check("llama", ParallelLayout(world=6, sp=3, tp=2), 2, 4, 2, 64, "eager", "ds.json"))
    for fragment in (
        "ds.json: sequence_parallel_size: 3 needs zero_optimization.stage 3 (got 2)",
        "together with tensor_parallel.autotp_size 2",
        "does not divide model.num_heads 4",
        "model.num_kv_heads 2: one must divide the other",
        "does not divide the data's seq_len 64",
        "model.attn_implementation eager",
    ):
        assert fragment in bad, f"{fragment!r} not in\n{bad}"
    packed = check("llama", ParallelLayout(world=2, sp=2), 3, 4, 4, 64, "sdpa", "ds.json", packed=True)
    assert packed and "packed conversations (chat data) needs model.attn_implementation flash_attention_2" in packed[0]
    assert check("llama", ParallelLayout(world=2, sp=2), 3, 4, 4, 64, "flash_attention_2", "ds.json", packed=True) == []
    assert (
        "llama and gpt2 architectures only (model.arch is 'clip')"
        in check("clip", ParallelLayout(world=2, sp=2), 3, 4, 4, 64, "sdpa", "ds.json")[0]
    )


@pytest.fixture
def two_rank_env(monkeypatch):
    """What the launcher would set for 2 ranks; only prepare() runs, before any process group exists."""
    monkeypatch.setattr(os, "environ", dict(os.environ))
    os.environ.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")


@pytest.mark.parametrize(
    "case,model,ds,expected",
    [
        (
            "SP does not divide the world, heads or seq_len",
            LLAMA,
            {**ZERO3, "sequence_parallel_size": 3},
            [
                "sequence parallel size 3 does not divide the world size 2",
                "3 does not divide model.num_heads 4",
                "3 does not divide the data's seq_len 64",
            ],
        ),
        (
            "SP under ZeRO-2",
            LLAMA,
            {**json.loads((REPO / "ds_configs/zero2_fp32.json").read_text()), "sequence_parallel_size": 2},
            ["sequence_parallel_size: 2 needs zero_optimization.stage 3 (got 2)"],
        ),
        (
            "SP does not divide gpt2's heads",
            {**LLAMA, "arch": "gpt2", "hidden_size": 48, "num_heads": 3},
            {**ZERO3, "sequence_parallel_size": 2},
            ["2 does not divide model.num_heads 3"],
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_sp_layout_is_refused_before_any_rank_starts(
    case, model, ds, expected, prepared_stdlib, tmp_path, capsys, two_rank_env
):
    (tmp_path / "recipe.json").write_text(json.dumps(_recipe(model)))
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    assert (
        main(
            [
                "--config",
                str(tmp_path / "recipe.json"),
                "--deepspeed_config",
                str(tmp_path / "ds.json"),
                "--data",
                str(prepared_stdlib),
                "--output-dir",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(tmp_path / "ds.json") in err
    for fragment in expected:
        assert fragment in err, f"{case}: {fragment!r} not in\n{err}"
    assert not (tmp_path / "out").exists()


def _in_process(argv: list[str]) -> tuple[list[dict], list[dict]]:
    """A run without SP, in this process (a gloo world of one): the reference, or a resume."""
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    with world_of_one():
        args = build_parser().parse_args(argv)
        trainer = Trainer(*prepare(args), args.resume, progress=False)
        trainer.setup()
        trainer.fit()
    return metrics(Path(args.output_dir))


@pytest.mark.slow
def test_sp2_on_two_ranks_gives_the_losses_of_the_same_sequences_without_sp(prepared_stdlib, tmp_path):
    from pretrain.cli.evaluate import evaluate
    from pretrain.cli.export import export

    (tmp_path / "recipe.json").write_text(json.dumps(_recipe(LLAMA)))
    common = ["--config", str(tmp_path / "recipe.json"), "--data", str(prepared_stdlib), "--no-progress"]
    no_sp = [*common, "--deepspeed_config", str(REPO / "ds_configs/zero3_fp32.json")]
    out = run(
        deepspeed_cmd(
            2,
            [
                *common,
                "--deepspeed_config",
                str(REPO / "ds_configs/zero3_sp2_fp32.json"),
                "--output-dir",
                str(tmp_path / "sp2"),
                "--checkpoint-every",
                "3",
            ],
        ),
        timeout=300,
    )
    assert "SP 2 x DP 1 (2 ranks); Ulysses sequence parallelism: each rank holds 32 of the 64 tokens" in out.stdout
    resolved = json.loads((tmp_path / "sp2" / "resolved-config.json").read_text())
    assert resolved["parallel"] == {"tp": 1, "sp": 2, "dp": 1}
    assert resolved["deepspeed"]["train_batch_size"] == 2, "the global batch counts DP ranks only"
    sp_train, sp_eval = metrics(tmp_path / "sp2")

    ref_train, ref_eval = _in_process([*no_sp, "--output-dir", str(tmp_path / "sp1"), "--resume", "none"])
    losses = [m["loss"] for m in sp_train]
    assert len(losses) == 6 and all(map(lambda x: x == x and abs(x) < 100, losses))
    assert min(losses[-2:]) < losses[0], f"SP=2 does not learn: {losses}"
    for a, b in zip(sp_train, ref_train, strict=True):
        assert a["step"] == b["step"] and a["samples"] == b["samples"] == 2 * a["step"]
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
        # 1e-4 as for the loss: since step 1 trains (lr / warmup, not 0), Adam's first update, about lr x sign(g),
        # turns float-rounding differences in near-zero gradients into weight differences of lr
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * b["grad_norm"], (
            a["step"],
            a["grad_norm"],
            b["grad_norm"],
        )
    # evaluation runs whole sequences on every SP rank and sums over model replicas only
    assert sp_eval[-1]["samples"] == ref_eval[-1]["samples"] == 8
    assert abs(sp_eval[-1]["loss"] - ref_eval[-1]["loss"]) <= 1e-4 * ref_eval[-1]["loss"]

    # The step-3 checkpoint resumed on 1 rank without SP (DeepSpeed's universal checkpoint, 2 -> 1 ranks;
    # DP stays 1, so the same micro-batches): steps 4-6 of the run that was never interrupted.
    step3 = tmp_path / "sp2" / "checkpoints" / "step_00000003"
    resumed_train, resumed_eval = _in_process(
        [*no_sp, "--output-dir", str(tmp_path / "resumed"), "--resume", str(step3)]
    )
    assert (step3 / "universal" / "converted.json").is_file(), "resumed through the universal checkpoint"
    assert [m["step"] for m in resumed_train] == [4, 5, 6]
    # 1e-4 as above: three trained steps (step 1 no longer at LR 0) carry the SP run's rounding into the weights
    for a, b in zip(resumed_train, sp_train[3:], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
    assert abs(resumed_eval[-1]["loss"] - sp_eval[-1]["loss"]) <= 1e-4 * sp_eval[-1]["loss"]

    # pretrain-eval of the SP run's last checkpoint (step 6, ZeRO-3 partitions of 2 ranks) and of its export
    # give the val loss the trainer measured with SP.
    offline = evaluate(str(tmp_path / "sp2"), str(prepared_stdlib), max_samples=8)
    assert offline["tag"] == "step_00000006" and offline["samples"] == sp_eval[-1]["samples"]
    assert abs(offline["loss"] - sp_eval[-1]["loss"]) <= 1e-5 * sp_eval[-1]["loss"], (offline, sp_eval[-1])
    export(str(tmp_path / "sp2"), str(tmp_path / "hf"))
    exported = evaluate(str(tmp_path / "hf"), str(prepared_stdlib), max_samples=8)
    assert abs(exported["loss"] - offline["loss"]) <= 1e-6 * offline["loss"], (exported, offline)


def test_the_planner_proposes_only_layouts_the_trainer_runs():
    from pretrain.cli import plan
    from pretrain.parallel import tensor_parallel

    for tp in (1, 2):
        for sp in (1, 2):
            for stage in range(4):
                layout = ParallelLayout(world=tp * sp, tp=tp, sp=sp)
                refused = check("llama", layout, stage, 4, 4, 64, "sdpa", "ds.json") + tensor_parallel.check(
                    "llama", layout, stage, 4, 4, "ds.json"
                )
                assert plan.layout_runs(tp, sp, stage) == (not refused), (tp, sp, stage, refused)


@pytest.mark.slow
def test_gpt2_attention_goes_through_ulysses_with_the_loss_and_gradients_of_no_sp():
    """GPT-2 merges the attention heads itself, unlike Llama: SP=2 on 2 ranks (torchrun, no engine)
    gives the loss and the gradients of the whole sequences (tests/sp_equivalence.py)."""
    out = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(REPO / "tests" / "sp_equivalence.py"),
            "gpt2",
        ],
        timeout=300,
    )
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    assert abs(result["loss"] - result["reference"]) <= 1e-5 * result["reference"], result
    assert result["grad_diff"] <= 1e-5, result
