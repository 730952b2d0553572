"""What a load may run (security issue items 3, 4, 5, 9): code shipped in a tokenizer or model
directory runs only with --trust-remote-code on the command line (never from a recipe, never from a
'y' on stdin); DeepSpeed's pickled checkpoint files are read with weights_only=True, and one that
needs more is refused naming the file and --trust-checkpoint; a `latest` that leaves the run is
refused by resume, pretrain-eval and pretrain-export alike."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import REPO, prepare_small_corpus
from tests.launch import world_of_one as launch_world_of_one

TAG = "step_00000001"


def _code_dir(directory: Path, marker: Path, *, model: bool = False) -> Path:
    """A tokenizer directory (and with ``model`` a tiny GPT-2 beside it) whose auto_map points at a
    module of its own that writes ``marker`` when imported."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_pipelines.text.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer([f"def f{i}(x): return x + {i}" for i in range(200)], 300)
    tok.save_pretrained(directory)
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="MarkerTokenizer", auto_map={"AutoTokenizer": [None, "marker_code.MarkerTokenizer"]})
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    (directory / "marker_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import GPT2Config, PreTrainedTokenizerFast\n"
        "class MarkerTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        "class MarkerConfig(GPT2Config):\n    model_type = 'marker_gpt'\n"
    )
    if model:
        GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
            directory
        )
        config = json.loads((directory / "config.json").read_text())
        config.update(model_type="marker_gpt", auto_map={"AutoConfig": "marker_code.MarkerConfig"})
        (directory / "config.json").write_text(json.dumps(config))
    return directory


class _Poison:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepare_small_corpus(tmp_path_factory.mktemp("trust") / "data", 3, 5_000, 9_000, 400, 20)


@pytest.fixture(scope="module")
def world_of_one():
    with launch_world_of_one():
        yield


def _trainer(argv: list[str]):
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    args = build_parser().parse_args([*argv, "--no-progress"])
    resolved, inputs, run_dir = prepare(args)
    return Trainer(resolved, inputs, run_dir, args.resume, progress=False)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory, world_of_one) -> Path:
    """A real one-step gpt-tiny run (ZeRO-2: DeepSpeed's model file and its optimizer partition)."""
    out = tmp_path_factory.mktemp("trust-run") / "run"
    trainer = _trainer(["--config", "gpt-tiny", "--data", str(corpus), "--output-dir", str(out), "--max-steps", "1"])
    trainer.setup()
    trainer.fit()
    assert (out / "checkpoints" / TAG / "mp_rank_00_model_states.pt").is_file()
    return out


def _poisoned_copy(run: Path, dest: Path, marker: Path) -> Path:
    """A copy of the run whose model file runs code when unpickled, its seal's checksum rewritten to
    match (as whoever can write the files can): the safe loader, not the checksum, must refuse it."""
    from pretrain.runtime.ckpt_verify import file_entry

    shutil.copytree(run, dest)
    poisoned = dest / "checkpoints" / TAG / "mp_rank_00_model_states.pt"
    torch.save({"module": _Poison(marker)}, poisoned)
    seal_path = poisoned.parent / "toolkit.json"
    seal = json.loads(seal_path.read_text())
    seal["files"][poisoned.name] = file_entry(poisoned)
    seal_path.write_text(json.dumps(seal))
    return dest


def _cli(main, argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


# ------------------------------------------------------------------------------ items 3 and 4


def test_a_tokenizer_with_code_is_refused_by_prepare_text_even_with_y_on_stdin(tmp_path):
    marker = tmp_path / "MARKER"
    tok = _code_dir(tmp_path / "tok", marker)
    src = tmp_path / "c"
    src.mkdir()
    (src / "a.py").write_text("def f(x):\n    return x\n" * 50)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipelines.text.prepare",
            str(src),
            "--tokenizer",
            str(tok),
            "--output",
            str(tmp_path / "out"),
        ],
        input="y\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "--trust-remote-code" in proc.stderr and str(tok) in proc.stderr
    assert not marker.exists(), "the tokenizer's module ran"


def test_every_hf_load_passes_trust_remote_code_and_names_the_flag(tmp_path, monkeypatch, capsys):
    from transformers import AutoConfig, AutoTokenizer

    from pretrain.cli import evaluate, generate
    from pretrain.runtime.checkpoint import CheckpointError, hf_load, trusting

    marker = tmp_path / "MARKER"
    model = _code_dir(tmp_path / "model", marker, model=True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    for load in (AutoTokenizer.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(CheckpointError, match="--trust-remote-code"):
            hf_load(load, model)
    rc, out = _cli(generate.main, ["--model", str(model), "--max-new-tokens", "2"], capsys)
    assert rc == 2 and "--trust-remote-code" in out
    rc, out = _cli(evaluate.main, ["--model", str(model), "--data", str(tmp_path)], capsys)
    assert rc == 2 and "--trust-remote-code" in out
    assert not marker.exists(), "a directory's module ran"
    with trusting(remote_code=True):  # the command-line flag is what runs it
        hf_load(AutoTokenizer.from_pretrained, model)
    assert marker.exists()


def test_a_recipe_asking_for_remote_code_runs_none_without_the_flag(corpus, tmp_path, monkeypatch, capsys):
    from pretrain.run.config import RecipeError

    marker = tmp_path / "MARKER"
    data = shutil.copytree(corpus, tmp_path / "data")  # its tokenizer/ now asks for its own code
    shutil.rmtree(data / "tokenizer")
    _code_dir(data / "tokenizer", marker)
    recipe = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    recipe["model"]["trust_remote_code"] = True
    path = tmp_path / "shared-recipe.json"
    path.write_text(json.dumps(recipe))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    argv = ["--config", str(path), "--data", str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]
    with pytest.raises(RecipeError, match="--trust-remote-code"):
        _trainer(argv)
    assert "model.trust_remote_code is ignored" in capsys.readouterr().err
    assert not marker.exists(), "the recipe alone ran the tokenizer's code"


# ------------------------------------------------------------------------------ items 5 and 9


def test_a_poisoned_deepspeed_file_is_refused_by_eval_export_and_resume(run, corpus, tmp_path, capsys):
    from pretrain.cli import evaluate, export
    from pretrain.run.build import fp32_state_dict
    from pretrain.runtime.checkpoint import CheckpointError, resolve_checkpoint, trusting

    marker = tmp_path / "MARKER"
    bad = _poisoned_copy(run, tmp_path / "bad", marker)
    poisoned = str(bad / "checkpoints" / TAG / "mp_rank_00_model_states.pt")
    rc, out = _cli(evaluate.main, ["--checkpoint", str(bad), "--data", str(corpus), "--max-samples", "8"], capsys)
    assert rc == 2 and poisoned in out and "--trust-checkpoint" in out, out
    rc, out = _cli(export.main, ["--checkpoint", str(bad), "--output", str(tmp_path / "export")], capsys)
    assert rc == 2 and poisoned in out and "--trust-checkpoint" in out, out
    trainer = _trainer(["--config", "gpt-tiny", "--data", str(corpus), "--output-dir", str(bad), "--max-steps", "2"])
    with pytest.raises(CheckpointError, match="--trust-checkpoint") as e:
        trainer.setup()
    assert poisoned in str(e.value)
    assert not marker.exists(), "the pickle ran its command"
    with trusting(checkpoint=True), pytest.raises(Exception):  # the flag restores DeepSpeed's unpickling
        fp32_state_dict(resolve_checkpoint(bad))
    assert marker.exists()


def test_a_normal_checkpoint_still_evaluates_exports_and_resumes(run, corpus, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from pretrain.cli import evaluate, export

    rc, out = _cli(
        evaluate.main, ["--checkpoint", str(run), "--data", str(corpus), "--max-samples", "8", "--json"], capsys
    )
    assert rc == 0, out
    rc, out = _cli(export.main, ["--checkpoint", str(run), "--output", str(tmp_path / "export")], capsys)
    assert rc == 0, out
    AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=False)
    again = shutil.copytree(run, tmp_path / "again")
    trainer = _trainer(["--config", "gpt-tiny", "--data", str(corpus), "--output-dir", str(again), "--max-steps", "2"])
    trainer.setup()
    assert trainer.state.step == 1, "resumed from the step-1 checkpoint (its optimizer partition read safely)"
    trainer.fit()
    assert trainer.state.step == 2


def test_latest_pointing_outside_the_run_is_refused_by_eval_and_export(run, corpus, tmp_path, capsys):
    from pretrain.cli import evaluate, export
    from pretrain.runtime.checkpoint import CheckpointError, resolve_checkpoint

    elsewhere = shutil.copytree(run, tmp_path / "elsewhere")
    victim = shutil.copytree(run, tmp_path / "victim")
    shutil.rmtree(victim / "checkpoints" / TAG)
    latest = victim / "checkpoints" / "latest"
    latest.write_text(os.path.relpath(elsewhere / "checkpoints" / TAG, victim / "checkpoints"))
    with pytest.raises(CheckpointError, match="outside"):
        resolve_checkpoint(victim)
    rc, out = _cli(evaluate.main, ["--checkpoint", str(victim), "--data", str(corpus), "--max-samples", "8"], capsys)
    assert rc == 2 and str(latest) in out and "outside" in out, out
    rc, out = _cli(export.main, ["--checkpoint", str(victim), "--output", str(tmp_path / "export")], capsys)
    assert rc == 2 and str(latest) in out and "outside" in out, out
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
@pytest.mark.parametrize("ds", ["zero0_bf16", "zero1_bf16", "zero3_bf16", "zero3_offload_bf16", "zero1_fp32"])
def test_every_shipped_stage_and_precision_resumes_and_evaluates_under_the_safe_loader(
    corpus, tmp_path, ds, capsys, world_of_one
):
    """The allowlist holds what DeepSpeed's own files need on this machine's stages and precisions (fp16 is
    GPU-only): a checkpoint of each resumes and evaluates without --trust-checkpoint."""
    from pretrain.cli.evaluate import main as evaluate_main

    out = tmp_path / "run"
    argv = ["--config", "gpt-tiny", "--data", str(corpus), "--output-dir", str(out), "--checkpoint-every", "1"]
    argv += ["--deepspeed_config", str(REPO / f"ds_configs/{ds}.json"), "--eval-every", "0"]
    if "bf16" in ds:
        recipe = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
        recipe["training"]["precision"] = "bf16"
        (tmp_path / "bf16.json").write_text(json.dumps(recipe))
        argv[1] = str(tmp_path / "bf16.json")
    first = _trainer([*argv, "--max-steps", "1"])
    first.setup()
    first.fit()
    resumed = _trainer([*argv, "--max-steps", "2"])
    resumed.setup()
    assert resumed.state.step == 1
    resumed.fit()
    rc, text = _cli(evaluate_main, ["--checkpoint", str(out), "--data", str(corpus), "--max-samples", "8"], capsys)
    assert rc == 0, text
