"""A run saved on 2 ranks resumes on 1 (DeepSpeed universal checkpoint) and then on 2 again; the
data position is re-divided so that within an epoch no sample is lost or repeated."""

import json
from collections import Counter
from pathlib import Path

import pytest

from pretrain.run.build import fp32_state_dict
from pretrain.runtime.checkpoint import resolve_checkpoint
from tests.launch import FAULTS, REPO, deepspeed_cmd, metrics, module_cmd, prepare_small_corpus, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Several hundred train windows: small enough that the test runs through a whole epoch; ten documents
    so that val and test each get at least one (prepare refuses an empty val split)."""
    return prepare_small_corpus(tmp_path_factory.mktemp("small") / "data", 10, 5_000, 12_000, 512, 50, 0.1, 0.25)


def _trace(trace_dir: Path) -> list[str]:
    ids = []
    for f in sorted(trace_dir.glob("trace-rank*.txt")):
        for line in f.read_text().splitlines():
            ids += line.split("\t", 1)[1].split()
    return ids


def test_two_ranks_to_one_and_back_loses_and_repeats_no_sample(small_data, tmp_path):
    manifest = json.loads((small_data / "manifest.json").read_text())
    n = manifest["splits"]["train"]["samples"]
    out, trace = tmp_path / "run", tmp_path / "trace"
    trace.mkdir()
    traced = ["--trace-samples", str(trace), "--"]  # tests/faults.py: a per-sample trace, no faults
    ds = json.loads((REPO / "ds_configs/zero2_fp32.json").read_text())
    (tmp_path / "gas2.json").write_text(json.dumps({**ds, "gradient_accumulation_steps": 2}))
    recipe = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    recipe["data"]["shuffle_buffer"] = 32  # epoch 0 ends soon after its last sample is read
    recipe["checkpoint"]["keep_last"] = None  # step 7's checkpoint is read after the 1-rank run ends
    # left to the DeepSpeed config (gas2.json accumulates twice on one rank): a recipe that wrote 1 is refused
    del recipe["training"]["gradient_accumulation_steps"]
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    common = [
        "--config",
        str(tmp_path / "recipe.json"),
        "--data",
        str(small_data),
        "--output-dir",
        str(out),
        "--eval-every",
        "0",
        "--no-progress",
    ]
    steps_on_one = -(-n // 16) + 6  # past the end of epoch 0 and the buffer (16 sequences a step in both worlds)

    run(
        deepspeed_cmd(
            2,
            [
                *traced,
                *common,
                "--deepspeed_config",
                "ds_configs/zero2_fp32.json",
                "--max-steps",
                "6",
                "--checkpoint-every",
                "6",
            ],
            script=FAULTS,
        )
    )
    w6 = fp32_state_dict(resolve_checkpoint(str(out / "checkpoints" / "step_00000006")))
    last = 6 + steps_on_one
    # One launch on 1 rank; its checkpoint at step 7 shows what crossed from 2 ranks.
    p = run(
        module_cmd(
            "tests.faults",
            [
                *traced,
                *common,
                "--deepspeed_config",
                str(tmp_path / "gas2.json"),
                "--checkpoint-every",
                "7",
                "--max-steps",
                str(last),
            ],
        )
    )
    assert "universal checkpoint" in p.stdout and "(2 -> 1 ranks)" in p.stdout
    # The weights (and Adam state) came across: one step later they have barely moved.
    w7 = fp32_state_dict(resolve_checkpoint(str(out / "checkpoints" / "step_00000007")))
    lr = metrics(out)[0][6]["lr"]
    moved = max(float((w7[k] - w6[k]).detach().abs().max()) for k in w6)
    assert 0 < moved <= 3 * lr, (moved, lr)
    p = run(
        deepspeed_cmd(
            2,
            [*traced, *common, "--deepspeed_config", "ds_configs/zero2_fp32.json", "--max-steps", str(last + 5)],
            script=FAULTS,
        )
    )
    assert "(1 -> 2 ranks)" in p.stdout

    ids = _trace(trace)
    assert len(ids) == (last + 5) * 16, "every step trained on a full global batch"
    repeated = [k for k, c in Counter(ids).items() if c > 1]
    assert not repeated, f"seen twice in one epoch: {repeated[:5]}"
    epoch0 = {i.split(":", 1)[1] for i in ids if i.startswith("0:")}
    assert len(epoch0) == n, f"epoch 0 covered {len(epoch0)} of {n} train samples"

    train, _ = metrics(out)
    assert [m["step"] for m in train] == list(range(1, last + 6))
    assert [m["samples"] for m in train] == [16 * s for s in range(1, last + 6)]
    ckpt = json.loads((out / "checkpoints" / f"step_{last + 5:08d}" / "toolkit.json").read_text())
    assert [h["world"] for h in ckpt["data_history"]] == [2, 1]
