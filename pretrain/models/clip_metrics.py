"""The numbers a CLIP evaluation reports: top-k hits with ties counted as misses (zero-shot,
retrieval), recall@k among a split's pairs, and the contrastive loss over the blocks of samples a
run's ranks gather; with the collectives that assemble them from every rank."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from pretrain.models.contrastive import gather_no_grad, local_row_losses


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, ks: Iterable[int]) -> dict[int, int]:
    """For each k, how many rows have their target among the k highest logits.

    The target ranks below every other column that scores as high as it does: a tie is a miss, so
    a collapsed tower (every logit of a row equal) scores nothing rather than everything. A NaN
    target logit ranks last; a NaN elsewhere ranks above the target."""
    target_logit = logits.gather(1, targets[:, None])
    rank = (~(logits < target_logit)).sum(dim=1) - 1  # the other columns at or above the target
    return {k: int((rank < k).sum()) for k in ks}


def grouped_loss(
    image: torch.Tensor, text: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, size: int
) -> torch.Tensor:
    """[loss sum, rows] of the contrastive loss over the samples whose split positions fall in
    each block of ``size``: a run with eval batch B on W ranks gathers exactly samples
    [kWB, (k+1)WB) in its k-th batch (sample i on rank i % W). Rows not decoded are absent here
    and masked there, so the sums agree. Every rank holds every row: nothing is gathered here."""
    total = torch.zeros(2, dtype=torch.float64)
    block = index // size
    for b in torch.unique(block):
        rows = block == b
        losses = local_row_losses(image[rows], text[rows], scale)
        total += torch.tensor([float(losses.sum()), int(rows.sum())], dtype=torch.float64)
    return total


def all_reduce_host(t: torch.Tensor, device) -> torch.Tensor:
    """Sum a host tensor over ranks, through ``device`` (NCCL reduces device tensors only)."""
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def gather_rows(
    feats_i: list, feats_t: list, index: list, world: int, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's valid eval rows (image, text embeddings, position in the split), in split order."""
    image, text, idx = torch.cat(feats_i), torch.cat(feats_t), torch.cat(index)
    if world > 1:
        image, text, idx = image.to(device), text.to(device), idx.to(device)
        # Ranks hold different numbers of valid rows: pad to the longest, gather, drop the padding.
        n = torch.tensor([idx.numel()], device=device)
        counts = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(counts, n)
        longest = int(max(c.item() for c in counts))
        pad = longest - idx.numel()
        image = torch.cat([image, image.new_zeros(pad, image.shape[1])])
        text = torch.cat([text, text.new_zeros(pad, text.shape[1])])
        idx = torch.cat([idx, idx.new_full((pad,), -1)])
        image, text, idx = gather_no_grad(image), gather_no_grad(text), gather_no_grad(idx)
        keep = idx >= 0
        image, text, idx = image[keep].cpu(), text[keep].cpu(), idx[keep].cpu()
    order = torch.argsort(idx)
    return image[order], text[order], idx[order]


def retrieval(image: torch.Tensor, text: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of image->text and text->image retrieval among the given pairs (row i of each
    is a pair). A tie counts as missed (`topk_hits`), so identical captions in the split cost
    recall: a pair is found only when its own caption scores strictly above the others."""
    if image.shape[0] == 0:
        return {}
    sims = image @ text.T
    target = torch.arange(sims.shape[0])
    i2t, t2i = topk_hits(sims, target, ks), topk_hits(sims.T, target, ks)
    n = sims.shape[0]
    out = {f"image_to_text_R@{k}": i2t[k] / n for k in ks}
    out.update({f"text_to_image_R@{k}": t2i[k] / n for k in ks})
    out["retrieval_pairs"] = n
    return out
