"""Run features as objects (pretrain/run/feature.py, pretrain/run/features.py): one list, one rule each,
and one model build for training and for loading a checkpoint."""

from __future__ import annotations

import json
import types

import pytest
import torch

from pretrain.models import get_family
from pretrain.parallel.layout import ParallelLayout
from pretrain.parallel.tensor_parallel import merge_shards
from pretrain.run import features
from pretrain.run.build import build_model, full_shapes
from pretrain.run.config import parse_recipe
from pretrain.run.feature import EngineParts, Feature, RunContext
from pretrain.runtime.checkpoint import CheckpointRef

LLAMA = {
    "arch": "llama",
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "vocab_size": 96,
}


class _Tokenizer:
    eos_token_id = 0

    def __len__(self) -> int:
        return 96


def _context(model: dict, layout: ParallelLayout, ds: dict | None = None, chat: bool = False) -> RunContext:
    recipe = parse_recipe({"model": model})
    family = get_family("gpt")
    config = family.model_config(recipe.model, _Tokenizer())
    data = types.SimpleNamespace(chat=chat, seq_len=64)
    return RunContext(
        recipe, family, config, data, layout, ds if ds is not None else {"zero_optimization": {}}, "ds.json"
    )


def test_every_feature_is_listed_once_in_a_fixed_order_and_implements_the_interface():
    names = [f.name for f in features.FEATURES]
    assert len(names) == len(set(names))
    assert names.index("freezing") < names.index("LoRA"), "peft adapts what freezing left"
    assert all(isinstance(f, Feature) for f in features.FEATURES)


def test_lora_with_tensor_parallelism_is_refused_naming_both_keys(tmp_path):
    ctx = _context({**LLAMA, "lora": {"r": 4}, "init_from": None}, ParallelLayout(world=2, tp=2))
    lines = [p for p in features.problems(ctx) if "model.lora together with" in p]
    assert len(lines) == 1 and "ds.json: tensor_parallel.autotp_size 2" in lines[0], features.problems(ctx)
    without_tp = _context({**LLAMA, "lora": {"r": 4}}, ParallelLayout(world=2))
    assert not [p for p in features.problems(without_tp) if "together with" in p]


def test_two_features_claiming_one_engine_part_is_an_error():
    parts, owners = EngineParts(), {}
    parts.merge(EngineParts(mpu="groups"), "tensor parallelism", owners)
    with pytest.raises(RuntimeError, match="tensor parallelism and sequence parallelism both provide the engine's mpu"):
        parts.merge(EngineParts(mpu="other"), "sequence parallelism", owners)


def test_a_tensor_the_tp_merge_cannot_place_is_an_error_not_rank_zeros_copy():
    full = {"w": torch.Size([4, 2]), "b": torch.Size([2])}
    shards = [{"w": torch.zeros(2, 2), "b": torch.ones(2)}, {"w": torch.ones(2, 2), "b": torch.ones(2)}]
    assert merge_shards(shards, full)["w"].shape == (4, 2)
    for s in shards:
        s["lora_A"] = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="lora_A: a tensor in the TP shards that the model has no parameter for"):
        merge_shards(shards, full)


def test_a_checkpoint_is_rebuilt_with_its_adapters_by_the_build_that_trained_it(tmp_path):
    """full_shapes (the TP merge), load_model (eval, export, WiSE-FT) and the trainer share build_model:
    a LoRA run's shapes include the adapters, frozen parameters stay frozen."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(base)
    recipe = parse_recipe({"model": {"init_from": str(base), "lora": {"r": 4}, "freeze": ["wpe"]}})
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "resolved-config.json").write_text(json.dumps({"recipe": recipe.model_dump(mode="json")}))
    GPT2Config.from_pretrained(base).save_pretrained(run / "model")
    shapes = full_shapes(CheckpointRef("deepspeed", run / "checkpoints" / "step_00000001", run, "step_00000001"))
    assert any("lora_A" in k for k in shapes) and any("base_layer" in k for k in shapes), sorted(shapes)[:8]
    trained = build_model(get_family("gpt"), recipe.model, GPT2Config.from_pretrained(base))
    assert {k: tuple(v.shape) for k, v in trained.model.state_dict().items()} == {
        k: tuple(v) for k, v in shapes.items()
    }
    assert trained.adapter is not None and any("froze" in d for d in trained.done)
    assert not [n for n, p in trained.model.named_parameters() if p.requires_grad and "lora_" not in n]
