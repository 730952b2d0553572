"""pretrain-plot writes valid PNGs for a run and for a schedule."""

import json
import math

import pytest
from PIL import Image

from pretrain.cli.plot import main, smooth


def write_run(run_dir):
    run_dir.mkdir()
    lines = []
    for step in range(1, 41):
        lines.append(
            {
                "step": step,
                "loss": 8 * math.exp(-step / 20) + 2,
                "lr": 1e-3 * min(1, step / 5),
                "tokens": step * 1024,
                "samples": step * 8,
                "throughput": 5000.0 + step,
                "elapsed_s": step * 0.1,
            }
        )
        if step % 10 == 0:
            lines.append(
                {
                    "step": step,
                    "split": "val",
                    "loss": 8 * math.exp(-step / 20) + 2.3,
                    "train_loss": 8 * math.exp(-step / 20) + 2.1,
                    "gap": 0.2,
                    "tokens_seen": step * 1024,
                }
            )
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def assert_png(path, min_size=(300, 200)):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]


def test_run_plots(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir)
    assert main([str(run_dir)]) == 0
    for name in ("loss", "lr", "throughput"):
        assert_png(run_dir / "plots" / f"{name}.png")


def test_clip_runs_also_get_a_zero_shot_plot(tmp_path):
    run_dir = tmp_path / "clip"
    write_run(run_dir)
    evals = [
        {
            "step": s,
            "split": "val",
            "loss": 3.0 - s / 40,
            "train_loss": 3.0,
            "gap": -s / 40,
            "zero_shot_top1": s / 100,
            "zero_shot_top5": s / 50,
            "num_classes": 48,
            "chance_top1": 1 / 48,
            "image_to_text_R@1": s / 200,
            "text_to_image_R@1": s / 210,
        }
        for s in (10, 20, 30, 40)
    ]
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write("".join(json.dumps(e) + "\n" for e in evals))
    assert main([str(run_dir)]) == 0
    assert_png(run_dir / "plots" / "zero_shot.png")
    assert not (tmp_path / "gpt-only").exists()
    write_run(tmp_path / "gpt-only")
    main([str(tmp_path / "gpt-only")])
    assert not (tmp_path / "gpt-only" / "plots" / "zero_shot.png").exists(), "only for runs with zero-shot evals"


def test_schedule_plots_for_toolkit_and_deepspeed_types(tmp_path):
    cfg = tmp_path / "cyclic.json"
    cfg.write_text(
        json.dumps(
            {
                "scheduler": {
                    "type": "CyclicLR",
                    "params": {"base_lr": "auto", "max_lr": "auto", "step_size_up": 20, "mode": "triangular2"},
                }
            }
        )
    )
    assert main(["--schedule", str(cfg), "--steps", "200", "--output", str(tmp_path / "c.png")]) == 0
    assert_png(tmp_path / "c.png")
    assert (
        main(
            [
                "--schedule",
                "ds_configs/zero2_bf16.json",
                "--steps",
                "100",
                "--recipe",
                "gpt2-350m",
                "--output",
                str(tmp_path / "d.png"),
            ]
        )
        == 0
    )
    assert_png(tmp_path / "d.png")


def test_bad_inputs_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert main([str(tmp_path / "empty")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scheduler": {"type": "StepLR", "params": {}}}))
    assert main(["--schedule", str(bad), "--output", str(tmp_path / "x.png")]) == 2


def test_smooth_is_bias_corrected():
    assert smooth([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])
    assert smooth([0.0, 10.0])[1] > 5.0, "bias correction weights the newest value by more than alpha"
