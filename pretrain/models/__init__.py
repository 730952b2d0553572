"""Model families. Each family module (gpt, clip) describes itself as a `ModelFamily`
(`pretrain.models.spec`): the same pieces for every family, so the trainer, pretrain-eval and
pretrain-export never ask which family they hold.
"""

from __future__ import annotations

from pretrain.models.spec import EvalRequest, ModelFamily, RunData, StreamRequest

FAMILIES = ("gpt", "clip")
__all__ = [
    "FAMILIES",
    "EvalRequest",
    "ModelFamily",
    "RunData",
    "StreamRequest",
    "family_name",
    "family_of_hf_config",
    "get_family",
]


def get_family(name: str) -> ModelFamily:
    if name == "gpt":
        from pretrain.models import gpt

        return gpt.FAMILY
    if name == "clip":
        from pretrain.models import clip

        return clip.FAMILY
    if name in ("clip-classify", "clip-captions"):
        from pretrain.models import clip_classify

        return clip_classify.FAMILY if name == "clip-classify" else clip_classify.CAPTIONS_FAMILY
    raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")


def family_name(recipe) -> str:
    """The family a recipe trains: its ``family``, or for ``task: "classify"`` (CLIP on a labelled
    image folder: its own data source, loss and evaluation) clip-classify (a linear head) or
    clip-captions (contrastive against class-name captions)."""
    if getattr(recipe, "task", "pretrain") != "classify":
        return recipe.family
    return "clip-captions" if recipe.classify_objective == "captions" else "clip-classify"


def family_of_hf_config(config) -> str:
    """The family of an exported Hugging Face directory, from its config's model_type (a CLIP
    exported with a classifier head names its head file in ``classifier``)."""
    if getattr(config, "model_type", None) == "clip":
        return "clip-classify" if getattr(config, "classifier", None) else "clip"
    return "gpt"
