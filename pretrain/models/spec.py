"""The interface of a model family, written down (torchtitan's TrainSpec is the model).

Each family module (gpt, clip) ends with ``FAMILY = ModelFamily(...)``: a frozen record of the
functions the trainer, pretrain-eval and pretrain-export call, so a missing piece fails at
import rather than with an AttributeError halfway through a run, and a reader sees in one place
what a new family (or a new axis: a data source, an adapter) has to provide. Calls that need
more than the model and a batch take one small request object instead of long positional lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:  # the config and data modules import nothing from here; keep it that way at run time too
    from transformers import PretrainedConfig

    from data_pipelines.dataset import DataSet
    from data_pipelines.loader import TrainStream
    from pretrain.run.config import DataConfig, ModelConfig, Recipe


@dataclass(frozen=True)
class RunData:
    """The prepared data a run reads, and what it is read with."""

    data: DataSet
    tokenizer_dir: Path | None
    model_config: PretrainedConfig


@dataclass(frozen=True)
class StreamRequest:
    """One rank's training stream: the recipe's data section, the batch size and who is reading.
    ``rank``/``world`` are the data-parallel rank and size (`pretrain.parallel.layout.ParallelLayout`): the
    ranks of one tensor- or sequence-parallel group read the same stream."""

    data: DataConfig
    micro_batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    sample_ids: bool = False  # batches carry meta["ids"] ("epoch:shard:key" per sample), for traces


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation pass over a split; collective over ``world`` ranks (each calls it).
    ``rank``/``world`` are data-parallel (each model replica reads its share of the split);
    ``group`` is the process group that sums the replicas' results (None: every rank, which is
    the data-parallel group when there is no tensor or sequence parallelism)."""

    split: str
    batch_size: int
    max_samples: int | None = None
    rank: int = 0
    world: int = 1
    device: torch.device | str = "cpu"
    group: Any = None
    # CLIP: how many pairs each contrastive loss is over (consecutive samples of the split: a run's
    # training step's batch); None: each forward batch, gathered over the ranks
    loss_batch: int | None = None


def no_external_parameters(model: torch.nn.Module) -> None:
    """For families whose every parameter is used inside the forward of the module that owns it."""


@dataclass(frozen=True)
class ModelFamily:
    name: str
    unit: Literal["tokens", "samples"]  # throughput is reported in this unit
    freeze_aliases: Mapping[str, str]  # model.freeze shorthands ("vision") -> regular expressions

    # data and configuration, before any rank starts
    open_data: Callable[[str | Path], DataSet]
    tokenizer_dir: Callable[[Recipe, DataSet], Path | None]
    model_config: Callable[[ModelConfig, Any], PretrainedConfig]  # (model section, tokenizer)
    check: Callable[[Recipe, DataSet, PretrainedConfig, Any], list[str]]  # problems, each naming its key
    count_params: Callable[[PretrainedConfig], int]
    hidden_size: Callable[[PretrainedConfig], int]  # sizes DeepSpeed's "auto" buckets
    tokens_per_sample: Callable[[DataSet, PretrainedConfig], int]
    train_flops_per_sample: Callable[[PretrainedConfig, DataSet], float]  # model FLOPs, forward + backward

    # the model
    build_model: Callable[[ModelConfig, PretrainedConfig], torch.nn.Module]  # for training (init_from honoured)
    model_from_config: Callable[..., torch.nn.Module]  # (config, model section=None): an empty model to load into
    from_pretrained: Callable[[str | Path], torch.nn.Module]  # an exported Hugging Face directory
    hf_model: Callable[[torch.nn.Module], torch.nn.Module]  # the transformers model inside (parameter names)
    to_hf: Callable[[torch.nn.Module], torch.nn.Module]  # ready for save_pretrained
    save_hf_assets: Callable[
        [torch.nn.Module, Any, Path], None
    ]  # (hf model, tokenizer or None, dir): the rest of an export
    no_decay: Callable[[str, torch.nn.Parameter], bool]
    register_external_parameters: Callable[[torch.nn.Module], None]  # ZeRO-3: parameters used outside their module

    # training and evaluation
    train_stream: Callable[[RunData, StreamRequest], TrainStream]
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # the batch's mean item loss
    # what the trainer optimises: a step's summed item losses over its items (tokens trained, pairs)
    loss_items: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    loss_sum: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    evaluate: Callable[[torch.nn.Module, RunData, EvalRequest], dict[str, Any]]  # collective over ranks

    # ZeRO-3: whether build_model works inside deepspeed.zero.Init (partitioned from the start)
    zero_init: bool = True
