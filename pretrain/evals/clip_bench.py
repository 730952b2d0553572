"""pretrain-eval --benchmark DIR: a CLIP's zero-shot classification and retrieval on a local set in
clip_benchmark's WebDataset layout (data_pipelines/image/benchmark_layout.py), with clip_benchmark's
metric names: acc1, acc5, mean_per_class_recall; image_retrieval_recall@k (text -> image) and
text_retrieval_recall@k (image -> text).

The images are centre-cropped and the class embeddings prompt-ensembled exactly as pretrain-eval's
own zero-shot path does (`clip.class_embeddings`, `eval_transform`), and a tie counts as a miss
(`topk_hits`), so on the same samples the numbers equal that path's zero_shot_top1/top5 and R@k.
(clip_benchmark itself breaks ties by torch.topk's order; a trained model has no exact ties.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pretrain.models.clip_metrics import retrieval, topk_hits

KS = (1, 5, 10)


def zero_shot_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 (k capped at the number of classes) and the mean over the classes present of each
    class's top-1 recall."""
    n, classes = logits.shape
    k5 = min(5, classes)
    target = logits.gather(1, labels[:, None])
    rank = (~(logits < target)).sum(dim=1) - 1  # as topk_hits: columns at or above the target, ties lose
    hit1 = rank < 1
    per_class = [hit1[labels == c].float().mean().item() for c in torch.unique(labels)]
    hits = topk_hits(logits, labels, (1, k5))
    return {
        "acc1": hits[1] / n,
        "acc5": hits[k5] / n,
        "mean_per_class_recall": sum(per_class) / len(per_class),
        "samples": n,
    }


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """clip_benchmark's names for `clip_metrics.retrieval`: image retrieval is text -> image."""
    r = retrieval(image, text, ks)
    out = {f"image_retrieval_recall@{k}": r[f"text_to_image_R@{k}"] for k in ks}
    out.update({f"text_retrieval_recall@{k}": r[f"image_to_text_R@{k}"] for k in ks})
    return out


@torch.no_grad()
def evaluate_benchmark(
    model_ref: str, root: str | Path, batch_size: int = 16, max_samples: int | None = None
) -> dict[str, Any]:
    """The metrics of a run's checkpoint or an exported CLIP on the set in ``root``."""
    from data_pipelines.image.benchmark_layout import read_layout
    from data_pipelines.image.decode import decode_rgb
    from data_pipelines.image.loader import tokenize_captions
    from data_pipelines.image.transforms import eval_transform
    from pretrain.models.clip import _tokenizer, class_embeddings, context_length, image_size
    from pretrain.run.build import load_model

    classnames, templates, samples = read_layout(Path(root))
    loaded = load_model(model_ref)
    if loaded.family != "clip":
        raise ValueError(f"--benchmark scores a CLIP; {model_ref} is a {loaded.family} model")
    tokenizer_dir = loaded.tokenizer_dir or Path(loaded.info["checkpoint"])
    tokenizer = _tokenizer(tokenizer_dir)
    model, config = loaded.model, loaded.config
    context, size = context_length(config), image_size(config)
    classifier = class_embeddings(model, tokenizer, {"classnames": classnames, "templates": templates}, context, "cpu")
    images, texts, labels, batch = [], [], [], []
    captions_all = True

    def flush() -> None:
        pixels = torch.stack([eval_transform(decode_rgb(b[0]), size) for b in batch])
        images.append(model.encode_image(pixels))
        if captions_all:
            enc = tokenize_captions(tokenizer, [b[2] for b in batch], context)
            texts.append(model.encode_text(enc["input_ids"], enc["attention_mask"]))
        batch.clear()

    for i, (_key, image, label, caption) in enumerate(samples):
        if max_samples is not None and i >= max_samples:
            break
        if not 0 <= label < len(classnames):
            raise ValueError(f"{root}: class {label} of sample {_key} is not in classnames.txt ({len(classnames)})")
        captions_all = captions_all and caption is not None
        batch.append((image, label, caption))
        labels.append(label)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not labels:
        raise ValueError(f"{root}: the set has no samples")
    image_emb = torch.cat(images)
    results: dict[str, dict[str, float]] = {
        "zeroshot_classification": zero_shot_metrics(image_emb @ classifier.T, torch.tensor(labels))
    }
    if captions_all and texts:
        results["zeroshot_retrieval"] = retrieval_metrics(image_emb, torch.cat(texts))
    return {"model": model_ref, "benchmark": str(root), "num_classes": len(classnames), "results": results}
