"""The DeepSpeed config's activation_checkpointing section (pretrain/parallel/activation_checkpointing.py): with
training.activation_checkpointing it swaps in DeepSpeed's checkpoint function, and the losses and
gradients stay those of the model without checkpointing; options that fail are refused up front."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pretrain.models import get_family
from pretrain.parallel.activation_checkpointing import (
    checkpoint_blocks,
    deepspeed_section_notes,
    deepspeed_section_problems,
)
from pretrain.run.config import parse_recipe
from tests.launch import world_of_one as launch_world_of_one
from tests.test_layout import _loss_and_grads, _same


@pytest.fixture
def world_of_one():
    with launch_world_of_one():
        yield


def test_deepspeed_checkpoint_function_keeps_losses_and_gradients(world_of_one):
    """Llama with the section's partitioned CPU checkpointing, attention dropout on: the
    recomputation replays the same masks, so losses and gradients are those without checkpointing."""
    import deepspeed

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        attention_dropout=0.1,
        use_cache=False,
    )
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config)
    checkpointed = LlamaForCausalLM(config)
    checkpointed.load_state_dict(plain.state_dict())
    recipe = parse_recipe({"model": {"arch": "llama"}, "training": {"activation_checkpointing": True}})
    section = {"activation_checkpointing": {"partition_activations": True, "cpu_checkpointing": True}}
    assert deepspeed_section_problems(section, "llama", "ds.json") == []
    done = checkpoint_blocks(checkpointed, get_family("gpt"), recipe, section)
    assert done == [
        "activation checkpointing (every transformer block) with DeepSpeed's checkpoint function "
        "(cpu_checkpointing, partition_activations)"
    ]
    blocks = [m for m in checkpointed.model.layers if getattr(m, "gradient_checkpointing", False)]
    assert len(blocks) == 2 and all(
        m._gradient_checkpointing_func is deepspeed.checkpointing.non_reentrant_checkpoint for m in blocks
    )
    ids = torch.randint(0, 64, (3, 16))

    def run(m):
        return m(input_ids=ids, labels=ids).loss

    _same(_loss_and_grads(plain, run), _loss_and_grads(checkpointed, run))


def test_section_is_checked_before_ranks_and_noted_when_it_would_do_nothing():
    def problems(section, arch="llama"):
        return "\n".join(deepspeed_section_problems({"activation_checkpointing": section}, arch, "ds.json"))

    assert "must be an object" in problems(True)
    assert "contiguous_memory_optimization needs partition_activations: true" in problems(
        {"contiguous_memory_optimization": True}
    )
    for arch in ("gpt2", "clip"):
        assert f"runs the llama architecture's blocks only (it passes {arch}'s" in problems(
            {"partition_activations": True}, arch
        )
    assert problems({"partition_activations": True, "synchronize_checkpoint_boundary": True}) == ""
    assert problems({"profile": True}, "gpt2") == ""
    if not torch.cuda.is_available():
        assert "fails on DeepSpeed's CPU accelerator" in problems({"cpu_checkpointing": True}, "gpt2")
    ds = {"activation_checkpointing": {"partition_activations": True}}
    assert "only with training.activation_checkpointing: true" in deepspeed_section_notes(parse_recipe({}), ds)[0]
    assert deepspeed_section_notes(parse_recipe({"training": {"activation_checkpointing": True}}), ds) == []
