"""A real training process meets corrupt shards mid-epoch and a NaN loss: skipped, counted by
reason in metrics.jsonl, named in the log; above data.max_bad_fraction the run stops."""

import json
import shutil

import pytest

from data_pipelines.loader import Slot, TextShards, epoch_shards
from tests.launch import FAULTS, REPO, deepspeed_cmd, metrics, module_cmd, run

pytestmark = pytest.mark.slow


@pytest.fixture
def dirty(prepared_stdlib, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared_stdlib, data)
    seed = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())["training"]["seed"]
    order, _ = epoch_shards(TextShards(data).shards("train"), Slot(), 0, seed)
    truncated, garbage = order[1], order[2]  # read early in epoch 0 by a one-process run
    raw = open(truncated, "rb").read()
    open(truncated, "wb").write(raw[: len(raw) // 2 + 100])
    open(garbage, "wb").write(b"this is not a tar file\n" * 200)
    return data, truncated, garbage


def _recipe(tmp_path, max_bad_fraction):
    r = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    r["data"]["max_bad_fraction"] = max_bad_fraction
    path = tmp_path / f"recipe-{max_bad_fraction}.json"
    path.write_text(json.dumps(r))
    return str(path)


def test_bad_shards_and_a_nan_loss_are_skipped_and_counted(dirty, tmp_path):
    data, truncated, garbage = dirty
    out = tmp_path / "run"
    p = run(
        module_cmd(
            "tests.faults",
            [
                "--nan-loss-at",
                "3",
                "--",
                "--config",
                _recipe(tmp_path, 0.5),
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--max-steps",
                "24",
                "--eval-every",
                "0",
                "--no-progress",
            ],
        )
    )
    log = p.stdout + p.stderr
    assert "non-finite loss at step 3" in log
    assert garbage.split("/")[-1] in log and truncated.split("/")[-1] in log, "warnings name the shards"
    train, _ = metrics(out)
    assert [m["step"] for m in train] == list(range(1, 25)), "the run went on"
    last = train[-1]
    assert last["nonfinite_skips"] == 1
    reasons = last["data_skipped_by_reason"]
    assert reasons.get("bad_shard", 0) >= 1, "the garbage shard raised a read error"
    # Both shards fall short of their manifest counts: the lost samples are counted, not guessed.
    assert reasons.get("short_shard", 0) >= 40 and last["data_skipped"] == sum(reasons.values())
    assert all(m["loss"] is not None for m in train)


def test_too_much_bad_data_stops_the_run_with_the_reason(dirty, tmp_path):
    data, _, _ = dirty
    out = tmp_path / "run"
    p = run(
        module_cmd(
            "pretrain.train",
            [
                "--config",
                _recipe(tmp_path, 0.001),
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--max-steps",
                "24",
                "--eval-every",
                "0",
                "--no-progress",
            ],
        ),
        check=False,
    )
    assert p.returncode == 1
    assert "data.max_bad_fraction=0.001" in p.stderr and "bad_shard" in p.stderr
    assert not (out / "checkpoints" / "latest").exists(), "no checkpoint of a run trained on garbage"


def _nan_grad_run(data, out, ds_config):
    return run(
        module_cmd(
            "tests.faults",
            [
                "--nan-grad-at",
                "3",
                "--",
                "--config",
                "gpt-tiny",
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--deepspeed_config",
                ds_config,
                "--max-steps",
                "6",
                "--eval-every",
                "0",
                "--no-progress",
            ],
        ),
        check=False,
    )


def test_nan_gradients_and_a_nan_loss_under_accumulation_are_refused_on_every_rank(prepared_stdlib, tmp_path):
    """ZeRO-2 on 2 ranks, 2 micro-batches a step, faults on rank 0 only: NaN gradients behind a
    finite loss at step 3, a NaN loss at step 5 (checked once per step, on the device, so the
    step is skipped whole). ZeRO checks the gradient norm and refuses both updates: the weights
    are intact, each step is counted as skipped, the LR schedule waits, and training goes on."""
    r = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    r["training"].update(micro_batch_size=4, gradient_accumulation_steps=2)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(r))
    out = tmp_path / "run"
    p = run(
        deepspeed_cmd(
            2,
            [
                "--nan-grad-at",
                "3",
                "--nan-loss-at",
                "5",
                "--",
                "--config",
                str(recipe),
                "--data",
                str(prepared_stdlib),
                "--output-dir",
                str(out),
                "--max-steps",
                "7",
                "--eval-every",
                "0",
                "--no-progress",
            ],
            script=FAULTS,
        )
    )
    assert "non-finite gradient norm at step 3" in p.stdout and "the optimizer skipped the step" in p.stdout
    assert "non-finite loss at step 5 in 1 micro-batch(es) of 2 x 2 rank(s)" in p.stdout
    train, evals = metrics(out)
    assert [m["step"] for m in train] == list(range(1, 8))
    assert train[2]["grad_norm"] is None and train[2]["loss"] is not None, "a finite loss, a non-finite gradient"
    assert train[4]["grad_norm"] is None and train[4]["loss"] is None, "the NaN loss is not averaged into the log"
    assert train[-1]["nonfinite_skips"] == 2 and all(train[i]["grad_norm"] is not None for i in (3, 5, 6))
    lr = [m["lr"] for m in train]
    assert lr[1] < lr[2] == lr[3] < lr[4] == lr[5] < lr[6], "a refused step does not advance the schedule"
    assert evals[-1]["loss"] is not None


def test_nan_gradients_applied_by_the_optimizer_stop_the_run(prepared_stdlib, tmp_path):
    """Without ZeRO the update is applied: the next loss is NaN and the weights are found broken."""
    p = _nan_grad_run(prepared_stdlib, tmp_path / "run", "ds_configs/zero0_fp32.json")
    assert p.returncode == 1
    assert "the weights themselves are non-finite" in p.stderr and "after step 3" in p.stderr
