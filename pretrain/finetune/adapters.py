"""Low-rank adapters (LoRA) on a model family's transformers model, through the peft library.

One seam, called where the model is built (the trainer, pretrain-eval, pretrain-export), never
from inside the training loop. ``add_lora`` injects peft's LoRA layers into the transformers
model *in place* and freezes everything else, so the object the trainer holds keeps its type and
its forward, and the checkpoint's parameter names are the model's own with peft's
(``...c_attn.base_layer.weight``, ``...c_attn.lora_A.default.weight``). The peft wrapper it
returns is kept only to write the adapter (``save_adapter``) or fold it in (``merge``).

ZeRO: the adapters are ordinary parameters when added; DeepSpeed partitions them with the rest
under ZeRO-3 (peft reads a partitioned base layer's shape from ``ds_shape``). Frozen base weights
are saved in DeepSpeed's checkpoints as frozen fragments, so a checkpoint is complete without the
init_from directory and resumes like any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pretrain.run.feature import Built, Feature, RunContext

if TYPE_CHECKING:
    from pretrain.models import ModelFamily
    from pretrain.run.config import LoraConfig, ModelConfig

# peft's defaults by model_type cover gpt2 and llama; CLIP is missing from its table.
DEFAULT_TARGETS = {"clip": ["q_proj", "v_proj"]}
# peft task types: a causal LM's adapter then also loads with AutoPeftModelForCausalLM.
TASK_TYPES = {"gpt": "CAUSAL_LM"}
ADAPTER_CONFIG = "adapter_config.json"


def _adaptable() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    nn = torch.nn
    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the whole module name, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def target_modules(cfg: LoraConfig, hf_config) -> list[str] | None:
    """The recipe's targets, else peft's default for the architecture, else ours; None if neither knows."""
    if cfg.target_modules:
        return list(cfg.target_modules)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model_type = getattr(hf_config, "model_type", None)
    found = PEFT_DEFAULTS.get(model_type) or DEFAULT_TARGETS.get(model_type)
    return list(found) if found else None


def check(model_cfg: ModelConfig, hf: torch.nn.Module) -> list[str]:
    """Problems with model.lora, each naming its key, found on a skeleton of the model (meta
    device): no init_from, a target name that matches no layer, or one that matches a layer LoRA
    cannot adapt."""
    cfg = model_cfg.lora
    if cfg is None:
        return []
    problems = []
    if not model_cfg.init_from:
        problems.append(
            "model.lora: needs model.init_from (--init-from), the pretrained model the adapters adapt; "
            "adapters on a randomly initialised model leave most of it untrained"
        )
    targets = target_modules(cfg, hf.config)
    if targets is None:
        return problems + [
            f"model.lora.target_modules: no default for model type {hf.config.model_type!r}; name the "
            "linear layers to adapt"
        ]
    modules = dict(hf.named_modules())
    example = next(
        (n for n, m in modules.items() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"),
        next(iter(modules), "?"),
    )
    unmatched = [t for t in targets if not any(_matches(n, t) for n in modules)]
    if unmatched:
        problems.append(
            f"model.lora.target_modules: {unmatched} match no layer of the model (layer names look like "
            f"{example!r}; a target matches the whole name or its last dotted parts)"
        )
    kinds = _adaptable()
    for t in targets:
        # peft refuses the whole model if any layer a target matches is of a kind it cannot adapt
        bad = [(n, m) for n, m in modules.items() if _matches(n, t) and not isinstance(m, kinds)]
        if bad:
            n, m = bad[0]
            problems.append(
                f"model.lora.target_modules: {t!r} matches {type(m).__name__} layers ({n}), which LoRA "
                f"cannot adapt; name linear layers (such as {example.rsplit('.', 1)[-1]!r})"
            )
    return problems


def peft_config(cfg: LoraConfig, family: ModelFamily, hf: torch.nn.Module):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules(cfg, hf.config),
        bias="none",
        task_type=TASK_TYPES.get(family.name),
    )


def add_lora(model: torch.nn.Module, family: ModelFamily, model_cfg: ModelConfig):
    """Add model.lora's adapters to the transformers model inside ``model``, in place; every other
    parameter stops training. Returns peft's wrapper around that transformers model."""
    import warnings

    from peft import get_peft_model

    hf = family.hf_model(model)
    with warnings.catch_warnings():
        # GPT-2's Conv1D stores weights transposed; peft notices, says so and sets fan_in_fan_out itself.
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        wrapper = get_peft_model(hf, peft_config(model_cfg.lora, family, hf))
    assert wrapper.base_model.model is hf, "peft must adapt the model in place"
    if model_cfg.init_from:  # what the exported adapter names as its base (peft takes the model's own name)
        wrapper.peft_config["default"].base_model_name_or_path = str(Path(model_cfg.init_from).resolve())
    return wrapper


class LoRA(Feature):
    """The run feature: ``model.lora``'s adapters, checked on a skeleton and added wherever the
    model is built (training, evaluation, export, the TP merge)."""

    name = "LoRA"

    def problems(self, ctx: RunContext) -> list[str]:
        if ctx.recipe.model.lora is None:
            return []
        problems = []
        skeleton = ctx.skeleton()
        if skeleton is not None:
            problems.extend(check(ctx.recipe.model, skeleton))
        if ctx.layout.tp > 1:
            # AutoTP would shard the adapted layers' base weights under peft's wrappers, and the
            # merge of TP shards knows the model's own layers only: never trained, so refused
            problems.append(
                f"model.lora together with {ctx.source}: tensor_parallel.autotp_size {ctx.layout.tp} is not "
                "supported (AutoTP does not shard peft's adapted layers); fine-tune with LoRA on data "
                "parallelism (ZeRO-3 splits a model too large for one GPU) or drop the tensor_parallel "
                "section"
            )
        return problems

    def build(self, built: Built, family: ModelFamily, model_cfg: ModelConfig) -> None:
        if model_cfg.lora is not None:
            built.adapter = add_lora(built.model, family, model_cfg)
            built.done.append(f"LoRA adapters (r {model_cfg.lora.r}, alpha {model_cfg.lora.alpha})")


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameters (whole sizes, also for ZeRO-3 partitioned ones; a tied
    weight counts once)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total}


def describe_counts(counts: dict[str, int]) -> str:
    share = counts["trainable"] / max(counts["total"], 1)
    return f"parameters: {counts['trainable']:,} trainable of {counts['total']:,} ({100 * share:.2f}%)"


def save_adapter(wrapper, out: Path) -> None:
    """adapter_config.json and adapter_model.safetensors, for ``PeftModel.from_pretrained(base, out)``."""
    wrapper.save_pretrained(out, safe_serialization=True)


def merge(wrapper) -> torch.nn.Module:
    """Fold the adapters into the base weights (W + alpha/r * B A), in place: the transformers model
    is a plain one again."""
    return wrapper.merge_and_unload()


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> Path:
    """The base model an exported adapter was trained on (its adapter_config.json says)."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}/{ADAPTER_CONFIG}: base_model_name_or_path {base!r} is not a local Hugging "
            "Face model directory; the adapter needs its base model"
        )
    return Path(base)


def load_merged(family: ModelFamily, adapter_dir: str | Path) -> torch.nn.Module:
    """The family's model from an exported adapter: its base model with the adapter folded in."""
    from peft import PeftModel

    model = family.from_pretrained(adapter_base(adapter_dir))
    merge(PeftModel.from_pretrained(family.hf_model(model), str(adapter_dir)))
    return model
