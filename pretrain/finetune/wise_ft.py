"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the weight-space
ensemble theta(alpha) = (1 - alpha) * theta_original + alpha * theta_fine_tuned.

The original is the model the run fine-tuned (its recipe's ``model.init_from``, or a directory
named explicitly), loaded the way the run's family loads it: for a classifier of a labelled folder
(task classify) that is the pretrained CLIP with the zero-shot head of the run's classes, which
is what the fine-tuned head started from, so alpha 0 is the zero-shot classifier and alpha 1 the
fine-tuned one. Used by ``pretrain-export --wise-ft ALPHA`` and ``pretrain-eval --wise-ft A,B,..``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pretrain.run.build import Loaded


def init_from_of(loaded: Loaded) -> str:
    """The directory a run was fine-tuned from (its recipe's model.init_from)."""
    from pretrain.runtime.checkpoint import CheckpointError, resolve_checkpoint, run_metadata

    if loaded.info.get("format") != "deepspeed":
        raise ValueError(
            f"{loaded.info['checkpoint']}: not a run's checkpoint, so the original weights are unknown; "
            "name them with --wise-ft-from DIR"
        )
    try:
        meta = run_metadata(resolve_checkpoint(loaded.info["checkpoint"]))
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    init = meta["recipe"]["model"].get("init_from")
    if not init:
        raise ValueError(
            f"{loaded.info['checkpoint']}: the run was not fine-tuned from a pretrained model "
            "(no model.init_from): WiSE-FT needs the original weights; name them with --wise-ft-from DIR"
        )
    if not Path(init, "config.json").is_file():
        raise ValueError(
            f"{init}/config.json not found: the run's model.init_from has moved; name the original "
            "weights with --wise-ft-from DIR"
        )
    return init


def original_model(loaded: Loaded, original: str | None = None) -> torch.nn.Module:
    """The weights ``loaded`` was fine-tuned from, as a module with the same parameter names."""
    from pretrain.models import get_family

    original = original or init_from_of(loaded)
    if loaded.family == "clip-classify":
        from pretrain.models import clip, clip_classify

        tokenizer_dir = loaded.tokenizer_dir or original
        return clip_classify.zero_shot_classifier(
            clip.from_pretrained(original), tokenizer_dir, clip_classify.classes_of(loaded.config)
        ).eval()
    return get_family(loaded.family).from_pretrained(original).eval()


def interpolate(
    original: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * original + alpha * fine_tuned for every floating-point tensor; integer
    buffers (position ids) are the fine-tuned model's. The two must have the same names and shapes."""
    missing = sorted(set(fine_tuned) ^ set(original))
    if missing:
        raise ValueError(
            f"WiSE-FT: the original and the fine-tuned weights differ in names, e.g. {missing[:3]} "
            "(a LoRA run: export it with --merge and interpolate the merged model)"
        )
    out = {}
    for name, ft in fine_tuned.items():
        zs = original[name]
        if zs.shape != ft.shape:
            raise ValueError(f"WiSE-FT: {name} is {tuple(zs.shape)} in the original and {tuple(ft.shape)} fine-tuned")
        out[name] = torch.lerp(zs.to(ft.dtype), ft, alpha) if ft.is_floating_point() else ft.clone()
    return out


def interpolated_models(loaded: Loaded, alphas: list[float], original: str | None = None):
    """(alpha, model) for each alpha; the model is a copy of ``loaded.model`` with WiSE-FT weights."""
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"--wise-ft: alpha {a} is outside [0, 1]")
    ft = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    zs = original_model(loaded, original).state_dict()
    model = copy.deepcopy(loaded.model)
    for a in alphas:
        model.load_state_dict(interpolate(zs, ft, a))
        yield a, model
