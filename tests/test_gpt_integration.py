"""Text -> shards -> GPT on 2 CPU ranks with the real deepspeed launcher and torchrun -> eval -> export."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.launch import REPO, deepspeed_cmd, metrics, module_cmd, run, stdlib_files, torchrun_cmd

pytestmark = pytest.mark.slow
REFERENCE = Path(__file__).parent / "assets" / "reference_losses_gpt_tiny_zero0.json"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stdlib"
    run(
        module_cmd(
            "data_pipelines.text.prepare",
            [
                *stdlib_files(1_500_000),
                "--output",
                str(out),
                "--vocab-size",
                "1024",
                "--seq-len",
                "64",
                "--val-fraction",
                "0.1",
                "--test-fraction",
                "0.05",
                "--samples-per-shard",
                "256",
                "--workers",
                "2",
                "--no-progress",
            ],
        )
    )
    return out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    r = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    r["eval"]["max_samples"] = None  # the whole val split, so in-training eval equals pretrain-eval
    path = tmp_path_factory.mktemp("recipe") / "gpt-test.json"
    path.write_text(json.dumps(r))
    return str(path)


@pytest.fixture(scope="module")
def runs(data, recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = ["--config", recipe, "--data", str(data), "--no-progress"]
    run(
        deepspeed_cmd(
            2,
            [
                *common,
                "--deepspeed_config",
                "ds_configs/zero2_fp32.json",
                "--output-dir",
                str(root / "z2"),
                "--max-steps",
                "60",
                "--eval-every",
                "20",
            ],
        )
    )
    run(
        torchrun_cmd(
            2,
            [
                *common,
                "--deepspeed_config",
                "ds_configs/zero0_fp32.json",
                "--output-dir",
                str(root / "z0"),
                "--max-steps",
                "12",
                "--eval-every",
                "6",
            ],
        )
    )
    run(
        deepspeed_cmd(
            2,
            [
                *common,
                "--deepspeed_config",
                "ds_configs/zero3_fp32.json",
                "--output-dir",
                str(root / "z3"),
                "--max-steps",
                "12",
                "--eval-every",
                "6",
            ],
        )
    )
    return root


def test_zero2_training_lowers_val_loss_and_writes_the_run_directory(runs):
    run_dir = runs / "z2"
    train, evals = metrics(run_dir)
    assert [m["step"] for m in train] == list(range(1, 61))
    for key in ("loss", "lr", "samples", "tokens", "throughput", "elapsed_s"):
        assert all(key in m for m in train), key
    assert train[-1]["samples"] == 60 * 16 and train[-1]["tokens"] == 60 * 16 * 64
    assert [e["step"] for e in evals] == [20, 40, 60]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.3, evals
    assert evals[-1]["loss"] < math.log(1024) - 1.0, "well below the loss of a uniform guess"
    for e in evals:
        assert e["split"] == "val" and e["gap"] == pytest.approx(e["loss"] - e["train_loss"])
    resolved = json.loads((run_dir / "resolved-config.json").read_text())
    assert resolved["deepspeed"]["train_batch_size"] == 16 and resolved["zero_stage"] == 2
    assert resolved["deepspeed"]["optimizer"]["params"]["lr"] == resolved["recipe"]["training"]["lr"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000060"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_zero0_under_torchrun_and_zero3_under_deepspeed_give_the_same_losses(runs):
    (t0, e0), (t3, e3) = metrics(runs / "z0"), metrics(runs / "z3")
    assert len(t0) == len(t3) == 12
    for a, b in zip(t0, t3):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5), (a, b)
        assert b["lr"] == pytest.approx(a["lr"])
    assert [e["loss"] for e in e3] == pytest.approx([e["loss"] for e in e0], rel=1e-4)
    assert t0[-1]["loss"] < t0[0]["loss"], "it learns"


def test_reference_loss_curve(runs):
    """Catches silent numeric changes (a library upgrade, a changed default, a reordered data stream)."""
    losses = [m["loss"] for m in metrics(runs / "z0")[0]]
    if os.environ.get("UPDATE_REFERENCE") == "1":
        REFERENCE.write_text(
            json.dumps(
                {"recipe": "gpt-tiny", "ds_config": "zero0_fp32", "steps": len(losses), "losses": losses}, indent=1
            )
            + "\n"
        )
    ref = json.loads(REFERENCE.read_text())["losses"]
    assert losses == pytest.approx(ref, abs=2e-3), "loss curve moved; if intended, rerun with UPDATE_REFERENCE=1"


def test_export_from_zero3_loads_in_transformers_with_the_same_loss(runs, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_pipelines.loader import TextShards, eval_batches

    hf = tmp_path / "hf"
    run(module_cmd("pretrain.cli.export", ["--checkpoint", str(runs / "z3"), "--output", str(hf)]))
    ours = json.loads(
        run(
            module_cmd(
                "pretrain.cli.evaluate",
                ["--checkpoint", str(runs / "z3"), "--data", str(data), "--split", "val", "--json"],
            )
        ).stdout
    )
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in eval_batches(TextShards(data), "val", 16):
            logits = model(input_ids=b["input_ids"]).logits
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), b["labels"].flatten(), reduction="sum"
            ).item()
            count += b["labels"].numel()
    assert total / count == pytest.approx(ours["loss"], rel=1e-5)
    in_training = metrics(runs / "z3")[1][-1]
    assert in_training["loss"] == pytest.approx(ours["loss"], rel=1e-4), "the trainer's val loss is pretrain-eval's"
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"

    # Fine-tuning starts from the export: one process, pretrain-train's own single-rank mode.
    ft = tmp_path / "ft"
    run(
        module_cmd(
            "pretrain.train",
            [
                "--config",
                "gpt-tiny",
                "--data",
                str(data),
                "--init-from",
                str(hf),
                "--output-dir",
                str(ft),
                "--max-steps",
                "2",
                "--eval-every",
                "0",
                "--no-progress",
                "--deepspeed_config",
                "ds_configs/zero1_fp32.json",
            ],
        )
    )
    first = metrics(ft)[0][0]["loss"]
    assert first < metrics(runs / "z3")[0][0]["loss"] - 0.5, "starts from the trained weights, not from scratch"


def test_test_split_is_only_touched_by_pretrain_eval(runs, data):
    for name in ("z0", "z2", "z3"):
        assert all(e["split"] == "val" for e in metrics(runs / name)[1])
    out = json.loads(
        run(
            module_cmd(
                "pretrain.cli.evaluate",
                ["--checkpoint", str(runs / "z2"), "--data", str(data), "--split", "test", "--json"],
            )
        ).stdout
    )
    assert (
        out["split"] == "test"
        and out["samples"] == json.loads((data / "manifest.json").read_text())["splits"]["test"]["samples"]
    )
    assert math.isfinite(out["loss"]) and out["perplexity"] == pytest.approx(math.exp(out["loss"]))


def test_a_bad_recipe_is_refused_before_any_work(data, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "trainig": {}, "model": {"hidden_size": 64, "num_heads": 3}}))
    out = tmp_path / "never"
    p = run(
        module_cmd(
            "pretrain.train",
            [
                "--config",
                str(bad),
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--deepspeed_config",
                "ds_configs/zero2_fp32.json",
            ],
        ),
        check=False,
    )
    assert p.returncode == 2
    assert "trainig: unknown key (did you mean 'training'?)" in p.stderr and "not divisible by num_heads" in p.stderr
    assert not out.exists()
