"""One assembly of a model, for training and for loading: the family's model, then every run
feature's ``build`` (freezing, LoRA adapters) in the order of `pretrain.run.features`.

The trainer builds through ``build_model``; evaluation, export, WiSE-FT and the merge of TP
shards rebuild a checkpoint's model through ``run_model``, which is the same call on the run's
own recipe, so a checkpoint always meets the model that wrote it (adapters included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.run import features
from pretrain.run.feature import Built
from pretrain.runtime.checkpoint import (
    COMPLETE,
    CheckpointError,
    CheckpointRef,
    hf_load,
    is_complete,
    remote_code_trusted,
    resolve_checkpoint,
    run_metadata,
    safe_torch_loads,
)


def build_model(family, model_cfg, config, *, pretrained: bool = True) -> Built:
    """The model a run trains: the family's (``model.init_from``'s weights when ``pretrained``,
    else an empty model to load a checkpoint into), with every feature's build applied."""
    model = family.build_model(model_cfg, config) if pretrained else family.model_from_config(config, model_cfg)
    return features.build(Built(model), family, model_cfg)


def run_model(ref: CheckpointRef) -> tuple[str, Any, Built]:
    """(family name, transformers config, the empty model) of the run that wrote ``ref``."""
    from transformers import AutoConfig

    from pretrain.models import family_name, get_family
    from pretrain.run.config import Recipe

    recipe = Recipe.model_validate(run_metadata(ref)["recipe"])
    # the run's recorded model.trust_remote_code is not this command's choice: its --trust-remote-code is
    recipe.model.trust_remote_code = remote_code_trusted()
    name = family_name(recipe)
    config = hf_load(AutoConfig.from_pretrained, ref.run_dir / "model")
    return name, config, build_model(get_family(name), recipe.model, config, pretrained=False)


def full_shapes(ref: CheckpointRef) -> dict[str, torch.Size]:
    """Parameter shapes of the whole model a run trains, adapters included (meta device: no memory)."""
    with torch.device("meta"):
        _, _, built = run_model(ref)
    return {k: v.shape for k, v in built.model.state_dict().items()}


def _has_zero_partitions(tag_dir: Path) -> bool:
    return any(tag_dir.glob("*zero_pp_rank_*optim_states.pt"))


def fp32_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a DeepSpeed checkpoint of any ZeRO stage, TP shards merged. Every
    file is read with weights_only=True (DeepSpeed's readers included); one that needs a full
    unpickling is refused unless the command was given --trust-checkpoint (`safe_torch_loads`)."""
    with safe_torch_loads():
        return _fp32_state_dict(ref)


def _fp32_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    from pretrain.parallel import tensor_parallel

    if tensor_parallel.tp_degree(ref.path) > 1:
        stage = (
            json.loads((ref.path / COMPLETE).read_text()).get("zero_stage", 0)
            if is_complete(ref.path)
            else (1 if _has_zero_partitions(ref.path) else 0)
        )
        return tensor_parallel.merged_fp32_state_dict(ref.path, stage, full_shapes(ref))
    if _has_zero_partitions(ref.path):
        # ZeRO 1-3 (and bf16): the fp32 master weights live in the per-rank optimizer partitions.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
        return {k: v.float() for k, v in sd.items()}
    files = sorted(ref.path.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ref.path}: no mp_rank_*_model_states.pt")
    if len(files) > 1:
        raise CheckpointError(f"{ref.path}: tensor-parallel checkpoints are not supported")
    # tensors, numbers, strings and dicts: weights_only (safe_torch_loads) refuses anything else
    state = torch.load(files[0], map_location="cpu")
    return {k: v.float() for k, v in state["module"].items()}


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights, accepting only the tied parameters (e.g. lm_head) as missing."""
    result = model.load_state_dict(state, strict=False)
    tied = {k for k in result.missing_keys if "lm_head" in k or "embed" in k}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"weights do not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if tied and not getattr(model.config, "tie_word_embeddings", False):
        raise CheckpointError(f"weights missing for untied parameters {sorted(tied)[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


@dataclass
class Loaded:
    model: torch.nn.Module  # in fp32 on the CPU, eval mode; for CLIP the ContrastiveCLIP wrapper
    family: str
    config: Any  # the transformers config
    tokenizer_dir: Path | None
    info: dict
    adapter: Any = None  # peft's wrapper around the transformers model, for a LoRA run (pretrain.finetune.adapters)


def load_model(checkpoint: str) -> Loaded:
    """A run's checkpoint (any ZeRO stage), an exported Hugging Face directory or a peft adapter
    directory, of any family."""
    from transformers import AutoConfig

    from pretrain.finetune import adapters
    from pretrain.models import family_of_hf_config, get_family

    if adapters.is_adapter_dir(checkpoint):
        base = adapters.adapter_base(checkpoint)
        config = hf_load(AutoConfig.from_pretrained, base)
        name = family_of_hf_config(config)
        model = adapters.load_merged(get_family(name), checkpoint)
        return Loaded(
            model.eval(),
            name,
            config,
            Path(checkpoint),
            {"checkpoint": str(checkpoint), "format": "peft-adapter", "family": name, "base": str(base)},
        )
    ref = resolve_checkpoint(checkpoint)
    if ref.kind == "hf":
        config = hf_load(AutoConfig.from_pretrained, ref.path)
        name = family_of_hf_config(config)
        model = get_family(name).from_pretrained(ref.path)
        return Loaded(
            model.eval(), name, config, ref.path, {"checkpoint": str(ref.path), "format": "hf", "family": name}
        )
    name, config, built = run_model(ref)
    load_weights(built.model, fp32_state_dict(ref))
    tok = ref.run_dir / "tokenizer"
    return Loaded(
        built.model.eval(),
        name,
        config,
        tok if tok.is_dir() else None,
        {"checkpoint": str(ref.path), "format": "deepspeed", "tag": ref.tag, "family": name},
        built.adapter,
    )
