"""Settings that change how a model is laid out in memory and across ranks, not its math, applied
in one place and in a fixed order after the model is built (torchtitan's parallelize_fn): today
activation checkpointing; tensor and sequence parallelism belong here too.
"""
from __future__ import annotations

import torch

from pretrain.config import Recipe
from pretrain.models import ModelFamily


def parallelize(model: torch.nn.Module, family: ModelFamily, recipe: Recipe) -> list[str]:
    """Apply the recipe's layout to ``model`` in place; returns what was done, for the log."""
    done = []
    if recipe.training.activation_checkpointing:
        # Non-reentrant: works with ZeRO-3's parameter hooks and with inputs that need no grad,
        # and torch.utils.checkpoint restores the RNG, so dropout draws the same masks.
        hf = family.hf_model(model)
        kwargs = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers 5.x's name
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        done.append("activation checkpointing (every transformer block)")
    return done
