"""pretrain/parallel/activation_checkpointing.py: activation checkpointing changes memory, not the math
(GPT and both CLIP towers)."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pretrain.models import get_family
from pretrain.models.clip import ContrastiveCLIP
from pretrain.parallel.activation_checkpointing import checkpoint_blocks
from pretrain.run.config import parse_recipe
from tests.test_clip_loss import batch, tiny_clip


def _checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _loss_and_grads(model: torch.nn.Module, run) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    torch.manual_seed(7)  # the dropout masks: checkpointing must replay the same ones in its recomputation
    loss = run(model)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b) -> None:
    assert abs(a[0] - b[0]) <= 1e-6 * abs(a[0])
    assert a[1].keys() == b[1].keys() and a[1]
    for name, g in a[1].items():
        torch.testing.assert_close(b[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_clip_with_checkpointed_towers_gives_the_same_loss_and_gradients():
    recipe = parse_recipe({"family": "clip", "model": {"arch": "clip"}, "training": {"activation_checkpointing": True}})
    b = batch(6)
    plain = ContrastiveCLIP(tiny_clip(0))
    checkpointed = ContrastiveCLIP(tiny_clip(0))
    assert checkpoint_blocks(checkpointed, get_family("clip"), recipe) == [
        "activation checkpointing (every transformer block)"
    ]
    assert checkpointed.clip.text_model.encoder.gradient_checkpointing
    assert checkpointed.clip.vision_model.encoder.gradient_checkpointing
    _same(_loss_and_grads(plain, lambda m: m(**b)), _loss_and_grads(checkpointed, lambda m: m(**b)))


def test_gpt_with_checkpointed_blocks_gives_the_same_loss_and_gradients():
    config = GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=3,
        n_head=2,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        use_cache=False,
    )
    torch.manual_seed(0)
    plain = GPT2LMHeadModel(config)
    checkpointed = GPT2LMHeadModel(config)
    checkpointed.load_state_dict(plain.state_dict())
    recipe = parse_recipe({"training": {"activation_checkpointing": True}})
    assert checkpoint_blocks(checkpointed, get_family("gpt"), recipe) and _checkpointing(checkpointed)
    assert checkpoint_blocks(plain, get_family("gpt"), parse_recipe({})) == [] and not _checkpointing(plain)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    batch_ = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    loss = get_family("gpt").loss
    _same(_loss_and_grads(plain, lambda m: loss(m, batch_)), _loss_and_grads(checkpointed, lambda m: loss(m, batch_)))
