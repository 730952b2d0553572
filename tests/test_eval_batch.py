"""pretrain-eval scores a run's CLIP checkpoint over the run's own eval batch (a contrastive loss depends on
how many pairs meet), and says which batch its loss is over."""

import json

import pytest

from pretrain.cli.evaluate import evaluate, main, run_eval_batch
from tests.launch import REPO, metrics, module_cmd, run, world_of_one


def _fake_run(root, eval_batch, micro, dp):
    (root / "checkpoints" / "step_00000001").mkdir(parents=True)
    (root / "checkpoints" / "latest").write_text("step_00000001")
    (root / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (root / "resolved-config.json").write_text(
        json.dumps(
            {
                "recipe": {"eval": {"batch_size": eval_batch}},
                "world_size": dp,
                "parallel": {"tp": 1, "sp": 1, "dp": dp},
                "batch": {"micro_batch_size": micro, "gradient_accumulation_steps": 1, "global_batch": micro * dp},
            }
        )
    )
    return str(root)


def test_the_runs_eval_batch_is_eval_batch_size_or_the_micro_batch_times_data_parallel(tmp_path):
    assert run_eval_batch(_fake_run(tmp_path / "a", None, 32, 2)) == 64
    assert run_eval_batch(_fake_run(tmp_path / "b", 8, 32, 4)) == 32
    assert run_eval_batch(str(tmp_path / "b" / "checkpoints" / "step_00000001")) == 32, "a tag inside the run"


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """clip-tiny trained 2 steps in this process (micro-batch 32, no eval.batch_size), evaluated and saved at 2."""
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    root = tmp_path_factory.mktemp("clip")
    data = root / "shapes"
    run(
        module_cmd(
            "data_pipelines.image.synthetic",
            ["--output", str(data), "--count", "400", "--image-size", "32", "--val-fraction", "0.15", "--no-progress"],
        )
    )
    recipe = json.loads((REPO / "pretrain/recipes/clip-tiny.json").read_text())
    recipe["training"]["log_every"] = 1
    (root / "clip.json").write_text(json.dumps(recipe))
    out = root / "run"
    with world_of_one():
        args = build_parser().parse_args(
            [
                "--config",
                str(root / "clip.json"),
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--max-steps",
                "2",
                "--eval-every",
                "2",
                "--checkpoint-every",
                "2",
                "--no-progress",
            ]
        )
        trainer = Trainer(*prepare(args), args.resume, progress=False)
        trainer.setup()
        trainer.fit()
    return out, data


@pytest.mark.slow
def test_a_runs_clip_checkpoint_is_scored_over_the_runs_eval_batch(clip_run, capsys):
    out, data = clip_run
    logged = metrics(out)[1][-1]
    assert logged["samples"] > 32, "more val pairs than one batch, so the batch matters"
    got = evaluate(str(out), str(data), "val", max_samples=512)
    assert got["loss"] == pytest.approx(logged["loss"], rel=1e-5), "the value training logged"
    assert got["loss_batch_size"] == 32, "the run's micro-batch on its one rank"
    small = evaluate(str(out), str(data), "val", batch_size=16, max_samples=512)
    assert small["loss_batch_size"] == 16 and small["loss"] < got["loss"] - 1e-3, "fewer negatives, lower loss"
    assert main(["--checkpoint", str(out), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss_batch_size"] == 32
