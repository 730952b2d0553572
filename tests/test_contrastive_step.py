"""The contrastive batch is the whole optimizer step (issue 22 item 4): the GradCache loss of each
micro-batch, scored against the step's cached embeddings, sums to the gradient of one batch of every
pair, temperature included; pure tensors here, real engines in tests/test_objective.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.contrastive import contrastive_row_losses, step_columns, step_contrastive_loss


def _pairs(n: int, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return image, text


@pytest.mark.parametrize("micro", [1, 2, 3, 6])
def test_micro_batch_losses_sum_to_the_whole_batch_loss_and_gradient(micro):
    image, text = _pairs(6)
    log_scale = torch.tensor(2.3, dtype=torch.float64)

    # one batch of all six pairs, plain autograd
    x, t, ls = (v.clone().requires_grad_() for v in (image, text, log_scale))
    whole = contrastive_row_losses(x, t, ls.exp()).sum()
    whole.backward()

    # the six pairs as micro-batches of `micro`, each live against the cached step
    cols = step_columns(image, text, log_scale.exp(), chunk=micro)
    x2, t2, ls2 = (v.clone().requires_grad_() for v in (image, text, log_scale))
    total = 0.0
    for i in range(0, 6, micro):
        loss = step_contrastive_loss(x2[i : i + micro], t2[i : i + micro], ls2.exp(), cols)
        loss.backward()
        total += float(loss)
    assert total == pytest.approx(float(whole), rel=1e-12)
    for a, b in ((x.grad, x2.grad), (t.grad, t2.grad), (ls.grad, ls2.grad)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_per_micro_batch_negatives_would_give_another_gradient():
    """What the loop did before: each micro-batch its own contrastive batch. The test above would
    catch a return to it."""
    image, text = _pairs(4)
    x, t = image.clone().requires_grad_(), text.clone().requires_grad_()
    contrastive_row_losses(x, t, torch.tensor(10.0, dtype=torch.float64)).sum().backward()
    x2, t2 = image.clone().requires_grad_(), text.clone().requires_grad_()
    for i in (0, 2):
        contrastive_row_losses(x2[i : i + 2], t2[i : i + 2], torch.tensor(10.0, dtype=torch.float64)).sum().backward()
    assert not torch.allclose(x.grad, x2.grad, rtol=1e-3)


def test_the_logsumexps_are_computed_in_blocks_of_rows():
    image, text = _pairs(7)
    cols = step_columns(image, text, torch.tensor(5.0, dtype=torch.float64), chunk=3)
    torch.testing.assert_close(cols.lse_image, torch.logsumexp(5.0 * image @ text.T, dim=1))
    torch.testing.assert_close(cols.lse_text, torch.logsumexp(5.0 * text @ image.T, dim=1))
    torch.testing.assert_close(cols.row_losses(), contrastive_row_losses(image, text, torch.tensor(5.0)))


def test_the_local_loss_is_the_gathered_loss_of_one_process():
    from pretrain.models.contrastive import local_row_losses

    image, text = _pairs(5)
    scale = torch.tensor(7.0, dtype=torch.float64)
    torch.testing.assert_close(local_row_losses(image, text, scale), contrastive_row_losses(image, text, scale))
