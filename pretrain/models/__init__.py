"""Model families. Each family module has the same pieces, so the trainer, pretrain-eval and
pretrain-export never ask which family they hold:

    open_data(path)                       the prepared dataset the family trains on
    tokenizer_dir(recipe, data)           where its tokenizer lives
    model_config(model_cfg, tokenizer)    the transformers config (from sizes, or init_from's)
    check(recipe, data, config, tok)      problems found before any rank starts
    build_model / model_from_config / from_pretrained / hf_model
    count_params, hidden_size, no_decay, FREEZE_ALIASES
    train_stream(...), loss(model, batch), evaluate(...)  (collective over ranks)
    tokens_per_sample(data, config), UNIT ("tokens" or "samples" for throughput)
"""
from __future__ import annotations

import re
from types import ModuleType

import torch

FAMILIES = ("gpt", "clip")


def get_family(name: str) -> ModuleType:
    if name == "gpt":
        from pretrain.models import gpt

        return gpt
    if name == "clip":
        from pretrain.models import clip

        return clip
    raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")


def family_of_hf_config(config) -> str:
    """The family of an exported Hugging Face directory, from its config's model_type."""
    return "clip" if getattr(config, "model_type", None) == "clip" else "gpt"


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
