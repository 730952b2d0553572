"""Accuracy of a CLIP on a labelled image folder: ``pretrain-eval ... --image-folder ROOT``.

Any CLIP (a pretrained Hugging Face directory, a run's checkpoint, an export) is evaluated as a
classifier of the folder's classes: with its own head when it is a classifier fine-tuned on the
same classes (task classify), else zero-shot, its text tower's prompt-ensembled class embeddings
as the head (`pretrain.models.clip_classify.zero_shot_classifier`). ``--wise-ft A,B,...`` adds
the WiSE-FT sweep of a fine-tuned run between its original weights (alpha 0: the zero-shot
classifier) and its own (alpha 1), in one report: accuracy before, after and interpolated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def as_classifier(loaded, folder) -> tuple[torch.nn.Module, str]:
    """(the loaded CLIP as a classifier of the folder's classes, "head" or "zero-shot")."""
    from pretrain.models import clip_classify

    if loaded.family == "clip-classify":
        if clip_classify.classes_of(loaded.config)["classnames"] == folder.classnames:
            return loaded.model, "head"
    elif loaded.family not in ("clip", "clip-captions"):
        raise ValueError(f"{loaded.info['checkpoint']}: a {loaded.family} model; --image-folder needs a CLIP")
    return _zero_shot(loaded, loaded.model, folder), "zero-shot"


def _zero_shot(loaded, model: torch.nn.Module, folder) -> torch.nn.Module:
    from pretrain.models import clip_classify

    if loaded.tokenizer_dir is None:
        raise ValueError(f"{loaded.info['checkpoint']}: no caption tokenizer to write the zero-shot prompts with")
    return clip_classify.zero_shot_classifier(model, loaded.tokenizer_dir, folder.classes()).eval()


def _run_data_section(loaded) -> dict[str, Any]:
    """The data section of a classifier run's recipe ({} for anything else)."""
    from pretrain.runtime.checkpoint import resolve_checkpoint, run_metadata

    if loaded.family not in ("clip-classify", "clip-captions") or loaded.info.get("format") != "deepspeed":
        return {}
    return run_metadata(resolve_checkpoint(loaded.info["checkpoint"]))["recipe"].get("data", {})


def _metrics(model: torch.nn.Module, folder, split: str, batch_size: int, max_samples: int | None) -> dict[str, Any]:
    from pretrain.models import EvalRequest, RunData, clip_classify

    run = RunData(folder, None, model.config)
    return clip_classify.evaluate(model, run, EvalRequest(split, batch_size, max_samples))


def evaluate_folder(
    checkpoint: str,
    root: str,
    classnames: str | None = None,
    split: str = "val",
    batch_size: int = 16,
    max_samples: int | None = None,
    wise_ft: list[float] | None = None,
    wise_ft_from: str | None = None,
    val_fraction: float | None = None,
) -> dict[str, Any]:
    """Loss, top-1 and top-5 of ``checkpoint`` on a split of the labelled folder ``root``; with
    ``wise_ft`` also ``before`` (alpha 0), ``after`` (alpha 1) and each alpha's metrics.
    ``classnames`` and ``val_fraction`` default to a classifier run's own (data.classnames,
    data.val_fraction), so its val split is the one it was evaluated on while training."""
    from data_pipelines.image.folder import ImageFolder
    from pretrain.finetune.wise_ft import interpolated_models
    from pretrain.run.build import load_model

    loaded = load_model(checkpoint)
    data = _run_data_section(loaded)
    if val_fraction is None:
        val_fraction = data.get("val_fraction", 0.1)
    folder = ImageFolder(root, classnames or data.get("classnames"), val_fraction)
    model, how = as_classifier(loaded, folder)
    result: dict[str, Any] = {
        "split": split,
        **_metrics(model, folder, split, batch_size, max_samples),
        "classifier": how,
        "image_folder": str(Path(root)),
        **loaded.info,
    }
    if wise_ft:
        # a head fine-tuned on these classes, or a CLIP fine-tuned on them with class captions
        # (zero-shot at every alpha)
        captions = loaded.family == "clip-captions"
        if how != "head" and not captions:
            raise ValueError(
                f"--wise-ft: {checkpoint} was not fine-tuned on these classes (task classify), so there "
                "is nothing to interpolate"
            )
        alphas = sorted({0.0, 1.0, *wise_ft})
        sweep = {
            a: _metrics(_zero_shot(loaded, m, folder) if captions else m, folder, split, batch_size, max_samples)
            for a, m in interpolated_models(loaded, alphas, wise_ft_from)
        }
        keep = ("top1", "top5", "loss")
        result["wise_ft"] = [{"alpha": a, **{k: sweep[a][k] for k in keep}} for a in sorted({*wise_ft})]
        result["before"] = {k: sweep[0.0][k] for k in keep}
        result["after"] = {k: sweep[1.0][k] for k in keep}
    return result


def describe(result: dict[str, Any]) -> str:
    """The report as text: the model's accuracy, then the WiSE-FT table when there is one."""
    lines = [
        f"{result['image_folder']} [{result['split']}]: {result['samples']} images, {result['num_classes']} classes "
        f"(chance {result['chance_top1']:.4f}), {result['classifier']} classifier",
        f"  top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  loss {result['loss']:.4f}",
    ]
    if "wise_ft" in result:
        lines.append(f"  WiSE-FT  {'alpha':>6} {'top-1':>8} {'top-5':>8} {'loss':>8}")
        rows = [
            ("before", 0.0, result["before"]),
            *(("", r["alpha"], r) for r in result["wise_ft"]),
            ("after", 1.0, result["after"]),
        ]
        for label, a, r in rows:
            lines.append(f"  {label:>7}  {a:>6.2f} {r['top1']:>8.4f} {r['top5']:>8.4f} {r['loss']:>8.4f}")
    return "\n".join(lines)
