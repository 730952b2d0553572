"""CLIP fine-tuned as a classifier on a labelled image folder (recipe ``task: "classify"``).

The classifier of Wortsman et al. 2022 ("Robust fine-tuning of zero-shot models"): a linear head
on the image tower's L2-normalised embedding, its weight initialised to the zero-shot classifier
(each class's prompt-ensembled text embedding times the logit scale) and its bias to 0, so that
before the first step the model's predictions are exactly the pretrained CLIP's zero-shot ones.
Training is cross-entropy on the folder's labels; the text tower and the temperature take no
part and stay frozen (and so equal in the original and the fine-tuned weights, which WiSE-FT
then interpolates only where they differ).

This is the clip family with another data source (`data_pipelines.image.folder`), loss and
evaluation; the rest (building from ``init_from``, freezing, ZeRO-3 registration, FLOPs) is
clip's. The run's CLIP config carries the classes (``id2label``) and prompt templates
(``zero_shot_templates``), so a checkpoint rebuilds its head from its own ``model/config.json``;
an export writes the head to ``classifier.safetensors`` beside the CLIPModel (``config.classifier``
names it), and a CLIP directory without one becomes a classifier through `zero_shot_classifier`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import CLIPModel, PretrainedConfig

from pretrain.models import clip
from pretrain.models.clip_metrics import topk_hits
from pretrain.models.spec import EvalRequest, RunData, StreamRequest
from pretrain.run.config import DataConfig, ModelConfig, Recipe

if TYPE_CHECKING:
    from data_pipelines.image.folder import FolderTrainStream, ImageFolder

HEAD_FILE = "classifier.safetensors"


class ClassifierCLIP(clip.ContrastiveCLIP):
    """A CLIPModel with a linear head on its normalised image embedding.

    ``forward(pixel_values, labels)`` returns the mean cross-entropy; with ``weight`` (0 for
    padding rows) a dict with the weighted loss sum, the count and the logits; with only
    ``input_ids`` the text embeddings, as `ContrastiveCLIP` (for the zero-shot weights)."""

    def __init__(self, model: CLIPModel, num_classes: int, max_logit_scale: float = 100.0):
        super().__init__(model, max_logit_scale)
        self.head = torch.nn.Linear(model.config.projection_dim, num_classes)

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.encode_image(pixel_values)
        return self.head(image.to(self.head.weight.dtype)).float()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ):
        if pixel_values is None:
            return self.encode_text(input_ids, attention_mask)
        logits = self.logits(pixel_values)
        if weight is None:
            return F.cross_entropy(logits, labels)
        weight = weight.to(logits.device)
        losses = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        return {"loss_sum": (losses * weight).sum(), "count": weight.sum(), "logits": logits.detach()}


def classes_of(config: PretrainedConfig) -> dict[str, Any]:
    """The class names (label order) and prompt templates a classifier's config carries."""
    labels = getattr(config, "id2label", None) or {}
    templates = getattr(config, "zero_shot_templates", None)
    if not labels or not templates:
        raise ValueError(
            "the CLIP config names no classes (id2label) or prompt templates (zero_shot_templates): "
            "it is not a classifier from task 'classify'"
        )
    return {"classnames": [labels[i] for i in range(len(labels))], "templates": list(templates)}


def set_classes(config: PretrainedConfig, classes: dict[str, Any]) -> None:
    config.id2label = dict(enumerate(classes["classnames"]))
    config.label2id = {n: i for i, n in enumerate(classes["classnames"])}
    config.zero_shot_templates = list(classes["templates"])


@torch.no_grad()
def zero_shot_head(
    model: clip.ContrastiveCLIP, tokenizer_dir: str | Path, classes: dict[str, Any], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(num_classes, D): the zero-shot classifier, prompt-ensembled class embeddings x logit scale."""
    tokenizer = clip._tokenizer(Path(tokenizer_dir))
    emb = clip.class_embeddings(model, tokenizer, classes, clip.context_length(model.config), device)
    return emb * model.scale().to(emb.device)


_TEXT = re.compile(clip.FREEZE_ALIASES["text"] + "|^logit_scale$")  # what the zero-shot head is made with


def _gathered(params: list[torch.nn.Parameter]):
    """The whole parameters while inside, where ZeRO-3 built them partitioned (init_from under
    zero.Init); collective, like the build itself."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def zero_shot_classifier(
    model: clip.ContrastiveCLIP, tokenizer_dir: str | Path, classes: dict[str, Any]
) -> ClassifierCLIP:
    """A pretrained CLIP as a classifier of ``classes`` whose predictions are its zero-shot ones."""
    device = model.clip.visual_projection.weight.device
    out = ClassifierCLIP(model.clip, len(classes["classnames"]), max_logit_scale=math.exp(model.max_log_scale))
    out.head.to(device)
    text = [p for n, p in model.clip.named_parameters() if _TEXT.search(n)]
    with _gathered(text), torch.no_grad():
        out.head.weight.copy_(zero_shot_head(model, tokenizer_dir, classes, device))
        out.head.bias.zero_()
    set_classes(out.clip.config, classes)
    return out


# --------------------------------------------------------------------------------------------- the family


def open_data(path: str | Path, data: DataConfig | None = None) -> ImageFolder:
    from data_pipelines.image.folder import ImageFolder

    d = data or DataConfig()
    return ImageFolder(path, d.classnames, d.val_fraction)


def tokenizer_dir(recipe: Recipe, data) -> Path | None:
    """The caption tokenizer of the pretrained CLIP (the one its zero-shot weights were made with)."""
    if recipe.data.tokenizer:
        return Path(recipe.data.tokenizer)
    return Path(recipe.model.init_from) if recipe.model.init_from else None


def check(recipe: Recipe, data: ImageFolder, config: PretrainedConfig, tokenizer) -> list[str]:
    """The clip checks that concern the model and the folder's splits; then the folder's classes
    and prompt templates go into the config (``id2label``, ``zero_shot_templates``), which the run
    saves as model/config.json: every later load of a checkpoint rebuilds the head from it."""
    problems = [p for p in clip.check(recipe, _NoShards(), config, tokenizer) if not p.startswith("data.path")]
    for split in (recipe.data.train_split, recipe.data.eval_split):
        if split not in data.splits or not data.files(split):
            problems.append(
                f"data.path: the image folder {data.root} has no {split!r} images (a folder without "
                "train/ and val/ subfolders holds out data.val_fraction of each class by a hash)"
            )
    if not problems:
        set_classes(config, data.classes())
    return problems


class _NoShards:
    """Stands in for prepared shards in clip.check, whose split checks do not apply to a folder."""

    manifest: dict = {"splits": {}}
    root = "-"

    def shards(self, split: str) -> list:
        return []


def tokens_per_sample(data, config: PretrainedConfig) -> int:
    return 0  # images only: the text tower is not run while fine-tuning


def train_flops_per_sample(config: PretrainedConfig, data=None) -> float:
    """The image tower's forward and backward (the text tower is not run; the head is negligible)."""
    image_only = copy.deepcopy(config)
    image_only.text_config.max_position_embeddings = 0
    return clip.train_flops_per_sample(image_only)


def build_model(cfg: ModelConfig, config: PretrainedConfig) -> ClassifierCLIP:
    """The pretrained CLIP (``init_from``) with the zero-shot head of the config's classes; the
    text tower and the temperature frozen (they take no part in the loss)."""
    base = clip.build_model(cfg, config)
    model = zero_shot_classifier(base, cfg.init_from, classes_of(config))
    set_classes(model.clip.config, classes_of(config))
    for name, p in model.clip.named_parameters():
        if _TEXT.search(name):
            p.requires_grad_(False)
    return model


def model_from_config(config: PretrainedConfig, cfg: ModelConfig | None = None) -> ClassifierCLIP:
    return ClassifierCLIP(
        CLIPModel(config), len(classes_of(config)["classnames"]), (cfg or ModelConfig(arch="clip")).max_logit_scale
    )


def from_pretrained(path: str | Path) -> ClassifierCLIP:
    """An export of a classifier: the CLIPModel and its head (classifier.safetensors)."""
    from safetensors.torch import load_file

    base = CLIPModel.from_pretrained(path, dtype=torch.float32)
    head_file = Path(path) / getattr(base.config, "classifier", HEAD_FILE)
    if not head_file.is_file():
        raise FileNotFoundError(f"{head_file}: the classifier head of this export is missing")
    model = ClassifierCLIP(base, len(classes_of(base.config)["classnames"]))
    model.head.load_state_dict({k: v.float() for k, v in load_file(str(head_file)).items()})
    return model


def to_hf(model: ClassifierCLIP):
    """The CLIPModel, carrying its head (not a submodule: save_pretrained must not write it into
    the CLIP weights) for save_hf_assets."""
    hf = clip.to_hf(model)
    hf.config.classifier = HEAD_FILE
    hf.__dict__["classifier_head"] = {k: v.detach() for k, v in model.head.state_dict().items()}
    return hf


def save_hf_assets(model: CLIPModel, tokenizer, out: Path) -> None:
    from safetensors.torch import save_file

    clip.save_hf_assets(model, tokenizer, out)
    head = model.__dict__.get("classifier_head")
    if head is not None:
        dtype = model.visual_projection.weight.dtype
        save_file({k: v.to(dtype).contiguous() for k, v in head.items()}, str(out / HEAD_FILE))


def train_stream(run: RunData, req: StreamRequest) -> FolderTrainStream:
    from data_pipelines.image.folder import FolderTrainStream

    d = req.data
    return FolderTrainStream(
        run.data,
        d.train_split,
        req.micro_batch_size,
        clip.image_size(run.model_config),
        req.rank,
        req.world,
        seed=req.seed,
        num_workers=d.num_workers,
        augment=d.augment,
        flip=d.flip,
    )


def loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(pixel_values=batch["pixel_values"], labels=batch["labels"])


def loss_items(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.tensor(batch["labels"].shape[0], device=batch["labels"].device)


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return loss(model, batch) * batch["labels"].shape[0]


@torch.no_grad()
def evaluate(model, run: RunData, req: EvalRequest) -> dict[str, Any]:
    """Cross-entropy, top-1 and top-5 accuracy on a split of the folder. Collective: every rank
    calls it (each reads image i % world) and gets the same result."""
    from data_pipelines.image.folder import folder_eval_batches

    folder, config, device = run.data, run.model_config or model.config, req.device
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, count, top-1 hits, top-5 hits
    stats: dict[str, int] = {}
    num_classes = len(folder.classnames)
    k5 = min(5, num_classes)
    for batch in folder_eval_batches(
        folder, req.split, req.batch_size, clip.image_size(config), req.rank, req.world, req.max_samples, stats
    ):
        weight, labels = batch["weight"], batch["labels"]
        out = model(pixel_values=batch["pixel_values"].to(device), labels=labels.to(device), weight=weight.to(device))
        keep = weight > 0
        hits = topk_hits(out["logits"].cpu()[keep], labels[keep], (1, k5))
        sums += torch.tensor([float(out["loss_sum"]), float(out["count"]), hits[1], hits[k5]], dtype=torch.float64)
    if req.world > 1:
        sums = clip._all_reduce(sums, device)
    n = float(sums[1])
    result: dict[str, Any] = {
        "loss": float(sums[0]) / n if n else float("nan"),
        "top1": float(sums[2]) / n if n else 0.0,
        "top5": float(sums[3]) / n if n else 0.0,
        "samples": int(n),
        "num_classes": num_classes,
        "chance_top1": 1.0 / num_classes,
    }
    if stats:
        result["skipped"] = stats
    return result


# ------------------------------------------------------------------- objective "captions" (FLYP-style)


def captions_train_stream(run: RunData, req: StreamRequest) -> FolderTrainStream:
    from data_pipelines.image.folder import ClassCaptions, FolderTrainStream

    d, config = req.data, run.model_config
    captions = ClassCaptions(
        classes_of(config), clip._tokenizer(run.tokenizer_dir), clip.context_length(config), req.seed
    )
    return FolderTrainStream(
        run.data,
        d.train_split,
        req.micro_batch_size,
        clip.image_size(config),
        req.rank,
        req.world,
        seed=req.seed,
        num_workers=d.num_workers,
        augment=d.augment,
        flip=d.flip,
        captions=captions,
    )


@torch.no_grad()
def captions_evaluate(model, run: RunData, req: EvalRequest) -> dict[str, Any]:
    """The zero-shot classifier of the model as it now is (prompt-ensembled class embeddings of
    its text tower) on a split of the folder: top-1, top-5 and its cross-entropy
    (``classify_loss``); ``loss`` is the training objective, the contrastive loss of each batch's
    images against their class captions (so that the gap to the train loss means something).
    Everything goes through the model's forward, as ZeRO-3 needs. Collective."""
    from data_pipelines.image.folder import folder_eval_batches
    from data_pipelines.image.loader import tokenize_captions

    folder, config, device = run.data, run.model_config, req.device
    classes = folder.classes()
    tokenizer = clip._tokenizer(run.tokenizer_dir)
    context = clip.context_length(config)
    weights = clip.class_embeddings(model, tokenizer, classes, context, device)
    prompts = tokenize_captions(tokenizer, [classes["templates"][0].format(n) for n in classes["classnames"]], context)
    sums = torch.zeros(5, dtype=torch.float64)  # classify loss sum, count, top-1, top-5, contrastive loss sum
    num_classes, stats = len(classes["classnames"]), {}
    k5 = min(5, num_classes)
    for batch in folder_eval_batches(
        folder, req.split, req.batch_size, clip.image_size(config), req.rank, req.world, req.max_samples, stats
    ):
        weight, labels = batch["weight"], batch["labels"]
        rows = labels.clamp(min=0)
        out = model(
            pixel_values=batch["pixel_values"].to(device),
            input_ids=prompts["input_ids"][rows].to(device),
            attention_mask=prompts["attention_mask"][rows].to(device),
            weight=weight.to(device),
        )
        logits = (out["scale"] * out["image"] @ weights.T).float().cpu()
        losses = torch.nn.functional.cross_entropy(logits, rows, reduction="none") * weight
        keep = weight > 0
        hits = topk_hits(logits[keep], labels[keep], (1, k5))
        sums += torch.tensor(
            [float(losses.sum()), float(weight.sum()), hits[1], hits[k5], float(out["loss_sum"])], dtype=torch.float64
        )
    if req.world > 1:
        sums = clip._all_reduce(sums, device)
    n = float(sums[1])
    result: dict[str, Any] = {
        "loss": float(sums[4]) / n if n else float("nan"),
        "classify_loss": float(sums[0]) / n if n else float("nan"),
        "top1": float(sums[2]) / n if n else 0.0,
        "top5": float(sums[3]) / n if n else 0.0,
        "samples": int(n),
        "num_classes": num_classes,
        "chance_top1": 1.0 / num_classes,
    }
    if stats:
        result["skipped"] = stats
    return result


FAMILY = dataclasses.replace(
    clip.FAMILY,
    name="clip-classify",
    open_data=open_data,
    tokenizer_dir=tokenizer_dir,
    check=check,
    tokens_per_sample=tokens_per_sample,
    train_flops_per_sample=train_flops_per_sample,
    build_model=build_model,
    model_from_config=model_from_config,
    from_pretrained=from_pretrained,
    to_hf=to_hf,
    save_hf_assets=save_hf_assets,
    train_stream=train_stream,
    loss=loss,
    loss_items=loss_items,
    loss_sum=loss_sum,
    evaluate=evaluate,
)

# A plain CLIP trained contrastively against class-name captions: clip's model, loss and export,
# the folder as data, and its zero-shot accuracy on the folder as the evaluation.
CAPTIONS_FAMILY = dataclasses.replace(
    clip.FAMILY,
    name="clip-captions",
    open_data=open_data,
    tokenizer_dir=tokenizer_dir,
    check=check,
    train_stream=captions_train_stream,
    evaluate=captions_evaluate,
)
