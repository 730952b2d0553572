"""The contrastive loss: equal to transformers' own CLIP loss on one process, and across ranks
equal (loss and gradients) to one process holding the whole global batch."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from pretrain.models.clip import ContrastiveCLIP, contrastive_row_losses
from pretrain.models.clip_metrics import retrieval, topk_hits

B = 4  # rows per rank


def tiny_clip(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    text = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        eos_token_id=1,
        pad_token_id=1,
        bos_token_id=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))


def batch(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (n, 8), generator=g)
    lengths = torch.randint(3, 8, (n,), generator=g)
    mask = torch.zeros(n, 8, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, length - 1] = 1  # eos, where CLIP pools the text
        ids[i, length:] = 1
        mask[i, :length] = 1
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g), "input_ids": ids, "attention_mask": mask}


def test_loss_equals_transformers_clip_loss() -> None:
    clip = tiny_clip()
    b = batch(6)
    expected = clip(**b, return_loss=True).loss
    ours = ContrastiveCLIP(clip)(**b)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_temperature_is_clamped_at_max_scale() -> None:
    model = ContrastiveCLIP(tiny_clip(), max_logit_scale=100.0)
    with torch.no_grad():
        model.clip.logit_scale.fill_(10.0)  # exp(10) ~ 22026 > 100
    # bounded after each optimizer step (as OpenCLIP does), not inside the forward: a clamp there zeroed
    # the gradient above the bound, so a temperature that crossed it could never come back (issue 22)
    model.clamp_logit_scale()
    assert model.scale().item() == pytest.approx(100.0)
    model(**batch(4)).backward()
    assert model.clip.logit_scale.grad.abs().item() > 0.0, "at the bound the gradient still flows"


def test_padding_rows_are_neither_rows_nor_negatives() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    keep = weight > 0
    padded = contrastive_row_losses(image, text, scale, weight)
    alone = contrastive_row_losses(image[keep], text[keep], scale)
    assert torch.allclose(padded[keep], alone, atol=1e-6) and (padded[~keep] == 0).all()


def test_topk_and_retrieval_recall() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.1, 0.7], [0.5, 0.5, 0.0]])
    hits = topk_hits(logits, torch.tensor([0, 0, 1]), (1, 2))
    assert hits == {1: 1, 2: 3}, "row 3 ties with the top: a tie is a miss at k=1 (a collapsed tower reads chance)"
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # pairs 1 and 2 swapped
    r = retrieval(image, text, ks=(1, 2))
    assert r["image_to_text_R@1"] == pytest.approx(1 / 3) and r["text_to_image_R@1"] == pytest.approx(1 / 3)
    # a swapped pair's right text scores 0, tied with a wrong one below the top: a miss at k=2 as well
    assert r["image_to_text_R@2"] == pytest.approx(1 / 3) and r["retrieval_pairs"] == 3


# ------------------------------------------------------------------------------------ two ranks


def _grads(model: ContrastiveCLIP) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    # The reference first, while this process is still a world of one: batch 2B on one rank.
    full = batch(world * B)
    ref_model = ContrastiveCLIP(tiny_clip())
    ref_loss = ref_model(**full)
    ref_loss.backward()
    ref = {"loss": ref_loss.item(), "grads": _grads(ref_model)}

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = ContrastiveCLIP(tiny_clip())
    mine = {k: v[rank * B : (rank + 1) * B] for k, v in full.items()}
    loss = model(**mine)
    loss.backward()
    # What DeepSpeed (and DDP) do with gradients: average over ranks.
    grads = _grads(model)
    for g in grads.values():
        dist.all_reduce(g)
        g /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.save({"ref": ref, "loss": mean_loss.item() / world, "grads": grads}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_with_batch_b_equal_one_rank_with_batch_2b(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        ref = got["ref"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) > 10
        for name, g in ref["grads"].items():
            assert torch.allclose(got["grads"][name], g, rtol=1e-4, atol=1e-6), name
    # Without the gather each rank would only see B - 1 negatives: a different (smaller) loss.
    local = ContrastiveCLIP(tiny_clip())(**{k: v[:B] for k, v in batch(2 * B).items()}).item()
    assert not math.isclose(local, ref["loss"], rel_tol=1e-3)
