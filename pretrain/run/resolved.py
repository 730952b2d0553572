"""One object for everything a run is configured with, settled before any rank starts.

The recipe is the user's (plus command-line overrides; a default that a concrete DeepSpeed value
overrode holds that value: `ds_config.settled_recipe`); the DeepSpeed config has every "auto"
filled; the values derived from the two (the LR scaled to the global batch, batch
arithmetic, tokens per step) live here and nowhere else. ``resolved-config.json`` in the run
directory (`pretrain.runtime.checkpoint.RESOLVED`) is this object, whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.parallel.layout import ParallelLayout
from pretrain.run.config import Recipe
from pretrain.run.ds_config import precision, zero_stage
from pretrain.run.schedules import Optimization


@dataclass(frozen=True)
class ResolvedRun:
    recipe: Recipe
    deepspeed: dict[str, Any]  # as given to the run (a toolkit scheduler section included)
    optimization: Optimization
    world_size: int
    tokens_per_sample: int
    flops_per_sample: float  # model FLOPs of one training sample, forward and backward (pretrain.runtime.flops)
    data_path: Path
    data_kind: str
    notes: list[str] = field(default_factory=list)
    data_sources: dict[str, Any] | None = None  # data.sources as resolved (shards, counts), when the data has them

    @property
    def micro_batch_size(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def gradient_accumulation_steps(self) -> int:
        return int(self.deepspeed["gradient_accumulation_steps"])

    @property
    def global_batch(self) -> int:
        return int(self.deepspeed["train_batch_size"])

    @property
    def flops_per_step(self) -> float:
        return self.global_batch * self.flops_per_sample

    def layout(self, rank: int = 0) -> ParallelLayout:
        """How the world divides into TP, SP and DP groups, seen from ``rank``."""
        return ParallelLayout.from_deepspeed(self.deepspeed, self.world_size, rank)

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.deepspeed)

    @property
    def precision(self) -> str:
        return precision(self.deepspeed)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.model_dump(mode="json"),
            "deepspeed": self.deepspeed,
            "world_size": self.world_size,
            "parallel": {k: getattr(self.layout(), k) for k in ("tp", "sp", "dp")},
            "precision": self.precision,
            "zero_stage": self.zero_stage,
            "optimization": self.optimization.to_dict(),
            "batch": {
                "micro_batch_size": self.micro_batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "global_batch": self.global_batch,
            },
            "data": {
                "path": None if self.data_sources else str(self.data_path.resolve()),
                "kind": self.data_kind,
                **(self.data_sources or {}),
                "tokens_per_sample": self.tokens_per_sample,
                "tokens_per_step": self.global_batch * self.tokens_per_sample,
            },
            "model_flops": {"per_sample": self.flops_per_sample, "per_step": self.flops_per_step},
            "notes": self.notes,
        }


def eval_loss_batch(eval_batch_size: int | None, dp: int, global_batch: int) -> int:
    """The pairs a contrastive val loss is over: ``eval.batch_size`` on each data-parallel rank when
    set, else the training step's batch (what training scores each pair against). The one rule for the
    trainer's evaluation and for pretrain-eval of a run's checkpoint."""
    return eval_batch_size * dp if eval_batch_size else global_batch
