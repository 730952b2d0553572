"""Freezing, one of the run features (`pretrain.run.features`): ``model.freeze`` names parameters
(by a family's alias such as "vision", or a regular expression) that train no further.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from pretrain.run.feature import Built, Feature, RunContext

if TYPE_CHECKING:
    from pretrain.models.spec import ModelFamily
    from pretrain.run.config import ModelConfig


def freeze_by_pattern(model: torch.nn.Module, patterns: list[str], aliases: dict[str, str]) -> int:
    """Turn off gradients of the parameters whose names match any pattern (an alias such as
    "vision" or a regular expression searched in the name); returns how many tensors. A pattern
    that matches nothing is an error: it is almost always a typo."""
    regexes = [re.compile(aliases.get(p, p)) for p in patterns]
    used = [0] * len(regexes)
    frozen = 0
    for name, p in model.named_parameters():
        hit = [i for i, r in enumerate(regexes) if r.search(name)]
        for i in hit:
            used[i] += 1
        if hit:
            p.requires_grad_(False)
            frozen += 1
    unused = [patterns[i] for i, n in enumerate(used) if n == 0]
    if unused:
        example = next(iter(dict(model.named_parameters())), "?")
        raise ValueError(f"model.freeze: {unused} match no parameter (names look like {example!r})")
    return frozen


class Freeze(Feature):
    name = "freezing"

    def problems(self, ctx: RunContext) -> list[str]:
        skeleton = ctx.skeleton()
        if not ctx.recipe.model.freeze or skeleton is None:
            return []
        try:
            freeze_by_pattern(skeleton, ctx.recipe.model.freeze, ctx.family.freeze_aliases)
        except ValueError as e:
            return [str(e)]
        return []

    def build(self, built: Built, family: ModelFamily, model_cfg: ModelConfig) -> None:
        if model_cfg.freeze:
            frozen = freeze_by_pattern(family.hf_model(built.model), model_cfg.freeze, family.freeze_aliases)
            built.done.append(f"froze {frozen} parameter tensors matching {model_cfg.freeze}")
