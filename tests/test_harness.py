"""lm-evaluation-harness on our GPTs, offline: pretrain-eval --model EXPORT --tasks YAML, and eval.tasks
during a 2-rank training. The shipped task (tests/assets/facts_choice.yaml) asks for the colour of a
thing its corpus (tests/assets/facts_corpus.jsonl) states 30 times; the harness's accuracy must equal
the toolkit's own log-likelihood scoring of the same items and beat chance (1/4) once trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch import REPO, deepspeed_cmd, module_cmd, run

ASSETS = REPO / "tests" / "assets"
TASK = ASSETS / "facts_choice.yaml"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def facts_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("facts") / "data"
    run(
        module_cmd(
            "data_pipelines.text.prepare",
            [
                str(ASSETS / "facts_corpus.jsonl"),
                "--output",
                str(out),
                "--vocab-size",
                "400",
                "--seq-len",
                "32",
                "--val-fraction",
                "0.1",
                "--test-fraction",
                "0",
                "--samples-per-shard",
                "200",
                "--no-progress",
            ],
        )
    )
    return out


@pytest.fixture(scope="module")
def trained_export(facts_data, tmp_path_factory) -> Path:
    """gpt-tiny trained 300 steps on the facts corpus (about 30 s on 2 cores), exported."""
    root = tmp_path_factory.mktemp("facts-run")
    run(
        [
            *module_cmd("pretrain.train", []),
            "--config",
            "gpt-tiny",
            "--data",
            str(facts_data),
            "--output-dir",
            str(root / "run"),
            "--max-steps",
            "300",
            "--eval-every",
            "0",
            "--no-progress",
        ],
        env=OFFLINE,
    )
    run(module_cmd("pretrain.cli.export", ["--checkpoint", str(root / "run"), "--output", str(root / "export")]))
    return root / "export"


def test_a_task_that_would_download_is_refused_naming_the_file_to_provide(tmp_path):
    from pretrain.evals.harness import HarnessError, task_configs

    hub = tmp_path / "hub.yaml"
    hub.write_text(TASK.read_text().replace("dataset_path: json", "dataset_path: allenai/ai2_arc"))
    with pytest.raises(HarnessError, match=r"allenai/ai2_arc' would be downloaded.*test split as FILE\.jsonl"):
        task_configs([str(hub)])
    moved = tmp_path / "moved.yaml"
    moved.write_text(TASK.read_text())  # its relative data file is not next to it
    with pytest.raises(HarnessError, match=rf"data file {tmp_path}/facts_choice.jsonl is missing: provide it"):
        task_configs([str(moved)])
    # a name is found in the folder of a listed YAML; the data file resolves next to the YAML
    (config,) = task_configs([str(TASK)])
    assert config["dataset_kwargs"]["data_files"]["test"] == str(ASSETS / "facts_choice.jsonl")
    assert [c["task"] for c in task_configs([str(TASK), "facts_choice"])] == ["facts_choice", "facts_choice"]


@pytest.mark.slow  # indexing the harness's built-in tasks (for the hint) takes ~15 s
def test_a_builtin_task_name_is_refused_naming_its_dataset_and_the_file_to_provide():
    from pretrain.evals.harness import HarnessError, task_configs

    with pytest.raises(HarnessError, match=r"Rowan/hellaswag.*validation split as JSONL.*FILE\.jsonl"):
        task_configs(["hellaswag"])


@pytest.mark.slow
def test_harness_accuracy_equals_own_loglikelihood_scoring_and_beats_chance(trained_export, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.cli.evaluate import main
    from pretrain.evals.loglik import multiple_choice, read_items

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)

    # the README's command, offline (in this process: the same main() as the console script)
    assert main(["--model", str(trained_export), "--tasks", str(TASK), "--json"]) == 0
    harness = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]["facts_choice"]
    model = AutoModelForCausalLM.from_pretrained(trained_export)
    tokenizer = AutoTokenizer.from_pretrained(trained_export)
    own = multiple_choice(model, tokenizer, read_items(ASSETS / "facts_choice.jsonl"))
    assert harness["acc"] == pytest.approx(own["acc"], abs=1e-6)
    assert harness["acc_norm"] == pytest.approx(own["acc_norm"], abs=1e-6)
    # chance is 1/4; two standard deviations of 48 coin-of-four answers above it is 0.375
    assert own["acc"] >= 0.375, own

    assert main(["--model", str(trained_export), "--tasks", str(TASK), "--limit", "8"]) == 0
    assert "facts_choice/acc" in capsys.readouterr().out


def test_eval_tasks_are_refused_under_zero_3_before_training(facts_data, tmp_path, capsys):
    from pretrain.train import main

    recipe = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    recipe["eval"]["tasks"] = [str(TASK)]
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    code = main(
        [
            "--config",
            str(tmp_path / "r.json"),
            "--data",
            str(facts_data),
            "--deepspeed_config",
            "ds_configs/zero3_fp32.json",
            "--output-dir",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code != 0 and "eval.tasks: runs the whole model on rank 0, which ZeRO stage 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_ranks_log_the_tasks_during_training(facts_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    recipe["eval"].update(every=2, max_samples=8, tasks=[str(TASK)], tasks_limit=12)
    recipe["training"].update(max_steps=4, micro_batch_size=4)
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    out = tmp_path / "run"
    run(
        deepspeed_cmd(
            2,
            [
                "--config",
                str(tmp_path / "r.json"),
                "--data",
                str(facts_data),
                "--output-dir",
                str(out),
                "--no-progress",
            ],
        ),
        env=OFFLINE,
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tasks = [x for x in lines if x.get("split") == "eval"]
    assert [x["step"] for x in tasks] == [2, 4]
    assert all(0 <= x["facts_choice"]["acc"] <= 1 and "acc_norm" in x["facts_choice"] for x in tasks)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/facts_choice/acc")] == [2, 4]
    assert [e.value for e in acc.Scalars("eval/facts_choice/acc")] == pytest.approx(
        [x["facts_choice"]["acc"] for x in tasks]
    )
