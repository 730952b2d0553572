"""img2dataset output, unprepared, trains clip-tiny on 2 CPU ranks through the real deepspeed launcher:
`--data 'pipe:cat DIR/{00000..00003}.tar'`, sample counts from the shards' _stats.json, undecodable
images skipped and counted, and a val split held out by key hash that the run evaluates on."""

import json

import pytest

from data_pipelines.sources import held_out
from data_pipelines.text.tokenizer import train_bpe_tokenizer
from tests.img2dataset_layout import COLOURS, write_img2dataset
from tests.launch import REPO, deepspeed_cmd, metrics, module_cmd, run

pytestmark = pytest.mark.slow
STEPS = 6


def test_two_rank_clip_trains_on_raw_img2dataset_shards_with_no_prepare_step(tmp_path):
    raw = tmp_path / "laion"
    info = write_img2dataset(raw, shards=4, per_shard=32, size=40)
    tok = tmp_path / "tokenizer"
    train_bpe_tokenizer([f"a photo of a {c} square" for c in COLOURS] * 20, 300).save_pretrained(str(tok))
    recipe = json.loads((REPO / "pretrain/recipes/clip-tiny.json").read_text())
    recipe["data"].update(tokenizer=str(tok), holdout_fraction=0.2, shuffle_buffer=32, max_bad_fraction=0.1)
    recipe["training"].update(micro_batch_size=8, log_every=1, warmup_steps=2)
    recipe["eval"] = {"every": 0, "max_samples": 64}
    (tmp_path / "clip-raw.json").write_text(json.dumps(recipe))
    out = tmp_path / "run"
    run(
        deepspeed_cmd(
            2,
            [
                "--config",
                str(tmp_path / "clip-raw.json"),
                "--data",
                f"pipe:cat {raw}/{{00000..00003}}.tar",
                "--output-dir",
                str(out),
                "--max-steps",
                str(STEPS),
                "--no-progress",
            ],
        )
    )
    train, evals = metrics(out)
    assert [m["step"] for m in train] == list(range(1, STEPS + 1)) and train[-1]["samples"] == STEPS * 16
    assert all(0 < m["loss"] < 10 for m in train)
    corrupt = {m["data_skipped_by_reason"].get("undecodable") for m in train if m.get("data_skipped")}
    assert corrupt and max(corrupt) >= 1, "the corrupt image of each shard is skipped and counted"
    held = sum(held_out(info["images"][k], 0.2) for k in info["keys"])
    (last,) = evals
    assert 0 < last["samples"] <= held and last["loss"] is not None and last["retrieval_pairs"] == last["samples"]
    data = json.loads((out / "resolved-config.json").read_text())["data"]
    assert data["path"] is None and data["holdout_fraction"] == 0.2
    (src,) = data["sources"]
    assert (src["shards"], src["samples"], src["counted_from"]) == (4, info["samples"], "_stats.json")
    # pretrain-eval on the same source string scores the run's held-out keys: 2 ranks x 8 rows = batches of 16
    p = run(
        module_cmd(
            "pretrain.cli.evaluate",
            ["--checkpoint", str(out), "--data", f"{raw}", "--batch-size", "16", "--max-samples", "64", "--json"],
        )
    )
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["samples"] == last["samples"] and got["loss"] == pytest.approx(last["loss"], rel=1e-4)
