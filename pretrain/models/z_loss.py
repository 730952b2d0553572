"""``training.z_loss``: the auxiliary loss of PaLM (Chowdhery et al. 2022) and OLMo for language
models, z x logsumexp(logits)^2 per trained token. It pulls the softmax normaliser towards 1, which
keeps the logits from drifting large in bf16 over a long run (a cause of late loss spikes).

The term is added to the summed token losses the trainer divides by the step's trained tokens,
so it is weighed like the cross-entropy whatever the batch layout; its own sum is kept apart so
that ``loss`` in the log stays the cross-entropy and ``z_loss`` is logged beside it. Evaluation
reports the cross-entropy alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipelines.text.packed import IGNORE_INDEX
from pretrain.models.packed_attention import causal_lm_inputs
from pretrain.run.feature import EngineParts, Feature, RunContext


class ZLossSum:
    """The loss sum of a micro-batch with the z term; ``take()`` hands back (and clears) the z
    terms summed since the last call, detached, on the device."""

    def __init__(self, z: float):
        self.z = z
        self._term: torch.Tensor | None = None

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**causal_lm_inputs(model, batch)).logits.float()
        labels = batch["labels"]
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)
        trained = (labels != IGNORE_INDEX).to(logits.dtype)
        term = self.z * (torch.logsumexp(logits, dim=-1).pow(2) * trained).sum()
        done = term.detach().double().reshape(1)
        self._term = done if self._term is None else self._term + done
        return ce + term

    def take(self) -> torch.Tensor | None:
        term, self._term = self._term, None
        return term


class ZLoss(Feature):
    name = "z-loss"

    def problems(self, ctx: RunContext) -> list[str]:
        if not ctx.recipe.training.z_loss:
            return []
        if ctx.recipe.family != "gpt":
            return [f"training.z_loss: a language model's term (vocabulary logits); family is {ctx.recipe.family}"]
        if ctx.layout.sp > 1:
            return ["training.z_loss: not available with sequence parallelism (its loss is computed over chunks)"]
        return []

    def engine(self, model: torch.nn.Module, ctx: RunContext) -> EngineParts | None:
        if not ctx.recipe.training.z_loss:
            return None
        return EngineParts(loss_sum=ZLossSum(ctx.recipe.training.z_loss))
