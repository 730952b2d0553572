"""The contrastive loss across ranks (OpenCLIP's "local loss with gathered features"): every rank
all-gathers the image and text embeddings of the micro-step's whole batch (gradients flow back to
the rank that computed them), scores its own rows against every column, and DeepSpeed's gradient
averaging then gives exactly the gradient of one process holding that batch: micro-batch x ranks
negatives per micro-step (gradient accumulation does not add negatives).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows.

    Written with all_reduce rather than torch.distributed.nn's all_gather, whose backward
    needs reduce_scatter or all_to_all: every backend (gloo included) has all_reduce.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of every rank concatenated in rank order, offset of this rank's rows). Every rank
    must pass the same number of rows."""
    rank, world = _world()
    if world == 1:
        return x, 0
    return _GatherWithGrad.apply(x), rank * x.shape[0]


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def contrastive_row_losses(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against the global batch, one value per local row.

    `image` and `text` are L2-normalised (B, D) embeddings of the same B pairs; `scale` is the
    inverse temperature. Columns whose `weight` is 0 (eval padding) are not negatives, and rows
    whose weight is 0 get loss 0.
    """
    all_image, offset = gather_with_grad(image)
    all_text, _ = gather_with_grad(text)
    logits_per_image = scale * image @ all_text.T
    logits_per_text = scale * text @ all_image.T
    labels = torch.arange(image.shape[0], device=image.device) + offset
    if weight is not None:
        padding = gather_no_grad(weight.to(image.device).float()) <= 0
        logits_per_image = logits_per_image.masked_fill(padding, float("-inf"))
        logits_per_text = logits_per_text.masked_fill(padding, float("-inf"))
    losses = (
        F.cross_entropy(logits_per_image, labels, reduction="none")
        + F.cross_entropy(logits_per_text, labels, reduction="none")
    ) / 2
    if weight is not None:
        losses = torch.where(weight.to(losses.device) > 0, losses, torch.zeros_like(losses))
    return losses
