"""CLIP-style contrastive image-text models (transformers CLIPModel): build, train, evaluate, export.

The loss is `pretrain.models.contrastive`: in training each pair is scored against every pair of
the optimizer step (micro-batch x accumulation x ranks), whatever the split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, PretrainedConfig

from data_pipelines.eval_split import check_batch_counts
from data_pipelines.image.transforms import CLIP_MEAN, CLIP_STD, normalize_batch
from pretrain.models.clip_metrics import all_reduce_host, gather_rows, grouped_loss, retrieval, topk_hits
from pretrain.models.contrastive import (  # noqa: F401 - the loss, importable with the model
    ContrastiveStep,
    contrastive_row_losses,
    gather_no_grad,
    step_cache_bytes,
)
from pretrain.models.gpt import no_decay, round_up
from pretrain.models.spec import EvalRequest, ModelFamily, RunData, StreamRequest
from pretrain.run.config import ModelConfig, Recipe, VisionConfig
from pretrain.run.feature import EngineParts, Feature, RunContext
from pretrain.runtime.checkpoint import hf_load
from pretrain.runtime.flops import clip_forward_flops, total_flops_from_samples

if TYPE_CHECKING:
    from data_pipelines.loader import TrainStream

# Parameter-name prefixes of each tower, for `model.freeze: ["vision"]` (locked-image tuning).
FREEZE_ALIASES = {"vision": r"^(vision_model|visual_projection)\.", "text": r"^(text_model|text_projection)\."}


class ContrastiveCLIP(torch.nn.Module):
    """A transformers CLIPModel (``.clip``) whose forward is the training loss.

    ``forward(pixel_values, input_ids, attention_mask)`` returns the mean contrastive loss
    (``pixel_values`` normalised float, or the training stream's uint8, normalised on the device);
    with ``weight`` it returns a dict with the weighted loss sum and count and the embeddings;
    with ``embeddings=True`` the two embeddings and the inverse temperature, with gradients;
    with only ``input_ids`` (and ``attention_mask``) the text embeddings. Everything goes
    through forward so that DeepSpeed's engine (ZeRO-3's parameter gathering) sees every call.
    """

    def __init__(self, clip: CLIPModel, max_logit_scale: float = 100.0, config: PretrainedConfig | None = None):
        super().__init__()
        self.clip = clip
        self.max_log_scale = math.log(max_logit_scale)
        # the checkpoint's own pixel statistics (its preprocessor_config.json), else OpenAI's; kept on
        # the transformers config too, which the export's preprocessor is written from
        for key in ("image_mean", "image_std"):
            if config is not None and getattr(config, key, None) is not None:
                setattr(clip.config, key, getattr(config, key))
        self.pixel_mean, self.pixel_std = pixel_stats(clip.config)
        # CLIPModel's temperature is a 0-dim parameter, which DeepSpeed's initial broadcast
        # cannot view as bytes; it trains as shape (1,) and is a scalar again in to_hf().
        if clip.logit_scale.dim() == 0:
            clip.logit_scale = torch.nn.Parameter(
                clip.logit_scale.detach().reshape(1), requires_grad=clip.logit_scale.requires_grad
            )

    @property
    def config(self) -> PretrainedConfig:
        return self.clip.config

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dtype == torch.uint8:  # the training stream's pixels, normalised here on the device
            pixel_values = normalize_batch(pixel_values, self.pixel_mean, self.pixel_std)
        elif (self.pixel_mean, self.pixel_std) != (CLIP_MEAN, CLIP_STD):  # the loaders normalise with OpenAI's
            pixel_values = renormalize(pixel_values, (CLIP_MEAN, CLIP_STD), (self.pixel_mean, self.pixel_std))
        # The engine does not cast inputs: match the tower's dtype (bf16 under bf16 training).
        dtype = self.clip.visual_projection.weight.dtype
        pooled = self.clip.vision_model(pixel_values=pixel_values.to(dtype)).pooler_output
        return F.normalize(self.clip.visual_projection(pooled).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(self.clip.text_projection(pooled).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """The inverse temperature. Training keeps its log at or below ln(max_logit_scale) (CLIP's
        100) by clamping the parameter after each optimizer step, as OpenCLIP does (`LogitScaleClamp`):
        a clamp here would zero the gradient above the bound, and a parameter that crossed it could
        never come back."""
        return self.clip.logit_scale.float().exp().reshape(())

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """ln(max_logit_scale) as the temperature's upper bound, on this rank's copy and on the
        optimizer's fp32 master copy (a ZeRO-3 partition included). Collective under ZeRO 1-3;
        nothing is read back to the host."""
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_local_fp32_param,
            safe_set_full_fp32_param,
            safe_set_local_fp32_param,
        )

        param = self.clip.logit_scale
        if not param.requires_grad:
            return
        if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition (the full-parameter setter cannot place
            param.ds_tensor.data.clamp_(max=self.max_log_scale)  # a parameter smaller than the world)
            master = safe_get_local_fp32_param(param)
            if master is not None:
                safe_set_local_fp32_param(param, master.clamp(max=self.max_log_scale))
            return
        param.data.clamp_(max=self.max_log_scale)
        master = safe_get_full_fp32_param(param)  # None where the parameter is its own master (ZeRO-0)
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(max=self.max_log_scale))

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        embeddings: bool = False,
    ):
        text = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        if pixel_values is None:
            return text
        image = self.encode_image(pixel_values)
        scale = self.scale()
        if embeddings:  # training: the loss is over the whole step (`pretrain.models.contrastive.ContrastiveStep`)
            return {"image": image, "text": text, "scale": scale}
        losses = contrastive_row_losses(image, text, scale, weight)
        if weight is None:
            return losses.mean()
        return {
            "loss_sum": (losses * weight.to(losses.device)).sum(),
            "count": weight.sum(),
            "image": image,
            "text": text,
            "scale": scale.detach(),
        }


def pixel_stats(config: PretrainedConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a CLIP's pixels are normalised with: ``image_mean`` / ``image_std`` that
    `model_config` copied into the config from an init_from checkpoint's preprocessor, else OpenAI's."""
    mean, std = getattr(config, "image_mean", None), getattr(config, "image_std", None)
    if mean is None or std is None:
        return CLIP_MEAN, CLIP_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def renormalize(pixels: torch.Tensor, source, target) -> torch.Tensor:
    """Pixels normalised with ``source`` (mean, std) re-expressed as normalised with ``target``."""
    (m0, s0), (m1, s1) = (
        (torch.tensor(v, device=pixels.device).view(1, -1, 1, 1) for v in p) for p in (source, target)
    )
    return ((pixels * s0 + m0) - m1) / s1


def preprocessor_stats(path: str | Path) -> dict[str, list[float]]:
    """image_mean / image_std of a Hugging Face CLIP directory's preprocessor_config.json ({} without one)."""
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return {}
    pre = json.loads(file.read_text())
    return {k: [float(v) for v in pre[k]] for k in ("image_mean", "image_std") if isinstance(pre.get(k), list)}


def register_external_parameters(model: ContrastiveCLIP) -> None:
    """ZeRO-3 gathers a module's parameters when that module's forward runs; logit_scale belongs
    to CLIPModel, whose own forward is never called, so it is declared used by the wrapper."""
    import deepspeed

    deepspeed.zero.register_external_parameter(model, model.clip.logit_scale)


# --------------------------------------------------------------------------------------------- build


def open_data(path: str | Path):
    from data_pipelines.image.loader import ImageTextShards

    return ImageTextShards(path)


def tokenizer_dir(recipe: Recipe, data) -> Path | None:
    """The caption tokenizer: data.tokenizer, else init_from's own, else the one saved with the data."""
    if recipe.data.tokenizer:
        return Path(recipe.data.tokenizer)
    if recipe.model.init_from and any(
        (Path(recipe.model.init_from) / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    ):
        return Path(recipe.model.init_from)
    return data.tokenizer_path()


def hf_config(
    cfg: ModelConfig,
    tokenizer_vocab: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
) -> CLIPConfig:
    """The transformers config for a CLIP built from the recipe's sizes (pad and bos default to eos)."""
    vision = cfg.vision or VisionConfig()
    eos = eos_token_id
    pad = pad_token_id if pad_token_id is not None else eos
    text = CLIPTextConfig(
        vocab_size=cfg.vocab_size or round_up(tokenizer_vocab, cfg.pad_vocab_multiple),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        projection_dim=cfg.projection_dim,
        attention_dropout=cfg.dropout,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=bos_token_id if bos_token_id is not None else eos,
    )
    image = CLIPVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size or 4 * vision.hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        projection_dim=cfg.projection_dim,
        attention_dropout=cfg.dropout,
    )
    return CLIPConfig(
        text_config=text.to_dict(),
        vision_config=image.to_dict(),
        projection_dim=cfg.projection_dim,
        logit_scale_init_value=cfg.logit_scale_init,
    )


def model_config(cfg: ModelConfig, tokenizer) -> PretrainedConfig:
    if cfg.init_from:
        config = hf_load(AutoConfig.from_pretrained, cfg.init_from, cfg.trust_remote_code)
        for key, value in preprocessor_stats(cfg.init_from).items():  # trained and exported with the checkpoint's
            setattr(config, key, value)
        return config
    return hf_config(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)


def check(recipe: Recipe, data, config: PretrainedConfig, tokenizer) -> list[str]:
    """Problems that would only show once training ran."""
    problems = []
    if getattr(config, "model_type", None) != "clip":
        problems.append(
            f"model.init_from: {recipe.model.init_from} holds a {getattr(config, 'model_type', '?')!r} model, "
            "not a CLIP model"
        )
        return problems
    if config.text_config.vocab_size < len(tokenizer):
        problems.append(
            f"model.vocab_size: the text tower's {config.text_config.vocab_size} rows are fewer than the "
            f"caption tokenizer's vocabulary ({len(tokenizer)})"
        )
    if config.text_config.eos_token_id == 2 and tokenizer.eos_token_id != len(tokenizer) - 1:
        # transformers then pools the text at argmax(input_ids), which is only the eos for OpenAI's vocabulary.
        problems.append(
            "model: the text config's eos_token_id is 2 (transformers' legacy pooling), which only works "
            "with OpenAI's CLIP tokenizer; set eos_token_id in the checkpoint's text_config"
        )
    if tokenizer.eos_token_id is None:
        problems.append("data.tokenizer: the caption tokenizer has no eos token (CLIP pools the text at the eos)")
    for split in (recipe.data.train_split, recipe.data.eval_split):
        if split not in data.manifest["splits"] or not data.shards(split):
            problems.append(f"data.path: {data.root} has no {split!r} shards")
    return problems


def build_model(cfg: ModelConfig, config: PretrainedConfig) -> ContrastiveCLIP:
    import torch._dynamo  # noqa: F401  (see gpt.build_model: not importable inside zero.Init)

    if cfg.init_from:
        clip = CLIPModel.from_pretrained(
            cfg.init_from, dtype=torch.float32, attn_implementation=cfg.attn_implementation
        )
    else:
        clip = CLIPModel._from_config(config, attn_implementation=cfg.attn_implementation, dtype=torch.float32)
    return ContrastiveCLIP(clip, cfg.max_logit_scale, config)


def model_from_config(config: PretrainedConfig, cfg: ModelConfig | None = None) -> ContrastiveCLIP:
    return ContrastiveCLIP(CLIPModel(config), (cfg or ModelConfig(arch="clip")).max_logit_scale, config)


def from_pretrained(path: str | Path) -> ContrastiveCLIP:
    clip = CLIPModel.from_pretrained(path, dtype=torch.float32)
    for key, value in preprocessor_stats(path).items():
        setattr(clip.config, key, value)
    return ContrastiveCLIP(clip)


def hf_model(model: ContrastiveCLIP) -> CLIPModel:
    """The transformers model inside (parameter names as Hugging Face spells them)."""
    return model.clip


def to_hf(model: ContrastiveCLIP) -> CLIPModel:
    """The transformers model, its temperature a scalar again, ready for save_pretrained."""
    clip = model.clip
    # CLIPModel does not clamp: export the bound training kept, never a scale above it
    clip.logit_scale = torch.nn.Parameter(clip.logit_scale.detach().clamp(max=model.max_log_scale).reshape(()))
    return clip


def save_hf_assets(model: CLIPModel, tokenizer, out: Path) -> None:
    """The caption tokenizer (padding with eos, as training did, and ending every text with eos, where
    CLIP pools) and OpenAI's preprocessor_config.json for the model's image size, so that
    `pipeline("zero-shot-image-classification", model=out)` works on the export as it is."""
    from pretrain.models.hf_assets import save_tokenizer

    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # what training padded captions with
        save_tokenizer(tokenizer, out, context_length(model.config), append_eos=True)
    size = image_size(model.config)
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_convert_rgb": True,
                "do_resize": True,
                "size": {"shortest_edge": size},
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": size, "width": size},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": list(pixel_stats(model.config)[0]),  # the checkpoint's own, as training used
                "image_std": list(pixel_stats(model.config)[1]),
            },
            indent=2,
        )
    )


def count_params(config: PretrainedConfig) -> int:
    with torch.device("meta"):
        model = CLIPModel(config)
    return sum(p.numel() for p in model.parameters())


def hidden_size(config: PretrainedConfig) -> int:
    return max(config.text_config.hidden_size, config.vision_config.hidden_size)


def tokens_per_sample(data, config: PretrainedConfig) -> int:
    return config.text_config.max_position_embeddings


def train_flops_per_sample(config: PretrainedConfig, data=None) -> float:
    """Forward and backward FLOPs of one image-text pair: 3 x both towers' forward (`pretrain.runtime.flops`)."""
    return total_flops_from_samples(clip_forward_flops(config), 1)


def context_length(config: PretrainedConfig) -> int:
    return config.text_config.max_position_embeddings


def image_size(config: PretrainedConfig) -> int:
    return config.vision_config.image_size


# --------------------------------------------------------------------------------------------- train


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    from data_pipelines.image.loader import prepare_tokenizer

    return prepare_tokenizer(hf_load(AutoTokenizer.from_pretrained, path))


def train_stream(run: RunData, req: StreamRequest) -> TrainStream:
    from data_pipelines.image.loader import image_text_train_loader

    d, config = req.data, run.model_config
    return image_text_train_loader(
        run.data,
        d.train_split,
        req.micro_batch_size,
        _tokenizer(run.tokenizer_dir),
        context_length(config),
        image_size(config),
        req.rank,
        req.world,
        num_workers=d.num_workers,
        seed=req.seed,
        shuffle_buffer=d.shuffle_buffer,
        augment=d.augment,
        flip=d.flip,
        resampled=d.resampled,
        trace=req.sample_ids,
        normalize=False,
    )  # uint8 to the device; encode_image normalises there


def loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )


def loss_items(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Image-text pairs: each micro-batch's contrastive loss is a mean over its pairs."""
    return torch.tensor(batch["input_ids"].shape[0], device=batch["input_ids"].device)


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return loss(model, batch) * batch["input_ids"].shape[0]


# --------------------------------------------------------------------------------------------- evaluate


@torch.no_grad()
def class_embeddings(model, tokenizer, classes: dict[str, Any], context: int, device) -> torch.Tensor:
    """(num_classes, D): each class's text embedding averaged over the prompt templates and
    renormalised (CLIP's prompt ensembling)."""
    from data_pipelines.image.loader import tokenize_captions

    names, templates = classes["classnames"], classes.get("templates") or ["{}"]
    rows = []
    for name in names:
        enc = tokenize_captions(tokenizer, [t.format(name) for t in templates], context)
        emb = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        rows.append(F.normalize(emb.float().mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def evaluate(model, run: RunData, req: EvalRequest) -> dict[str, Any]:
    """Contrastive loss (over batches of batch_size x world, padding masked), zero-shot top-1/5
    with prompt ensembling (when the data has classes.json), and retrieval recall@1/5/10 in both
    directions. Collective: every rank calls it and gets the same result.

    ``req.loss_batch``: the loss over consecutive groups of that many samples of the split instead
    (a training run's step: micro-batch x accumulation x ranks pairs), whatever batch the forward
    passes take, so a large run's loss needs no large forward."""
    from data_pipelines.image.loader import image_text_eval_batches

    data, config, device, world = run.data, run.model_config or model.config, req.device, req.world
    tokenizer = _tokenizer(run.tokenizer_dir)
    context, size = context_length(config), image_size(config)
    classes = data.classes()
    classifier = class_embeddings(model, tokenizer, classes, context, device).cpu() if classes else None
    stats: dict[str, int] = {}
    loss_sum = torch.zeros(2, dtype=torch.float64)
    zs = torch.zeros(5, dtype=torch.float64)  # labelled, top1, top5, held-out labelled, held-out top1
    held_out = torch.tensor(sorted(classes.get("held_out", [])) if classes else [], dtype=torch.long)
    feats_i, feats_t, index = [], [], []
    scale = None
    ran = 0
    for batch in image_text_eval_batches(
        data, req.split, req.batch_size, tokenizer, context, size, req.rank, world, req.max_samples, stats
    ):
        ran += 1
        weight, label = batch.pop("weight"), batch.pop("label")
        out = model(
            pixel_values=batch["pixel_values"].to(device),
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            weight=weight.to(device),
        )
        loss_sum += torch.tensor([float(out["loss_sum"]), float(out["count"])], dtype=torch.float64)
        image, text, scale = out["image"].cpu(), out["text"].cpu(), out["scale"].cpu()
        valid = batch["index"] >= 0
        feats_i.append(image[valid]), feats_t.append(text[valid]), index.append(batch["index"][valid])
        if classifier is not None:
            keep = valid & (label >= 0)
            if keep.any():
                logits = image[keep] @ classifier.T
                hits = topk_hits(logits, label[keep], (1, min(5, logits.shape[1])))
                zs[0] += int(keep.sum())
                zs[1] += hits[1]
                zs[2] += hits[min(5, logits.shape[1])]
                unseen = torch.isin(label[keep], held_out)
                if unseen.any():
                    zs[3] += int(unseen.sum())
                    zs[4] += topk_hits(logits[unseen], label[keep][unseen], (1,))[1]
    if world > 1:
        check_batch_counts(ran, f"eval {req.split} on rank {req.rank}", req.group)
        loss_sum, zs = all_reduce_host(loss_sum, device), all_reduce_host(zs, device)
    rows = gather_rows(feats_i, feats_t, index, world, device) if feats_i else None  # every rank's, in split order
    if req.loss_batch is not None and rows is not None:
        loss_sum = grouped_loss(*rows, scale, req.loss_batch)
    result: dict[str, Any] = {
        "loss": float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan"),
        "samples": int(loss_sum[1]),
    }
    if classifier is not None and zs[0] > 0:
        result.update(
            zero_shot_top1=float(zs[1] / zs[0]),
            zero_shot_top5=float(zs[2] / zs[0]),
            num_classes=len(classes["classnames"]),
            zero_shot_samples=int(zs[0]),
            chance_top1=1.0 / len(classes["classnames"]),
        )
        if zs[3] > 0:
            result.update(zero_shot_top1_held_out=float(zs[4] / zs[3]), held_out_samples=int(zs[3]))
    if feats_i:  # no batches at all (an empty split) on every rank alike: nothing to retrieve
        result.update(retrieval(*rows[:2]))
    if stats:
        result["skipped"] = stats
    return result


FAMILY = ModelFamily(
    name="clip",
    unit="samples",
    freeze_aliases=FREEZE_ALIASES,
    open_data=open_data,
    tokenizer_dir=tokenizer_dir,
    model_config=model_config,
    check=check,
    count_params=count_params,
    hidden_size=hidden_size,
    tokens_per_sample=tokens_per_sample,
    train_flops_per_sample=train_flops_per_sample,
    build_model=build_model,
    model_from_config=model_from_config,
    from_pretrained=from_pretrained,
    hf_model=hf_model,
    to_hf=to_hf,
    save_hf_assets=save_hf_assets,
    no_decay=no_decay,
    register_external_parameters=register_external_parameters,
    train_stream=train_stream,
    loss=loss,
    loss_items=loss_items,
    loss_sum=loss_sum,
    evaluate=evaluate,
    # CLIPModel's temperature is a 0-dim parameter, which zero.Init cannot broadcast (DeepSpeed 0.19
    # views every new parameter as bytes: "self.dim() cannot be 0 to view Float as Byte")
    zero_init=False,
)


class ContrastiveBatch(Feature):
    """The run feature that makes a contrastive model's batch the whole optimizer step's
    (`pretrain.models.contrastive.ContrastiveStep`)."""

    name = "contrastive batch"

    def engine(self, model, ctx: RunContext) -> EngineParts | None:
        if ctx.family.loss_sum is not loss_sum:  # contrastive families (not the classifier on CLIP's towers)
            return None
        return EngineParts(step_loss=ContrastiveStep())

    def started(self, engine, ctx: RunContext) -> list[str]:
        if ctx.family.loss_sum is not loss_sum or not ctx.is_main:
            return []
        micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
        pairs = micro * gas * ctx.layout.dp
        line = f"contrastive batch: every pair is scored against the step's {pairs:,} pairs"
        if gas > 1:
            dim = ctx.model_config.projection_dim
            mb = step_cache_bytes(pairs, dim, micro) / 2**20
            line += f" (one forward without gradients per micro-batch first; {mb:,.1f} MiB of embeddings and logits)"
        return [line]


class LogitScaleClamp(Feature):
    """The run feature that keeps CLIP's learnable temperature at or below its bound after every
    optimizer step (OpenCLIP's clamp), where the contrastive models train it."""

    name = "CLIP temperature bound"

    def after_step(self, engine, ctx: RunContext) -> None:
        if isinstance(engine.module, ContrastiveCLIP):
            engine.module.clamp_logit_scale()
