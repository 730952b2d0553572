"""A table of bad configurations given to the real entry point: each is refused before any rank
starts (exit 2), with every problem named by file and key, and nothing written to the output."""

from __future__ import annotations

import json
import os

import pytest

from pretrain.train import main
from tests.launch import REPO, with_key

GPT = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
CLIP = json.loads((REPO / "pretrain/recipes/clip-tiny.json").read_text())
DS = json.loads((REPO / "ds_configs/zero2_fp32.json").read_text())


# (case, recipe, DeepSpeed config, extra CLI arguments, expected fragments of the message)
CASES = [
    ("unknown key", with_key(GPT, "training.lrr", 1e-3), DS, [], ["training.lrr: unknown key (did you mean 'lr'?)"]),
    (
        "wrong type",
        with_key(GPT, "training.micro_batch_size", "eight"),
        DS,
        [],
        ["training.micro_batch_size", '"eight"'],
    ),
    ("out of range", with_key(GPT, "training.lr", -1.0), DS, [], ["training.lr", "greater than 0"]),
    ("min_lr above lr", with_key(GPT, "training.min_lr", 1.0), DS, [], ["min_lr 1.0 is above lr"]),
    ("heads do not divide", with_key(GPT, "model.num_heads", 3), DS, [], ["not divisible by num_heads 3"]),
    (
        "batch arithmetic",
        GPT,
        {**DS, "train_batch_size": 999, "train_micro_batch_size_per_gpu": 8},
        [],
        ["1 problem(s)", "train_batch_size 999 is not a multiple of"],
    ),
    (
        "batch arithmetic, all concrete",
        GPT,
        {**DS, "train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2},
        [],
        [
            "train_batch_size 64 != train_micro_batch_size_per_gpu 8 x gradient_accumulation_steps 2 x "
            "data-parallel size 1 (= 16)"
        ],
    ),
    (
        "vocabulary exceeds the model",
        with_key(GPT, "model.vocab_size", 16),
        DS,
        [],
        ["model.vocab_size: 16 is smaller than the tokenizer's vocabulary"],
    ),
    (
        "sequence longer than positions",
        with_key(GPT, "model.max_position_embeddings", 16),
        DS,
        [],
        ["model.max_position_embeddings: 16 is shorter than the data's seq_len 64"],
    ),
    (
        "missing data directory",
        GPT,
        DS,
        ["--data", "/nonexistent/data"],
        ["data.path: /nonexistent/data/manifest.json not found"],
    ),
    (
        "missing init_from",
        GPT,
        DS,
        ["--init-from", "/nonexistent/model"],
        ["model.init_from: /nonexistent/model/config.json not found"],
    ),
    (
        "missing DeepSpeed config",
        GPT,
        None,
        ["--deepspeed_config", "/nonexistent/ds.json"],
        ["/nonexistent/ds.json", "DeepSpeed config not found"],
    ),
    (
        "resume from what is not a checkpoint",
        GPT,
        DS,
        ["--resume", "/nonexistent/ckpt"],
        ["--resume /nonexistent/ckpt: not a complete checkpoint (no toolkit.json)"],
    ),
    (
        "fp16 on a CPU",
        with_key(GPT, "training.precision", "fp16"),
        json.loads((REPO / "ds_configs/zero2_fp16.json").read_text()),
        [],
        ["fp16.enabled: fp16 training needs a GPU"],
    ),
    ("fp16 as a bare boolean", GPT, {**DS, "fp16": True}, [], ['fp16: must be an object such as {"enabled": true}']),
    (
        "flash attention on a CPU",
        with_key(GPT, "model.attn_implementation", "flash_attention_2"),
        DS,
        [],
        ["model.attn_implementation: flash_attention_2 needs a CUDA GPU"],
    ),
    (
        "family and arch disagree",
        with_key(GPT, "family", "clip"),
        DS,
        [],
        ["family 'clip' does not go with model.arch 'gpt2'"],
    ),
    ("image recipe on text shards", CLIP, DS, [], ["kind is 'text', expected 'image-text'"]),
    (
        "freeze pattern matches nothing",
        with_key(GPT, "model.freeze", ["transformer.hh"]),
        DS,
        [],
        ["model.freeze: ['transformer.hh'] match no parameter"],
    ),
    (
        "bad freeze regex",
        with_key(GPT, "model.freeze", ["(unclosed"]),
        DS,
        [],
        ["model.freeze: '(unclosed' is not a regular expression"],
    ),
    (
        "several problems at once",
        with_key(with_key(GPT, "model.vocab_size", 16), "model.max_position_embeddings", 16),
        {**DS, "train_batch_size": 999, "train_micro_batch_size_per_gpu": 8},
        [],
        [
            "3 problem(s)",
            "model.vocab_size",
            "model.max_position_embeddings",
            "train_batch_size 999 is not a multiple of train_micro_batch_size_per_gpu 8",
        ],
    ),
]


@pytest.fixture
def isolated_env(monkeypatch):
    # main() makes a one-process world in os.environ; keep it out of the other tests.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)


@pytest.mark.parametrize("case,recipe,ds,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_refused_before_any_work(
    case, recipe, ds, extra, expected, prepared_stdlib, tmp_path, capsys, isolated_env
):
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(json.dumps(recipe))
    args = [
        "--config",
        str(recipe_path),
        "--data",
        str(prepared_stdlib),
        "--output-dir",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    if ds is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        args += ["--deepspeed_config", str(tmp_path / "ds.json")]
    args += extra  # later flags win
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in expected:
        assert fragment in err, f"{case}: {fragment!r} not in\n{err}"
    source = "/nonexistent/ds.json" if case == "missing DeepSpeed config" else str(recipe_path)
    assert source in err or str(tmp_path / "ds.json") in err, "the message names the file"
    assert not (tmp_path / "out").exists(), "nothing written"


def test_invalid_json_names_line_and_column(tmp_path, capsys, isolated_env):
    bad = tmp_path / "r.json"
    bad.write_text('{"name": "x",\n "training": {"lr": 1e-3,}}')
    assert main(["--config", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "invalid JSON at line 2" in err and not (tmp_path / "out").exists()
