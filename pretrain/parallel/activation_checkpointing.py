"""Activation checkpointing, one of the run features (`pretrain.run.features`): every transformer
block recomputed in the backward, for memory, without changing the math.

DeepSpeed's ``activation_checkpointing`` section does not choose what is checkpointed; it
configures DeepSpeed's own checkpoint function (``deepspeed.checkpointing``: ``cpu_checkpointing``
keeps the saved block inputs in host memory, ``partition_activations`` splits them across the
model-parallel ranks, ``synchronize_checkpoint_boundary``, ``profile``). So it applies where
``training.activation_checkpointing`` checkpoints the blocks: there DeepSpeed's function takes
the place of torch's. Without the recipe key it would do nothing, and the log says so.
"""

from __future__ import annotations

import torch

from pretrain.models import ModelFamily
from pretrain.run.config import Recipe
from pretrain.run.feature import Feature, RunContext

SECTION = "activation_checkpointing"


def deepspeed_section_problems(ds: dict, arch: str, source: str) -> list[str]:
    """What would fail on every rank, said before any rank starts: DeepSpeed's own assertions, and
    what was measured with DeepSpeed 0.19.8 and transformers 5 (tests/test_activation_checkpointing_ds.py):
    the partitioned path hands the blocks' arguments on wrongly except Llama's (GPT-2: "got multiple
    values for argument 'encoder_attention_mask'", CLIP: "takes 3 positional arguments but 4 were
    given"), and cpu_checkpointing alone loses the saved inputs on DeepSpeed's CPU accelerator."""
    section = ds.get(SECTION)
    if section is None:
        return []
    key = f"{source}: {SECTION}"
    if not isinstance(section, dict):
        return [f'{key}: must be an object such as {{"partition_activations": true}} (got {section!r})']
    problems = []
    partition = bool(section.get("partition_activations"))
    if section.get("contiguous_memory_optimization") and not partition:
        problems.append(f"{key}.contiguous_memory_optimization needs partition_activations: true")
    if section.get("contiguous_memory_optimization") and not section.get("number_checkpoints"):
        problems.append(f"{key}.contiguous_memory_optimization needs number_checkpoints (the model's layers)")
    if partition and arch != "llama":
        problems.append(
            f"{key}.partition_activations: DeepSpeed's partitioned checkpoint runs the llama "
            f"architecture's blocks only (it passes {arch}'s block arguments wrongly); drop it, or the "
            "section (training.activation_checkpointing then uses PyTorch's checkpoint)"
        )
    if section.get("cpu_checkpointing") and not partition:
        import torch

        if not torch.cuda.is_available():
            problems.append(
                f"{key}.cpu_checkpointing without partition_activations fails on DeepSpeed's CPU "
                "accelerator (the saved block inputs are lost); on a CPU the activations are in host "
                "memory already: drop it"
            )
    return problems


def deepspeed_section_notes(recipe: Recipe, ds: dict) -> list[str]:
    if ds.get(SECTION) and not recipe.training.activation_checkpointing:
        return [
            f"the DeepSpeed config's {SECTION} section configures DeepSpeed's checkpoint function, which is used "
            "only with training.activation_checkpointing: true; without it nothing is checkpointed"
        ]
    return []


def _deepspeed_checkpoint(section: dict):
    """DeepSpeed's non-reentrant checkpoint function, configured from the section (needs
    torch.distributed initialised, as every rank has it when the trainer builds the model)."""
    import deepspeed
    from deepspeed.runtime.activation_checkpointing.config import DeepSpeedActivationCheckpointingConfig

    cfg = DeepSpeedActivationCheckpointingConfig({SECTION: section})
    deepspeed.checkpointing.configure(
        None,
        partition_activations=cfg.partition_activations,
        contiguous_checkpointing=cfg.contiguous_memory_optimization,
        num_checkpoints=cfg.number_checkpoints,
        checkpoint_in_cpu=cfg.cpu_checkpointing,
        synchronize=cfg.synchronize_checkpoint_boundary,
        profile=cfg.profile,
    )
    return deepspeed.checkpointing.non_reentrant_checkpoint, cfg


def checkpoint_blocks(
    model: torch.nn.Module, family: ModelFamily, recipe: Recipe, deepspeed: dict | None = None
) -> list[str]:
    """Apply the recipe's layout (and the DeepSpeed config's activation_checkpointing section) to
    ``model`` in place; returns what was done, for the log."""
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
        section = (deepspeed or {}).get(SECTION)
        if section:
            function, cfg = _deepspeed_checkpoint(section)
            hf._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=function)
            on = [
                k
                for k in (
                    "cpu_checkpointing",
                    "partition_activations",
                    "contiguous_memory_optimization",
                    "synchronize_checkpoint_boundary",
                    "profile",
                )
                if getattr(cfg, k)
            ]
            done.append(
                "activation checkpointing (every transformer block) with DeepSpeed's checkpoint function "
                f"({', '.join(on) or 'no options on'})"
            )
        else:
            done.append("activation checkpointing (every transformer block)")
    return done


class ActivationCheckpointing(Feature):
    """The run feature: ``training.activation_checkpointing`` with DeepSpeed's section."""

    name = "activation checkpointing"

    def problems(self, ctx: RunContext) -> list[str]:
        return [] if ctx.deepspeed is None else deepspeed_section_problems(ctx.deepspeed, ctx.arch, ctx.source)

    def configure(self, ds: dict, ctx: RunContext) -> list[str]:
        return deepspeed_section_notes(ctx.recipe, ds)

    def parallelize(self, model: torch.nn.Module, ctx: RunContext) -> list[str]:
        return checkpoint_blocks(model, ctx.family, ctx.recipe, ctx.deepspeed)
