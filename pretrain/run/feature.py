"""The interface every run feature implements (freezing, LoRA, activation checkpointing, AutoTP,
Ulysses SP, the attention kernel, precision): one small class per feature, applied by the run
from the one ordered list in `pretrain.run.features`.

A feature answers, each at its moment:

- ``problems(ctx)``: why this run cannot start, each line naming its keys (before any rank starts;
  a rule that spans two features lives in the one that owns it, and nowhere else);
- ``configure(ds, ctx)``: edits to the resolved DeepSpeed config, returning notes for the log;
- ``build(built, family, model_cfg)``: changes to the model's definition (which parameters exist
  and train). Training, evaluation, export and the TP merge rebuild a checkpoint's model through
  these same calls (`pretrain.run.build`), so a checkpoint always meets the model that wrote it;
- ``parallelize(model, ctx)``: training-only changes to how the model runs (memory, kernels);
- ``engine(model, ctx)``: what ``deepspeed.initialize`` and the loop need from the feature (its
  process groups as ``mpu``, a loss per micro-batch or over the step, the group over which
  replicas meet); collective;
- ``started(engine, ctx)``: lines for the log once the engine exists;
- ``after_step(engine, ctx)``: after every optimizer step, on every rank (a bound on a parameter).

Every hook defaults to doing nothing, so a feature writes only the moments it acts at.
torchtitan's model converters and ``parallelize_fn`` are the model (a list applied in one call,
in a fixed order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from data_pipelines.dataset import DataSet
    from pretrain.models.spec import ModelFamily
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.run.config import ModelConfig, Recipe


@dataclass
class RunContext:
    """What features read: the settled configuration of one run, seen from one rank."""

    recipe: Recipe
    family: ModelFamily
    model_config: Any  # the transformers config
    data: DataSet  # what the family reads (a prepared folder, sources, an image folder)
    layout: ParallelLayout
    deepspeed: dict | None  # resolved ("auto" filled); None when it could not be resolved
    source: str = "deepspeed config"  # the DeepSpeed JSON's path, for messages
    local_world: int = 1  # ranks per machine
    is_main: bool = True
    model_ok: bool = True  # False when the model section has problems: no skeleton is built then
    _skeleton: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def arch(self) -> str:
        return getattr(self.model_config, "model_type", self.recipe.model.arch)

    @property
    def zero_stage(self) -> int:
        from pretrain.run.ds_config import zero_stage

        return zero_stage(self.deepspeed or {})

    @property
    def chat(self) -> bool:
        """Whether the data packs conversations (their own positions and a block-diagonal mask)."""
        return bool(self.data.chat)

    @property
    def num_heads(self) -> int | None:
        return getattr(self.model_config, "num_attention_heads", None)

    @property
    def num_kv_heads(self) -> int | None:
        return getattr(self.model_config, "num_key_value_heads", None)

    @property
    def seq_len(self) -> int | None:
        return self.data.seq_len

    def skeleton(self) -> torch.nn.Module | None:
        """The family's bare transformers model on the meta device (names and shapes, no memory),
        built once, for checks that need the layer names; None when the model section is broken."""
        if not self.model_ok:
            return None
        if self._skeleton is None:
            with torch.device("meta"):
                self._skeleton = self.family.hf_model(self.family.model_from_config(self.model_config))
        return self._skeleton


@dataclass
class Built:
    """A model as the features left it: the module the engine (or an evaluation) runs, peft's
    wrapper when adapters were added, and what was done, for the log."""

    model: torch.nn.Module
    adapter: Any = None
    done: list[str] = field(default_factory=list)


class StepLoss:
    """What the loop back-propagates for each micro-batch of an optimizer step: ``begin`` sees the
    step's micro-batches before any of them is run (collective: every rank calls it, once a step),
    then the loop calls the object for each micro-batch in order, for its summed item losses. This
    one runs each micro-batch alone through ``loss_sum`` (the family's, or a feature's); a loss whose
    terms span micro-batches (CLIP's negatives) replaces it."""

    def __init__(self, loss_sum: Callable[[torch.nn.Module, dict], torch.Tensor]):
        self.loss_sum = loss_sum

    def begin(self, engine: Any, batches: list[dict]) -> None:
        return None

    def __call__(self, engine: Any, micro: int, batch: dict) -> torch.Tensor:
        return self.loss_sum(engine, batch)


@dataclass
class EngineParts:
    """What features hand to ``deepspeed.initialize`` and the loop; each part from one feature."""

    mpu: Any = None  # DeepSpeed's process-group provider
    loss_sum: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None  # replaces the family's loss_sum
    step_loss: StepLoss | None = None  # replaces loss_sum: a loss over the whole step's batch
    dp_group: Callable[[], Any] | None = None  # where model replicas meet (None: every rank)
    sequence_parallel: Any = None  # the rank's Ulysses group, for the loop's eval and logging

    PARTS = ("mpu", "loss_sum", "step_loss", "dp_group", "sequence_parallel")

    def merge(self, other: EngineParts, owner: str, owners: dict[str, str]) -> None:
        for name in self.PARTS:
            value = getattr(other, name)
            if value is None:
                continue
            if getattr(self, name) is not None:  # two features claim one part: a rule was missed
                raise RuntimeError(f"features {owners[name]} and {owner} both provide the engine's {name}")
            setattr(self, name, value)
            owners[name] = owner
        if self.loss_sum is not None and self.step_loss is not None:
            raise RuntimeError(f"features {owners['loss_sum']} and {owners['step_loss']} both provide the loss")


class Feature:
    """Base of every run feature; each hook does nothing unless overridden."""

    name = "feature"

    def problems(self, ctx: RunContext) -> list[str]:
        return []

    def configure(self, ds: dict, ctx: RunContext) -> list[str]:
        return []

    def build(self, built: Built, family: ModelFamily, model_cfg: ModelConfig) -> None:
        return None

    def parallelize(self, model: torch.nn.Module, ctx: RunContext) -> list[str]:
        return []

    def engine(self, model: torch.nn.Module, ctx: RunContext) -> EngineParts | None:
        return None

    def started(self, engine: Any, ctx: RunContext) -> list[str]:
        return []

    def after_step(self, engine: Any, ctx: RunContext) -> None:
        """After every optimizer step (applied or refused), on every rank; must not read the host."""
        return None
