"""Tensor parallelism (DeepSpeed AutoTP, from the DeepSpeed JSON alone) and multi-node launches.

The integration test is one story told with three real launches, on 2 CPU cores:
1. ``torchrun`` on one node, four processes: TP 2 x DP 2, killed with SIGKILL while every rank is
   inside the save of the last step;
2. ``torchrun`` as two "nodes" (node ranks 0 and 1 on 127.0.0.1), one process each: plain DP 2
   across the nodes, the same model, data and global batch;
3. the ``deepspeed`` launcher's multi-node path without ssh (``--no_ssh --node_rank``, a hostfile of
   two "nodes"), 2 x 2 processes, TP 2 inside each node x DP 2 across them: ``--resume auto`` of run 1.
Run 2's losses equal run 1's step by step (TP changes the layout, not the math, the data is split by
the DP rank only, and DP across two nodes gives what one node gives), run 3 repeats run 1's last
steps exactly (TP x DP on two nodes gives what it gives on one), each rank holds half of every
sharded layer, ``pretrain-eval`` on the TP checkpoint and on its ``pretrain-export`` give the loss the
sharded engine measured, and the TP checkpoint resumes in this process on one rank without TP
(DeepSpeed's universal checkpoint) with its weights and Adam moments.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.cli.evaluate import evaluate
from pretrain.cli.export import export
from pretrain.parallel.layout import ParallelLayout, tensor_parallel_size
from pretrain.parallel.tensor_parallel import merge_shards
from pretrain.train import main
from tests.launch import FAULTS, REPO, TRAIN, deepspeed_cmd, env, free_port, kill_tree, metrics, run, with_key

LLAMA = {
    "name": "llama-tp",
    "family": "gpt",
    "model": {
        "arch": "llama",
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "max_position_embeddings": 64,
    },
    "data": {"shuffle_buffer": 64},
    "training": {"micro_batch_size": 2, "max_steps": 4, "lr": 3e-3, "warmup_steps": 1, "precision": "fp32"},
    "eval": {"every": 0, "max_samples": 32},
    "checkpoint": {"every": 2},
}
STEPS = 4


# ------------------------------------------------------------------ pure


def test_layout_coordinates_follow_deepspeeds_rank_order():
    # DeepSpeed's TP mesh is (data_parallel, tensor_parallel), row-major: TP groups are consecutive ranks.
    layout = ParallelLayout.from_deepspeed({"tensor_parallel": {"autotp_size": 2}}, world=8, rank=5)
    assert (layout.tp, layout.dp, layout.tp_rank, layout.dp_rank) == (2, 4, 1, 2)
    assert layout.problems() == [] and layout.describe() == "TP 2 x SP 1 x DP 4 (8 ranks)"
    assert ParallelLayout.from_deepspeed({}, world=4, rank=3).dp_rank == 3
    assert tensor_parallel_size({"tensor_parallel": {"autotp_size": 0}}) == 1, "0 is DeepSpeed's 'off'"
    assert "does not divide the world size 4" in ParallelLayout(world=4, tp=3).problems()[0]
    with pytest.raises(ValueError, match="tensor_parallel.autotp_size: must be a positive integer"):
        tensor_parallel_size({"tensor_parallel": {"autotp_size": "2"}})


def test_merge_shards_rebuilds_column_and_row_parallel_weights():
    full = {"q.weight": torch.randn(8, 4), "o.weight": torch.randn(4, 8), "norm.weight": torch.randn(4)}
    shards = [
        {"q.weight": q, "o.weight": o, "norm.weight": full["norm.weight"]}
        for q, o in zip(full["q.weight"].chunk(2, 0), full["o.weight"].chunk(2, 1))
    ]
    merged = merge_shards(shards, {k: v.shape for k, v in full.items()})
    for k in full:
        assert torch.equal(merged[k], full[k]), k
    with pytest.raises(ValueError, match="does not tile"):
        merge_shards([{"q.weight": torch.zeros(3, 3)}], {"q.weight": torch.Size([8, 4])})


def test_a_zero0_tp_checkpoint_resumes_only_on_its_own_layout(tmp_path):
    # ZeRO-1/2/3 go through DeepSpeed's universal checkpoint on another layout (collective, so not
    # here); ZeRO-0 has no universal form, and its per-TP-rank model files cannot be re-split.
    from pretrain.runtime.checkpoint import CheckpointError, CheckpointManager, mark_complete

    tag = tmp_path / "step_00000002"
    tag.mkdir()
    mark_complete(tag, {"step": 2, "world_size": 4, "zero_stage": 0, "tensor_parallel": 2}, None)
    same = CheckpointManager(tmp_path, rank=0, world=4, zero_stage=0, seed=0, tp=2)
    assert same.same_layout and same.deepspeed_config({"a": 1}) == {"a": 1}
    for world, tp in ((4, 1), (2, 2), (8, 4)):
        with pytest.raises(
            CheckpointError, match=f"ZeRO-0 and tensor_parallel.autotp_size 2 on 4 ranks; this run has {tp} on {world}"
        ):
            CheckpointManager(tmp_path, rank=0, world=world, zero_stage=0, seed=0, tp=tp).deepspeed_config({})


@pytest.fixture
def isolated_env(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)


TP2 = json.loads((REPO / "ds_configs/zero1_tp2_fp32.json").read_text())


@pytest.mark.parametrize(
    "recipe,ds,world,expected",
    [
        (
            with_key(LLAMA, "model", {"arch": "gpt2", "hidden_size": 64, "num_layers": 2, "num_heads": 4}),
            TP2,
            2,
            [
                "tensor_parallel.autotp_size: 2 asks for tensor parallelism, which runs for model.arch 'llama' only",
                "AutoTP lists gpt2 as unsupported",
            ],
        ),
        (with_key(LLAMA, "model.num_kv_heads", 1), TP2, 2, ["does not divide model.num_kv_heads 1"]),
        (LLAMA, TP2, 3, ["tensor_parallel.autotp_size 2 does not divide the world size 3"]),
        (LLAMA, with_key(TP2, "tensor_parallel.vocab_parallel_lm_head", True), 2, ["vocab_parallel_lm_head: true"]),
        (
            LLAMA,
            {**TP2, "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1},
            4,
            [
                "train_batch_size 8 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 1 x "
                "data-parallel size 2 (= 4)"
            ],
        ),
    ],
    ids=["gpt2", "kv heads", "world", "vocab-parallel head", "batch counts DP ranks"],
)
def test_tensor_parallel_configs_that_cannot_run_are_refused_before_any_rank_starts(
    recipe, ds, world, expected, prepared_stdlib, tmp_path, capsys, isolated_env
):
    # Only rank 0 speaks; WORLD_SIZE is what a launcher sets before prepare() reads it.
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    assert (
        main(
            [
                "--config",
                str(tmp_path / "r.json"),
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
    assert err.startswith("error: ") and "Traceback" not in err
    assert str(tmp_path / "ds.json") in err or str(tmp_path / "r.json") in err, "the message names the file"
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in\n{err}"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ real launches


def _launch_nodes(cmds: list[list[str]], log: Path, port: str, until=None, timeout: float = 300) -> None:
    """Start one launcher per "node"; wait for them all (or, with ``until``, SIGKILL every process
    of every node once it holds). Each node's output goes to ``log``.<i>."""
    procs = [
        subprocess.Popen(
            c, env=env(), cwd=REPO, stdout=open(f"{log}.{i}", "w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        for i, c in enumerate(cmds)
    ]
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if until is not None and until():
                break
            assert time.time() < deadline, f"timed out; see {log}.*"
            time.sleep(0.2)
    finally:
        for p in procs:
            kill_tree(p, port)
    if until is None:
        for i, p in enumerate(procs):
            assert p.returncode == 0, f"node {i} exited {p.returncode}:\n{Path(f'{log}.{i}').read_text()[-5000:]}"


def _losses(out: Path, discarded: bool = False) -> dict[int, float]:
    path = out / ("metrics-discarded.jsonl" if discarded else "metrics.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m and "split" not in m}


@pytest.mark.slow
def test_tp_x_dp_on_two_nodes_matches_dp_resumes_exactly_and_exports_one_model(prepared_stdlib, tmp_path):
    (tmp_path / "llama.json").write_text(json.dumps(LLAMA))
    common = ["--config", str(tmp_path / "llama.json"), "--data", str(prepared_stdlib), "--no-progress"]
    tp_out, dp_out = tmp_path / "tp", tmp_path / "dp"
    tp_args = [*common, "--deepspeed_config", "ds_configs/zero1_tp2_fp32.json", "--output-dir", str(tp_out)]

    # 1. torchrun, 1 node x 4 processes, TP 2 x DP 2; SIGKILL with every rank inside the save of step 4.
    port = str(free_port())
    _launch_nodes(
        [
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "4",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                FAULTS,
                "--stall-in-save",
                str(STEPS),
                "--",
                *tp_args,
            ]
        ],
        tmp_path / "tp-log",
        port,
        until=lambda: all((tp_out / f"stalled-in-save-rank{r}").is_file() for r in range(4)),
    )
    log = Path(f"{tmp_path}/tp-log.0").read_text()
    held = {
        int(r): (int(a), int(s))
        for r, a, s in re.findall(
            r"rank (\d) \(TP rank \d\) holds (\d+) parameter elements, (\d+) of them in TP-sharded layers", log
        )
    }
    assert sorted(held) == [0, 1, 2, 3], log[-3000:]
    assert (tp_out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    killed = _losses(tp_out)
    assert sorted(killed) == [1, 2, 3, 4]

    # 2. torchrun, 2 nodes x 1 process, plain DP 2 across the nodes: the same model, data split and global batch.
    port = str(free_port())
    _launch_nodes(
        [
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(n),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                TRAIN,
                *common,
                "--deepspeed_config",
                "ds_configs/zero1_fp32.json",
                "--output-dir",
                str(dp_out),
                "--checkpoint-every",
                "0",
            ]
            for n in (0, 1)
        ],
        tmp_path / "dp-log",
        port,
    )
    dp = _losses(dp_out)
    for step in range(1, STEPS + 1):
        assert abs(killed[step] - dp[step]) <= 1e-4 * abs(dp[step]), (step, killed, dp)

    # 3. The deepspeed launcher's multi-node path without ssh (a hostfile of two "nodes", --no_ssh
    # --node_rank on each), 2 x 2 processes: --resume auto continues the killed run from step 2.
    for marker in tp_out.glob("stalled-in-save-rank*"):
        marker.unlink()
    (tmp_path / "hostfile").write_text("node0 slots=2\nnode1 slots=2\n")
    port = str(free_port())
    _launch_nodes(
        [
            [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                "--hostfile",
                str(tmp_path / "hostfile"),
                "--no_ssh",
                "--node_rank",
                str(n),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                TRAIN,
                *tp_args,
            ]
            for n in (0, 1)
        ],
        tmp_path / "resume-log",
        port,
    )
    resumed = _losses(tp_out)
    assert _losses(tp_out, discarded=True).keys() >= {3, 4}
    for step in (3, 4):
        assert resumed[step] == killed[step], (step, resumed[step], killed[step])

    # Each rank holds half of every sharded layer; the rest (embeddings, norms) is replicated.
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        whole = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tp_out / "model"))
    whole_total = sum(p.numel() for p in whole.parameters())
    sharded_whole = sum(s for _, s in held.values()) // 2  # two TP groups, each holding one whole copy
    projections = sum(p.numel() for n, p in whole.named_parameters() if n.endswith("proj.weight"))
    assert sharded_whole == projections, "AutoTP sharded every attention and MLP projection"
    for total, sharded in held.values():
        assert sharded * 2 == projections, held
        assert total - sharded == whole_total - projections, "the rest (embeddings, norms) is held whole"

    # The merged checkpoint and its export give the loss the sharded engine measured.
    engine_eval = [m for m in metrics(tp_out)[1] if m["step"] == STEPS][-1]
    offline = evaluate(str(tp_out), str(prepared_stdlib), max_samples=32)
    assert abs(offline["loss"] - engine_eval["loss"]) <= 1e-5 * engine_eval["loss"], (offline, engine_eval)
    assert engine_eval["samples"] == offline["samples"] > 0, "each DP replica's share counted once, not per TP rank"
    export(str(tp_out), str(tmp_path / "hf"))
    exported = evaluate(str(tmp_path / "hf"), str(prepared_stdlib), max_samples=32)
    assert abs(exported["loss"] - offline["loss"]) <= 1e-6 * offline["loss"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert sum(p.numel() for p in model.parameters()) == whole_total, "one ordinary model, shards merged"

    # The TP 2 x DP 2 checkpoint of step 2 resumed here on 1 rank without TP (DeepSpeed's universal
    # checkpoint): the engine starts from the checkpoint's merged weights and its Adam moments, and trains on.
    _resume_on_one_rank_without_tp(
        tp_out / "checkpoints" / "step_00000002",
        [*common, "--deepspeed_config", "ds_configs/zero1_fp32.json", "--output-dir", str(tmp_path / "one")],
    )


def _resume_on_one_rank_without_tp(tag: Path, argv: list[str]) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from pretrain.run.build import fp32_state_dict
    from pretrain.runtime.checkpoint import resolve_checkpoint
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare
    from tests.launch import world_of_one

    merged = fp32_state_dict(resolve_checkpoint(tag))  # the TP shards merged by pretrain-eval / export
    with world_of_one():
        args = build_parser().parse_args([*argv, "--resume", str(tag)])
        trainer = Trainer(*prepare(args), args.resume, progress=False)
        trainer.setup()
        assert trainer.state.step == 2 and trainer.layout.tp == 1
        for name, param in trainer.engine.module.named_parameters():
            assert torch.equal(safe_get_full_fp32_param(param), merged[name]), name
            exp_avg = safe_get_full_optimizer_state(param, "exp_avg")
            universal = torch.load(tag / "universal" / "zero" / name / "exp_avg.pt", weights_only=False)["param"]
            assert exp_avg.abs().sum() > 0 and torch.equal(exp_avg, universal.view_as(exp_avg)), name
        trainer.fit()
    train, evals = metrics(Path(args.output_dir))
    assert [m["step"] for m in train] == [3, 4] and all(abs(m["loss"]) < 100 for m in train), train
    assert evals[-1]["step"] == STEPS and evals[-1]["loss"] == evals[-1]["loss"]


@pytest.mark.slow
def test_ranks_of_one_tp_group_holding_different_batches_stop_the_run_naming_them(prepared_stdlib, tmp_path):
    """Issue 22 item 7: each rank of a TP group reads its own copy of the batch; a digest compared across
    the group (at the first step and every check_batches_every steps) stops the run when they differ."""
    recipe = json.loads(json.dumps(LLAMA))
    recipe["training"].update(micro_batch_size=1, check_batches_every=1)
    (tmp_path / "llama.json").write_text(json.dumps(recipe))
    argv = ["--config", str(tmp_path / "llama.json"), "--data", str(prepared_stdlib), "--output-dir", str(tmp_path)]
    argv += ["--deepspeed_config", str(REPO / "ds_configs/zero1_tp2_fp32.json")]
    prefix = tmp_path / "ranks"
    run(deepspeed_cmd(2, [str(prefix), "--", *argv], script=str(REPO / "tests/replica_batches.py")), timeout=300)
    for rank in (0, 1):
        got = json.loads(Path(f"{prefix}.{rank}.json").read_text())
        assert got["trained"] == [1], "step 1 (the same batch on both ranks) trains, step 2 stops"
        message = got["message"] or ""
        assert "hold different batches at step 2" in message and "ranks 0 hold one; ranks 1 hold one" in message
        assert "fixed-windows" in message
