"""A toolkit schedule (CyclicLR + warmup) through a real 2-rank DeepSpeed run, and an exact resume from a checkpoint."""

import json
import shutil

import pytest
import torch
from torch.optim import lr_scheduler as tls

from tests.launch import REPO, deepspeed_cmd, metrics, run

pytestmark = pytest.mark.slow


def test_cyclic_lr_matches_pytorch_and_a_resumed_run_repeats_the_uninterrupted_one(prepared_stdlib, tmp_path):
    ds = json.loads((REPO / "ds_configs/zero2_fp32.json").read_text())
    ds["scheduler"] = {
        "type": "CyclicLR",
        "params": {
            "base_lr": "auto",
            "max_lr": "auto",
            "step_size_up": 3,
            "mode": "triangular2",
            "warmup_num_steps": 2,
        },
    }
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    full = tmp_path / "full"
    args = [
        "--config",
        "gpt-tiny",
        "--deepspeed_config",
        str(ds_path),
        "--data",
        str(prepared_stdlib),
        "--no-progress",
        "--max-steps",
        "12",
        "--eval-every",
        "6",
        "--checkpoint-every",
        "6",
    ]
    run(deepspeed_cmd(2, [*args, "--output-dir", str(full)]))
    train, evals = metrics(full)

    # The LR each step used equals PyTorch's CyclicLR behind a LinearLR warmup (SequentialLR).
    recipe = json.loads((full / "resolved-config.json").read_text())["recipe"]["training"]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=recipe["min_lr"])
    ref = tls.SequentialLR(
        opt,
        [
            tls.LinearLR(opt, 1 / 2, 1.0, 1),
            tls.CyclicLR(opt, recipe["min_lr"], recipe["lr"], 3, mode="triangular2", cycle_momentum=False),
        ],
        milestones=[2],
    )
    expected = []
    for _ in range(12):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert [m["lr"] for m in train] == pytest.approx(expected, rel=1e-6)

    # Resume: the run directory as it was right after the step-6 checkpoint, then continue to step 12.
    cut = tmp_path / "resumed"
    shutil.copytree(full, cut, ignore=shutil.ignore_patterns("step_00000012"))
    (cut / "checkpoints" / "latest").write_text("step_00000006")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(line for line in lines if json.loads(line)["step"] <= 6) + "\n")
    p = run(deepspeed_cmd(2, [*args, "--output-dir", str(cut), "--resume", "auto"]))
    assert "resumed from" in p.stdout
    train2, evals2 = metrics(cut)
    assert [m["step"] for m in train2] == list(range(1, 13))
    assert [m["loss"] for m in train2] == pytest.approx([m["loss"] for m in train], rel=1e-6)
    assert [m["lr"] for m in train2] == pytest.approx([m["lr"] for m in train], rel=1e-9)
    assert [e["loss"] for e in evals2] == pytest.approx([e["loss"] for e in evals], rel=1e-6)
    assert evals2[-1]["train_loss"] == pytest.approx(evals[-1]["train_loss"], rel=1e-6), "the gap window survives"
