"""The run's features, listed once and applied in this order by every path that assembles a run:
``pretrain/train.py`` asks each for its problems and DeepSpeed settings before any rank starts,
`pretrain.run.build` builds (and rebuilds, for evaluation and export) the model through their
``build``, and the trainer applies their ``parallelize``, ``engine`` and ``started``.

Adding a feature is one class (`pretrain.run.feature.Feature`) and one entry in ``FEATURES``.
The order matters where features touch the same thing: freezing before LoRA (peft freezes the
rest and adapts what is left), activation checkpointing before the engine, AutoTP's and Ulysses'
groups made collectively on every rank in the same order.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from pretrain.finetune.adapters import LoRA
from pretrain.finetune.freeze import Freeze
from pretrain.models.clip import ContrastiveBatch, LogitScaleClamp
from pretrain.models.z_loss import ZLoss
from pretrain.parallel.activation_checkpointing import ActivationCheckpointing
from pretrain.parallel.sequence_parallel import UlyssesSequenceParallel
from pretrain.parallel.tensor_parallel import TensorParallel
from pretrain.run.feature import Built, EngineParts, Feature, RunContext
from pretrain.runtime.spikes import LossSpikeRules


class AttentionKernel(Feature):
    """``model.attn_implementation``: flash-attention needs what this machine may not have."""

    name = "attention kernel"

    def problems(self, ctx: RunContext) -> list[str]:
        if ctx.recipe.model.attn_implementation == "flash_attention_2" and not _has_flash_attention():
            return [
                "model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package, and "
                "this machine lacks one or both; use sdpa (the default: PyTorch's own fused attention) or eager"
            ]
        return []


def _has_flash_attention() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


class Precision(Feature):
    """The DeepSpeed config's precision on this machine."""

    name = "precision"

    def problems(self, ctx: RunContext) -> list[str]:
        from pretrain.run.ds_config import precision

        if ctx.deepspeed is not None and precision(ctx.deepspeed) == "fp16" and not torch.cuda.is_available():
            return [
                f"{ctx.source}: fp16.enabled: fp16 training needs a GPU (DeepSpeed has no fp16 optimizer "
                "on a CPU); set training.precision to bf16 or fp32, or use a bf16/fp32 DeepSpeed config"
            ]
        return []


class PartitionedInit(Feature):
    """``model.zero3_init``: building the model partitioned (deepspeed.zero.Init) under ZeRO-3."""

    name = "partitioned init"

    def problems(self, ctx: RunContext) -> list[str]:
        if ctx.recipe.model.zero3_init is True and not ctx.family.zero_init:
            return [
                f"model.zero3_init: the {ctx.family.name} family cannot be built partitioned "
                "(deepspeed.zero.Init); leave it at auto"
            ]
        return []


FEATURES: tuple[Feature, ...] = (
    AttentionKernel(),
    Precision(),
    PartitionedInit(),
    Freeze(),
    LoRA(),
    ActivationCheckpointing(),
    TensorParallel(),
    UlyssesSequenceParallel(),
    ContrastiveBatch(),
    LogitScaleClamp(),
    ZLoss(),
    LossSpikeRules(),
)


def problems(ctx: RunContext) -> list[str]:
    return [p for f in FEATURES for p in f.problems(ctx)]


def configure(ds: dict, ctx: RunContext) -> list[str]:
    return [n for f in FEATURES for n in f.configure(ds, ctx)]


def build(built: Built, family, model_cfg) -> Built:
    for f in FEATURES:
        f.build(built, family, model_cfg)
    return built


def parallelize(model: torch.nn.Module, ctx: RunContext) -> list[str]:
    return [d for f in FEATURES for d in f.parallelize(model, ctx)]


def engine_parts(model: torch.nn.Module, ctx: RunContext) -> EngineParts:
    """Every feature's part of the engine, merged (collective: each rank calls it, in the same order)."""
    parts, owners = EngineParts(), {}
    for f in FEATURES:
        mine = f.engine(model, ctx)
        if mine is not None:
            parts.merge(mine, f.name, owners)
    return parts


def started(engine: Any, ctx: RunContext) -> list[str]:
    return [line for f in FEATURES for line in f.started(engine, ctx)]


def after_step(engine: Any, ctx: RunContext) -> None:
    for f in FEATURES:
        f.after_step(engine, ctx)
