"""Model families. Each family module (gpt, clip) describes itself as a `ModelFamily`
(`pretrain.models.spec`): the same pieces for every family, so the trainer, pretrain-eval and
pretrain-export never ask which family they hold.
"""
from __future__ import annotations

import re

import torch

from pretrain.models.spec import EvalRequest, ModelFamily, RunData, StreamRequest

FAMILIES = ("gpt", "clip")
__all__ = ["FAMILIES", "EvalRequest", "ModelFamily", "RunData", "StreamRequest", "family_name", "family_of_hf_config",
           "freeze_by_pattern", "get_family"]


def get_family(name: str) -> ModelFamily:
    if name == "gpt":
        from pretrain.models import gpt

        return gpt.FAMILY
    if name == "clip":
        from pretrain.models import clip

        return clip.FAMILY
    if name in ("clip-classify", "clip-captions"):
        from pretrain.models import clip_classify

        return clip_classify.FAMILY if name == "clip-classify" else clip_classify.CAPTIONS_FAMILY
    raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")


def family_name(recipe) -> str:
    """The family a recipe trains: its ``family``, or for ``task: "classify"`` (CLIP on a labelled
    image folder: its own data source, loss and evaluation) clip-classify (a linear head) or
    clip-captions (contrastive against class-name captions)."""
    if getattr(recipe, "task", "pretrain") != "classify":
        return recipe.family
    return "clip-captions" if recipe.classify_objective == "captions" else "clip-classify"


def family_of_hf_config(config) -> str:
    """The family of an exported Hugging Face directory, from its config's model_type (a CLIP
    exported with a classifier head names its head file in ``classifier``)."""
    if getattr(config, "model_type", None) == "clip":
        return "clip-classify" if getattr(config, "classifier", None) else "clip"
    return "gpt"


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
