"""The contrastive loss across ranks and micro-batches.

Training (`ContrastiveStep`, the run feature `ContrastiveBatch`): the contrastive batch is the
whole optimizer step, micro-batch x accumulation x data-parallel ranks pairs, so the gradient is
that of one process holding the step's batch whatever the (micro, accumulation, world) split.
Every micro-batch's embeddings are first computed without gradients (under accumulation: one extra
forward per micro-batch, its random state replayed so that dropout draws the same masks), gathered
from every rank with each row's logsumexp, then each micro-batch is run again with gradients and
scored against them (`step_contrastive_loss`, GradCache / OpenCLIP's ``accum_freq``). Without
accumulation the micro-batch's own forward gives the columns: no extra forward.

Evaluation (`contrastive_row_losses`): each rank all-gathers the embeddings of the batch
(OpenCLIP's "local loss with gathered features") and scores its own rows, padding masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def local_row_losses(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of the given pairs among themselves, one value per pair, whatever the
    ranks hold (no collective)."""
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")) / 2


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


# ------------------------------------------------------------------------------------ the step's batch


@torch.no_grad()
def row_logsumexp(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, chunk: int) -> torch.Tensor:
    """logsumexp over the columns of ``scale * rows @ cols.T``, ``chunk`` rows at a time (never the
    whole matrix)."""
    out = [torch.logsumexp(scale * rows[i : i + chunk] @ cols.T, dim=1) for i in range(0, rows.shape[0], chunk)]
    return torch.cat(out) if out else rows.new_zeros(0)


@dataclass
class StepColumns:
    """Every pair of an optimizer step (all its micro-batches on all ranks), without gradients: the
    embeddings in (rank, micro-batch, row) order and each row's logsumexp over all columns, in both
    directions. What each micro-batch's loss is scored against."""

    image: torch.Tensor  # (N, D)
    text: torch.Tensor  # (N, D)
    lse_image: torch.Tensor  # (N,): logsumexp_j of scale * image_i . text_j
    lse_text: torch.Tensor  # (N,): logsumexp_i of scale * text_j . image_i
    scale: torch.Tensor  # the inverse temperature they were scored with

    def row_losses(self) -> torch.Tensor:
        """Each pair's loss against the step, from the cached embeddings alone."""
        return (self.lse_image + self.lse_text) / 2 - self.scale * (self.image * self.text).sum(dim=1)


def step_columns(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, chunk: int, group=None) -> StepColumns:
    """Gather this rank's embeddings of the whole step (its micro-batches in order, detached) from
    every rank, and the logsumexps of its rows, gathered too: two all-gathers, a (chunk, N) block
    of logits at a time. Collective over ``group`` (None: every rank)."""
    mine = torch.cat([image, text], dim=1).detach()
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if _world()[1] > 1 else (0, 1)
    both = _gather(mine, group, world)
    d = image.shape[1]
    all_image, all_text = both[:, :d], both[:, d:]
    s = scale.detach().to(mine.dtype).reshape(())
    lse = torch.stack(
        [row_logsumexp(mine[:, :d], all_text, s, chunk), row_logsumexp(mine[:, d:], all_image, s, chunk)], dim=1
    )
    lse = _gather(lse, group, world)
    return StepColumns(all_image, all_text, lse[:, 0], lse[:, 1], s)


def _gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def step_contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, cols: StepColumns
) -> torch.Tensor:
    """The summed symmetric InfoNCE of one micro-batch's pairs (whose cached rows are among the
    columns) against every pair of the step, whose gradient, summed over the step's micro-batches and
    ranks, is the gradient of the whole step's summed loss (GradCache, Gao et al. 2021; OpenCLIP's
    ``accum_freq``), while no rank holds more than (micro-batch x step) logits.

    With L = 1/2 sum_i [lse_i(image) - s x_i.t_i] + 1/2 sum_j [lse_j(text) - s t_j.x_j], a live
    embedding x_a receives gradient from its own row (its logsumexp against the cached columns)
    and from every text row's logsumexp through column a; the second is written as
    sum_j exp(s t_j.x_a - lse_j), whose gradient in x_a is s p_ja t_j: that term adds nothing to
    the value (it enters as e - e.detach()) and holds the temperature constant (its derivative in s
    is in the row terms already). The positive pair is live on both sides. ``image`` and ``text``
    are the micro-batch's L2-normalised embeddings with gradients; ``scale`` the live inverse
    temperature.
    """
    s, fixed = scale.reshape(()), scale.detach().reshape(())
    row_image = torch.logsumexp(s * image @ cols.text.T, dim=1)
    row_text = torch.logsumexp(s * text @ cols.image.T, dim=1)
    positive = s * (image * text).sum(dim=1)
    # every row's logsumexp through these columns (its own rows' included), gradient only
    through_image = torch.exp(fixed * cols.text @ image.T - cols.lse_text[:, None]).sum()
    through_text = torch.exp(fixed * cols.image @ text.T - cols.lse_image[:, None]).sum()
    gradient_only = (through_image - through_image.detach()) + (through_text - through_text.detach())
    return ((row_image + row_text) / 2 - positive).sum() + gradient_only / 2


class ContrastiveStep:
    """The loop's `pretrain.run.feature.StepLoss` for contrastive models (see the module's text).

    Memory beyond a run without it: the step's embeddings, 2 x N x D fp32 (N = micro x
    accumulation x ranks, D the projection width), and (micro, N) logits per micro-batch, where the
    per-micro-step loss held (micro, micro x ranks)."""

    def __init__(self, group=None):
        self.group = group  # where model replicas meet (None: every rank)
        self.batches: list[dict] = []
        self.columns: StepColumns | None = None
        self.rng: list[dict[str, torch.Tensor]] = []

    def begin(self, engine: Any, batches: list[dict]) -> None:
        from pretrain.runtime.rng import generator_states

        self.batches, self.columns, self.rng = list(batches), None, []
        if len(batches) == 1:  # the micro-batch's own forward gives the columns
            return
        image, text, scale = [], [], None
        with torch.no_grad():
            for batch in batches:
                self.rng.append(generator_states())
                out = engine(**_inputs(batch), embeddings=True)
                image.append(out["image"])
                text.append(out["text"])
                scale = out["scale"]
        self.columns = step_columns(torch.cat(image), torch.cat(text), scale, image[0].shape[0], self.group)

    def __call__(self, engine: Any, micro: int, batch: dict) -> torch.Tensor:
        from pretrain.runtime.rng import set_generator_states

        if batch is not self.batches[micro]:
            # a non-finite micro-batch replaced on every rank alike (ZeRO-0): score the rest against
            # the step as it now is (the micro-batches already back-propagated saw the old one)
            self.begin(engine, [*self.batches[:micro], batch, *self.batches[micro + 1 :]])
        if self.rng:
            set_generator_states(self.rng[micro])  # dropout draws the masks the cached pass drew
        out = engine(**_inputs(batch), embeddings=True)
        columns = self.columns or step_columns(out["image"], out["text"], out["scale"], batch_rows(batch), self.group)
        return step_contrastive_loss(out["image"], out["text"], out["scale"], columns)


def _inputs(batch: dict) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}


def batch_rows(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


def step_cache_bytes(pairs: int, dim: int, micro: int) -> int:
    """The memory `ContrastiveStep` adds on a rank: the step's embeddings and logsumexps (fp32), and
    one micro-batch's logits against the step with their softmax and gradient (three (micro, N)
    fp32 blocks per direction), for ``pairs`` = N pairs per step."""
    return 4 * (2 * pairs * dim + 2 * pairs) + 4 * 2 * 3 * micro * pairs
