"""pretrain-sweep's grid, size rule, point recipes and launcher commands (no training here)."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from pretrain.cli import sweep as cli
from pretrain.run.config import load_recipe
from pretrain.runtime.flops import total_flops
from pretrain.sweep.grid import GridError, SizeRule, expand, parse_grid, point_overrides, split_batch
from pretrain.sweep.runner import PlannedPoint, collect, run_point
from tests.launch import REPO


def test_the_size_rule_gives_gpt_tiny_its_own_shape_and_refuses_a_width_heads_do_not_divide():
    tiny = load_recipe("gpt-tiny")[0].model
    assert SizeRule().shape(128) == {
        "hidden_size": tiny.hidden_size,
        "num_heads": tiny.num_heads,
        "num_layers": tiny.num_layers,
    }
    assert SizeRule().shape(64) == {"hidden_size": 64, "num_heads": 2, "num_layers": 2}
    assert SizeRule().shape(256)["num_layers"] == 8
    with pytest.raises(ValueError, match="head dimension 32"):
        SizeRule().shape(100)


def test_a_bad_grid_names_every_bad_key_and_value():
    with pytest.raises(GridError) as e:
        parse_grid(
            ["lr=1e-3,abc", "batch=0,16", "size=100,gpt2-124m", "colour=red", "training.lr=1", "seed=1,1", "steps"]
        )
    text = str(e.value)
    for expected in (
        "lr=abc: not a number",
        "batch=0: must be > 0",
        "size=100: width 100 is not a positive multiple",
        "colour: unknown key",
        "training.lr: use the sweep's own key",
        "seed: a value is repeated",
        "--grid 'steps': expected key=v1,v2",
    ):
        assert expected in text, text
    with pytest.raises(GridError, match="batch=6: not a multiple of the 4 ranks"):
        parse_grid(["batch=8,6"], ranks=4)


def test_expansion_is_the_product_in_order_with_stable_distinct_names():
    grid = parse_grid(["size=64,128", "batch=16,64", "lr=1e-4,3e-4,1e-3", "training.weight_decay=0,0.1"])
    assert grid["lr"] == [1e-4, 3e-4, 1e-3] and grid["size"] == [64, 128] and grid["training.weight_decay"] == [0, 0.1]
    points = expand(grid)
    assert len(points) == 24 and len({p.name for p in points}) == 24
    assert points[0].settings == {"size": 64, "batch": 16, "lr": 1e-4, "training.weight_decay": 0}
    assert points[1].name == "size64-batch16-lr0.0001-weight_decay0.1"
    assert [p.name for p in expand(grid)] == [p.name for p in points]  # a rerun finds the same directories


def test_point_overrides_keep_the_recipe_ratios_and_split_the_batch():
    base = load_recipe("gpt-tiny")[0].training.model_dump()
    o = point_overrides({"size": 64, "batch": 64, "lr": 1e-3}, base, steps=200, rule=SizeRule(), ranks=2, max_micro=8)
    assert o["training.lr"] == 1e-3 and o["training.min_lr"] == pytest.approx(1e-3 * base["min_lr"] / base["lr"])
    assert o["training.lr_scaling"] == "none"  # the LR named is the LR trained
    assert (o["training.micro_batch_size"], o["training.gradient_accumulation_steps"]) == (8, 4)
    assert o["training.warmup_steps"] == 20 and o["training.max_steps"] == 200
    assert o["model.num_layers"] == 2 and o["model.num_heads"] == 2
    assert split_batch(48, 1, 32) == (24, 2) and split_batch(16, 1, None) == (16, 1)


@pytest.fixture
def fake_data(tmp_path):
    """Enough of a prepared dataset for planning: its manifest's vocabulary and sequence length."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"seq_len": 32, "tokenizer": {"vocab_size": 256}}))
    return d


def test_print_commands_writes_each_recipe_and_prints_one_launcher_line_per_point(tmp_path, fake_data, capsys):
    out = tmp_path / "sweep"
    rc = cli.main(
        ["--config", "gpt-tiny", "--data", str(fake_data), "--grid", "lr=1e-3,3e-3", "--grid", "size=32,64",
         "--steps", "50", "--output", str(out), "--print-commands", "--launcher", "deepspeed --num_gpus 2",
         "--ranks", "2", "--grid", "batch=8"]
    )  # fmt: skip
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    for line in lines:
        argv = shlex.split(line)
        assert argv[:3] == ["deepspeed", "--num_gpus", "2"] and argv[3] == str(REPO / "pretrain" / "train.py")
        assert argv[argv.index("--resume") + 1] == "auto"
        recipe = json.loads(open(argv[argv.index("--config") + 1]).read())
        assert recipe["output_dir"] == argv[argv.index("--output-dir") + 1]
        assert recipe["training"]["max_steps"] == 50 and recipe["training"]["micro_batch_size"] == 4
        assert recipe["eval"]["every"] == 0
    first = json.loads((out / "points" / "lr0.001-size32-batch8" / "recipe.json").read_text())
    assert first["training"]["lr"] == 1e-3 and first["model"]["hidden_size"] == 32
    # the same output with different settings for the same point is refused, not silently mixed
    rc = cli.main(
        ["--config", "gpt-tiny", "--data", str(fake_data), "--grid", "lr=1e-3", "--grid", "size=32",
         "--grid", "batch=8", "--steps", "60", "--output", str(out), "--print-commands", "--ranks", "2"]
    )  # fmt: skip
    assert rc == 2 and "was started with a different recipe (training differ)" in capsys.readouterr().err


def test_a_bad_grid_fails_before_anything_is_written(tmp_path, fake_data, capsys):
    out = tmp_path / "sweep"
    rc = cli.main(["--config", "gpt-tiny", "--data", str(fake_data), "--grid", "lr=-1", "--output", str(out)])
    assert rc == 2 and "lr=-1: must be > 0" in capsys.readouterr().err
    assert not out.exists()
    rc = cli.main(["--config", "gpt-tiny", "--data", str(tmp_path / "nope"), "--grid", "lr=1", "--output", str(out)])
    assert rc == 2 and "no such directory" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    assert "pretrain-sweep fit" in text and "--print-commands" in text


def test_a_failed_point_is_recorded_with_its_exit_code_and_error(tmp_path):
    """The trainer's failure path (exit status, log tail) with a stand-in that fails at once; the real
    trainer runs in tests/test_sweep_run.py."""
    run_dir = tmp_path / "points" / "p"
    pp = PlannedPoint(expand({"lr": [1e-3]})[0], {"training": {"max_steps": 5, "lr": 1e-3}}, run_dir, 1000, 640)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-c", "import sys; print('error: training stopped: boom'); sys.exit(3)"]
    assert run_point(pp, cmd, tmp_path / "logs" / "p.log") == 3
    row = collect(pp)
    assert row["status"] == "failed" and row["returncode"] == 3 and "boom" in row["error"]
    assert row["loss"] is None and row["flops"] == total_flops(1000, 640)


def test_a_reference_width_scales_the_grid_lr_as_one_over_width():
    base = {"lr": 2e-3, "min_lr": 2e-4}
    o = point_overrides({"size": 128, "lr": 1e-2}, base, steps=10, rule=SizeRule(), lr_width_ref=64)
    assert o["training.lr"] == pytest.approx(5e-3) and o["training.min_lr"] == pytest.approx(5e-4)
    o = point_overrides({"size": "gpt-tiny", "lr": 1e-2}, base, steps=10, rule=SizeRule(), lr_width_ref=64,
                        named_models={"gpt-tiny": {"hidden_size": 32}})  # fmt: skip
    assert o["training.lr"] == pytest.approx(2e-2)
    assert point_overrides({"lr": 1e-2}, base, steps=10, rule=SizeRule(), lr_width_ref=64)["training.lr"] == 1e-2


def test_a_run_that_ends_above_its_first_loss_is_diverged_and_a_short_one_is_not_finished(tmp_path):
    def planned(losses, steps):
        run_dir = tmp_path / "-".join(map(str, losses))
        run_dir.mkdir()
        lines = [{"step": i + 1, "loss": v, "tokens": 64 * (i + 1)} for i, v in enumerate(losses)]
        lines.append({"step": len(losses), "split": "val", "loss": losses[-1], "train_loss": losses[-1]})
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        return PlannedPoint(expand({"lr": [1e-3]})[0], {"training": {"max_steps": steps, "lr": 1e-3}}, run_dir, 10, 1)

    good, bad, short = planned([5.0, 4.0, 3.0], 3), planned([5.0, 6.0, 7.5], 3), planned([5.0, 4.0], 3)
    assert collect(good)["status"] == "done" and not collect(good)["diverged"]
    assert collect(good)["tokens"] == 192 and collect(good)["loss"] == 3.0
    assert collect(bad)["diverged"]
    assert collect(short)["status"] == "pending" and collect(short)["loss"] is None
