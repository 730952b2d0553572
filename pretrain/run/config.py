"""Typed recipe: the JSON a run is described by, validated in full before any rank does work.

A recipe has one section per component (model, data, training, eval, checkpoint); each
component receives only its own section. Unknown keys, wrong types and out-of-range values
are collected and reported together, each with its key path and a did-you-mean.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pretrain.run.tracking import LoggingConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeError(ValueError):
    """A recipe (or the DeepSpeed config next to it) that cannot run; lists every problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


class VisionConfig(_Section):
    """CLIP's image tower (a ViT); the text tower is the model section's own sizes."""

    image_size: int = Field(224, gt=0, description="input resolution; the loader crops and resizes to it")
    patch_size: int = Field(32, gt=0, description="ViT patch side in pixels; must divide image_size")
    hidden_size: int = Field(768, gt=0, description="ViT width")
    num_layers: int = Field(12, gt=0, description="ViT blocks")
    num_heads: int = Field(12, gt=0, description="ViT attention heads; must divide hidden_size")
    intermediate_size: int | None = Field(None, gt=0, description="ViT MLP width (default 4*hidden_size)")

    @model_validator(mode="after")
    def _divides(self) -> VisionConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class LoraConfig(_Section):
    """Low-rank adapters (LoRA, Hu et al. 2021, through the peft library) on a pretrained model:
    only the adapters train; pretrain-export writes them as a peft adapter, or merged (--merge)."""

    r: int = Field(8, gt=0, description="rank of each adapter's A (r x in) and B (out x r) matrices")
    alpha: float = Field(16.0, gt=0, description="the adapter's update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="names of the layers that get adapters, matched as peft does (the whole "
        "module name or its last dotted parts: 'c_attn', 'q_proj', 'mlp.c_proj'); a name that matches no layer is "
        "refused. Default: peft's choice for the architecture (gpt2: c_attn; llama and clip: q_proj, v_proj)",
    )


class ModelConfig(_Section):
    """Architecture of the network built from scratch (ignored in favour of the checkpoint's own
    config when ``init_from`` names a Hugging Face directory). For CLIP the sizes below describe
    the text tower, ``vision`` the image tower."""

    arch: Literal["gpt2", "llama", "clip"] = Field(
        "gpt2",
        description="transformers architecture: gpt2 (GPT2LMHeadModel), llama (LlamaForCausalLM) or clip (CLIPModel)",
    )
    hidden_size: int = Field(768, gt=0, description="width of the residual stream")
    num_layers: int = Field(12, gt=0, description="transformer blocks")
    num_heads: int = Field(12, gt=0, description="attention heads; must divide hidden_size")
    num_kv_heads: int | None = Field(
        None, gt=0, description="llama only: key/value heads for grouped-query attention (default: num_heads)"
    )
    intermediate_size: int | None = Field(
        None, gt=0, description="MLP width (default: 4*hidden_size for gpt2, about 8/3*hidden_size for llama)"
    )
    max_position_embeddings: int = Field(
        1024, gt=0, description="longest sequence the model accepts; must be >= the data's seq_len"
    )
    vocab_size: int | None = Field(
        None, gt=0, description="embedding rows; default: the tokenizer's vocabulary, rounded up to pad_vocab_multiple"
    )
    pad_vocab_multiple: int = Field(
        64, gt=0, description="round the default vocab_size up to a multiple of this (faster matmuls)"
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on attention, residual and embeddings (pretraining usually uses 0)"
    )
    tie_word_embeddings: bool = Field(True, description="share the input embedding with the output projection")
    rope_theta: float = Field(10000.0, gt=0, description="llama only: RoPE base")
    init_from: str | None = Field(
        None, description="local Hugging Face model directory to start from (fine-tuning); overrides the sizes above"
    )
    vision: VisionConfig | None = Field(None, description="clip only: the image tower (default: ViT-B/32 sizes)")
    projection_dim: int = Field(512, gt=0, description="clip only: width of the shared image-text embedding")
    logit_scale_init: float = Field(
        2.6592, description="clip only: initial log of the contrastive temperature's inverse (ln(1/0.07))"
    )
    max_logit_scale: float = Field(
        100.0, gt=0, description="clip only: the learnt temperature's inverse is clamped at this (CLIP: 100)"
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="parameters left untrained: 'vision' or 'text' (a whole CLIP tower; "
        "['vision'] is locked-image tuning) or regular expressions matched against parameter names",
    )
    trust_remote_code: bool = Field(
        False,
        description="whether transformers may run Python code shipped in init_from or the tokenizer "
        "directory (it runs with your permissions): set only by pretrain-train --trust-remote-code; a recipe "
        "that sets it is ignored with a warning",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="attention kernel: sdpa (PyTorch's fused scaled-dot-product attention), eager (plain "
        "matmuls), flash_attention_2 (the flash-attn package, CUDA only; refused before any rank starts elsewhere)",
    )
    zero3_init: bool | Literal["auto"] = Field(
        "auto",
        description="under ZeRO-3, build the model already partitioned (deepspeed.zero.Init) so no rank holds it "
        "whole; "
        "init_from then loads partitioned too (rank 0 reads the checkpoint and each rank keeps its 1/N). auto: with "
        "init_from, or above 1B parameters (zero.Init draws a random init in another order, so small runs from "
        "scratch would not match their ZeRO-0/1/2 twins); gpt only: CLIP's 0-dim temperature defeats zero.Init",
    )
    lora: LoraConfig | None = Field(
        None, description="train low-rank adapters instead of the model's weights (needs init_from)"
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.init_from is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self

    @field_validator("freeze")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None
        return patterns


class SourceConfig(_Section):
    """One source of training (or evaluation) data, read where it lives (`data_pipelines.sources`)."""

    urls: str | list[str] = Field(
        description="a folder written by prepare-text / prepare-image-text, a folder of raw "
        "img2dataset shards, a glob, a brace pattern (/data/{00000..00099}.tar), a pipe: "
        "command, an http(s):// pattern or an s3:// / gs:// URL (fsspec); or a list of them"
    )
    name: str | None = Field(None, description="short name in logs and samples_by_source (default: the folder's name)")
    weight: float = Field(1.0, gt=0, description="relative share of this source in a mixture of train sources")
    samples: int | None = Field(
        None,
        gt=0,
        description="samples in the source, where no manifest, sizes.json, "
        "*_stats.json or parquet beside the shards says",
    )
    tokens: int | None = Field(None, gt=0, description="tokens in the source (text), for reference")

    @field_validator("urls")
    @classmethod
    def _not_empty(cls, urls: str | list[str]) -> str | list[str]:
        if not urls or any(not u.strip() for u in ([urls] if isinstance(urls, str) else urls)):
            raise ValueError("an empty source string")
        return urls


class DataConfig(_Section):
    """Where the data is and how the streaming loader reads it."""

    path: str | None = Field(
        None,
        description="directory written by prepare-text or prepare-image-text (holds "
        "manifest.json), or one source string as in sources[].urls; --data overrides (and "
        "replaces sources)",
    )
    sources: list[SourceConfig] = Field(
        default_factory=list, description="train sources (instead of path), each {urls, name, weight, samples, tokens}"
    )
    eval_sources: list[SourceConfig] = Field(
        default_factory=list,
        description="sources evaluated on instead of "
        "the val split (their val split when prepared, all of them when raw)",
    )
    holdout_fraction: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="fraction of the raw train sources' "
        "samples held out for val by a hash of the sample's content (never trained on); "
        "default 0.01 when there are raw train sources and no eval_sources, else 0",
    )
    caption_key: str = Field(
        "txt", min_length=1, description="clip only: the member of a raw sample holding its caption"
    )
    tokenizer: str | None = Field(
        None,
        description="clip only: local Hugging Face tokenizer directory for the captions "
        "(default: init_from's tokenizer, else the one saved with the data)",
    )
    augment: bool = Field(True, description="clip only: random resized crop when training (eval always centre-crops)")
    flip: bool = Field(
        True, description="clip only: random horizontal flip when training; turn off when captions say left or right"
    )
    train_split: str = Field("train", description="split trained on")
    eval_split: Literal["val"] = Field(
        "val", description="split evaluated during training (the test split is only for pretrain-eval --split test)"
    )
    shuffle_buffer: int = Field(
        1000,
        ge=0,
        description="samples per shuffle block of each loader (read, permuted, handed "
        "out; a resume re-reads at most one block and one shard); 0 = no sample shuffle",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank, each reading its own shards")
    resampled: bool = Field(
        False, description="draw shards with replacement (for shard counts that do not divide ranks x workers)"
    )
    max_bad_fraction: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="stop the run when more than this fraction of the samples read were bad (skipped), after the "
        "first 100",
    )
    fetch_retries: int = Field(
        3,
        ge=0,
        description="times a shard that cannot be fetched (HTTP error, dropped connection, "
        "failed pipe: command, object store error, data.fetch_timeout) is tried again before it is "
        "skipped and counted as shard_unreachable (its samples count against max_bad_fraction)",
    )
    fetch_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds a shard fetch may go without delivering a byte (a stalled "
        "server or command) before it fails, naming the URL, and is retried",
    )
    fetch_backoff: float = Field(
        1.0,
        ge=0,
        description="seconds before the first retry of a shard fetch, doubled at each "
        "further one (capped at 60, with up to 25% jitter)",
    )
    fetch_min_rate: float = Field(
        1024.0,
        ge=0,
        description="bytes a second a shard fetch must average once it has run data.fetch_timeout seconds "
        "(a server or command that trickles a byte at a time never hits the timeout); 0: no minimum",
    )
    fetch_redirects: Literal["same_host", "any"] = Field(
        "same_host",
        description="http(s) redirects followed: same_host (the default) only to the same scheme and host, "
        "never to another host, an internal address or from https to http; any: all",
    )
    classnames: str | None = Field(
        None,
        description="task classify only: class-name file of the labelled image folder "
        "(text or JSON, see data_pipelines/image/folder.py; default: data.path's own "
        "classnames.json or classnames.txt, else the folder names)",
    )
    val_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="task classify only: fraction of each class held out "
        "for val by a stable hash of the file's path, when the folder has no train/ and val/ "
        "subfolders",
    )

    @model_validator(mode="after")
    def _one_way(self) -> DataConfig:
        if self.path and self.sources:
            raise ValueError("path and sources both set: name the data one way (a path is one source)")
        return self


class LossSpikeConfig(_Section):
    """training.loss_spike: loss spikes found on every rank's loss and acted on by every rank."""

    action: Literal["warn", "skip", "rewind"] = Field(
        "warn",
        description="warn: log the spike; skip: drop the step's update, as for a NaN (needs ZeRO stage 1-3, whose "
        "optimizer refuses a non-finite gradient); rewind: load the last sealed checkpoint taken before the spike, "
        "skip the data the steps since it read, optionally lower the LR (lr_factor, lr_steps), and go on",
    )
    window: int = Field(50, ge=5, description="the recent steps whose losses make the reference (median and MAD)")
    threshold: float = Field(
        6.0,
        gt=0,
        description="a step is a spike when the highest loss of any rank exceeds the median of the window's by "
        "more than this many robust standard deviations (1.4826 x the window's median absolute deviation, at "
        "least 1% of the median): about 6 rarely fires on noise",
    )
    min_steps: int = Field(
        20, ge=0, description="steps observed before any judgement (the first steps' loss falls too fast to judge)"
    )
    lr_factor: float = Field(1.0, gt=0, le=1, description="rewind: multiply the LR by this for lr_steps steps after")
    lr_steps: int = Field(0, ge=0, description="rewind: how many steps after a rewind train at lr x lr_factor")
    max_rewinds: int = Field(
        5, ge=0, description="rewind: after this many rewinds in the run the next spike stops it (exit code 76)"
    )


class TrainingConfig(_Section):
    """The optimisation: fills the "auto" values of the DeepSpeed config."""

    micro_batch_size: int = Field(
        8, gt=0, description="sequences per rank per forward pass (train_micro_batch_size_per_gpu)"
    )
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches summed before each optimizer step")
    max_steps: int = Field(1000, gt=0, description="optimizer steps in the run; --max-steps overrides")
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the decay")
    warmup_steps: int = Field(
        0,
        ge=0,
        description="linear warmup: optimizer step s of the first W trains at lr x s / W "
        "(step 1 already learns); 0 means no warmup",
    )
    weight_decay: float = Field(
        0.1,
        ge=0,
        description="AdamW weight decay; never applied to biases, norm gains, token and "
        "position embeddings or CLIP's logit scale (one rule for every family)",
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 = off)")
    reference_batch_size: int | None = Field(
        None,
        gt=0,
        description="global batch (sequences) at which lr was tuned; with lr_scaling, lr follows the run's global "
        "batch",
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="how lr and min_lr follow the global batch: linear (Goyal et al.), sqrt (for Adam), none"
    )
    scale_warmup: bool = Field(
        False, description="with lr_scaling, also scale warmup_steps so warmup covers the same number of samples"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "bf16", description="fills bf16/fp16 'enabled: auto' in the DeepSpeed config (fp16 is GPU-only)"
    )
    seed: int = Field(1234, description="seed for model init, data order and dropout; --seed overrides")
    activation_checkpointing: bool = Field(
        False,
        description="recompute each transformer block's activations in the backward pass instead of storing "
        "them (Hugging Face gradient checkpointing, non-reentrant; GPT and both CLIP towers): much less activation "
        "memory for about a third more compute; the losses are unchanged",
    )
    log_every: int = Field(1, gt=0, description="write a metrics.jsonl train line every N steps")
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="the accelerator's dense peak TFLOPS per GPU for the run's "
        "dtype, for mfu in metrics.jsonl (default: from the table in pretrain/runtime/flops.py by "
        "the CUDA device's name; none on a CPU, so mfu is null there)",
    )
    on_nonfinite: Literal["skip", "stop"] = Field(
        "skip",
        description="a NaN/Inf loss: skip that micro-batch (every rank drops it; with gradient accumulation under "
        "ZeRO-1/2/3 the whole optimizer step, checked once per step) or stop the run",
    )
    max_nonfinite_skips: int = Field(
        10, ge=0, description="with on_nonfinite=skip, stop after this many skipped micro-batches"
    )
    loss_spike: LossSpikeConfig | None = Field(
        None, description="detect loss spikes and warn, skip or rewind (off by default); see LossSpikeConfig"
    )
    skip_steps: list[tuple[int, int]] = Field(
        default_factory=list,
        description="[[first, last], ...]: the batches of these steps are read and not trained (Megatron's "
        "--skip-train-iteration-range); the steps keep their numbers, the step counter and LR schedule move past "
        "them with no update; --skip-steps FIRST:LAST adds one",
    )
    z_loss: float = Field(
        0.0,
        ge=0,
        description="GPT: add z x logsumexp(logits)^2 per trained token to the loss (PaLM, OLMo: 1e-4 keeps the "
        "softmax normaliser near 1); logged apart as z_loss, the cross-entropy stays loss",
    )
    check_batches_every: int = Field(
        100,
        ge=0,
        description="ranks of one tensor- or sequence-parallel group must hold the same batch: compare a hash "
        "of it across each group at the first step and every this many steps (0: the first step only)",
    )

    @model_validator(mode="after")
    def _lr_order(self) -> TrainingConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        ranges = sorted(self.skip_steps)
        for first, last in ranges:
            if not 1 <= first <= last:
                raise ValueError(f"skip_steps: [{first}, {last}] is not a range of steps (1 <= first <= last)")
        for (_, last), (first, _) in zip(ranges, ranges[1:]):
            if first <= last:
                raise ValueError(f"skip_steps: ranges overlap at step {first}")
        return self


class EvalConfig(_Section):
    """Periodic evaluation on the val split."""

    every: int = Field(100, ge=0, description="evaluate every N steps (0 = only at the end); --eval-every overrides")
    max_samples: int | None = Field(
        None,
        gt=0,
        description="val samples per evaluation: a fixed, seeded subset with one sample from each equal stretch of "
        "the split (every class of a class-ordered split), the same every evaluation (default: the whole split)",
    )
    batch_size: int | None = Field(
        None, gt=0, description="sequences per rank per eval forward (default: training micro_batch_size)"
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="family gpt: lm-evaluation-harness task YAML files (local data; nothing is downloaded) run on "
        "the live model, logged as eval/<task>/<metric> (pip install .[lmeval]); see pretrain/evals/harness.py",
    )
    tasks_every: int = Field(0, ge=0, description="run eval.tasks every N steps (0 = at every evaluation)")
    tasks_limit: int | None = Field(None, gt=0, description="eval.tasks: the first N documents of each task")


class CheckpointConfig(_Section):
    """When DeepSpeed checkpoints are written under OUTPUT/checkpoints/."""

    every: int = Field(0, ge=0, description="save every N steps (0 = only at the end); --checkpoint-every overrides")
    at_end: bool = Field(True, description="save after the last step")
    keep_last: int | None = Field(None, gt=0, description="keep only the newest K checkpoints (default: all)")
    background: bool = Field(
        True,
        description="write checkpoint files in a background thread: a save blocks training only while the state is "
        "copied to host memory; the tag is sealed (checksums) and `latest` moved once every rank's files are written",
    )
    on_error: Literal["stop", "continue"] = Field(
        "stop",
        description="a checkpoint write that fails (disk full): stop the run (the previous checkpoint stays latest), "
        "or continue: log it in metrics.jsonl and save again at the next checkpoint",
    )


class Recipe(_Section):
    """A whole run."""

    name: str = Field("run", description="short name, used for the default output directory")
    family: Literal["gpt", "clip"] = Field(
        "gpt", description="model family: gpt (causal LM on text shards) or clip (contrastive, on image-text shards)"
    )
    task: Literal["pretrain", "classify"] = Field(
        "pretrain",
        description="pretrain: the family's own objective on its data; classify (family clip): fine-tune "
        "model.init_from as a classifier of the labelled image folder data.path (ROOT/<class>/*.jpg), its head "
        "initialised from the zero-shot text embeddings (Wortsman et al. 2022)",
    )
    classify_objective: Literal["head", "captions"] = Field(
        "head",
        description="task classify only: head (cross-entropy through the zero-shot-initialised linear head; "
        "the text tower frozen) or captions (both towers, CLIP's contrastive loss against a class-name caption per "
        "image, 'a photo of a {class}' from the prompt templates, as FLYP does; the result is a plain CLIP)",
    )
    output_dir: str | None = Field(None, description="run directory (default: runs/<name>); --output-dir overrides")
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON used when --deepspeed_config is not given")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _family_matches_arch(self) -> Recipe:
        is_clip = self.model.arch == "clip"
        if (self.family == "clip") != is_clip:
            raise ValueError(
                f"family {self.family!r} does not go with model.arch {self.model.arch!r} "
                "(family clip needs arch clip; family gpt needs gpt2 or llama)"
            )
        if not is_clip and (self.model.vision is not None or self.data.tokenizer):
            raise ValueError("model.vision and data.tokenizer are for family clip only")
        if self.task == "classify" and not is_clip:
            raise ValueError("task classify fine-tunes a pretrained CLIP: it needs family clip")
        if self.task != "classify" and self.classify_objective != "head":
            raise ValueError("classify_objective is for task classify only")
        return self


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the section that a validation error location points into."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list section (data.sources.0)
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
        # list[X] and X | None: the section inside
        cls = next((a for a in getattr(cls, "__args__", ()) if hasattr(a, "model_fields")), cls)
    return list(getattr(cls, "model_fields", {}))


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(err["loc"][-1]), _fields_at(Recipe, err["loc"]), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{loc}: unknown key{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if err["type"] not in ("missing",) and not isinstance(got, dict):
        msg += f" (got {json.dumps(got, default=str)})"
    return f"{loc or '<recipe>'}: {msg}"


def parse_recipe(data: dict, source: str = "<recipe>") -> Recipe:
    """Validate a recipe dict, raising one RecipeError that lists every problem."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(source, [_describe(err) for err in e.errors()]) from None


def find_recipe(name_or_path: str) -> Path:
    """A recipe path, or the name of a shipped recipe (``gpt-tiny``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / (name_or_path if name_or_path.endswith(".json") else name_or_path + ".json")
    if shipped.is_file():
        return shipped
    names = sorted(q.stem for q in RECIPES_DIR.glob("*.json"))
    raise RecipeError(str(name_or_path), [f"no such file, and not a shipped recipe (shipped: {', '.join(names)})"])


def load_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(str(path), [f"{what} not found"]) from None
    except json.JSONDecodeError as e:
        raise RecipeError(str(path), [f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), [f"{what} must be a JSON object"])
    return data


def load_recipe(name_or_path: str, overrides: dict[str, Any] | None = None) -> tuple[Recipe, Path]:
    """Load and validate a recipe, applying dotted-key overrides (``{"training.max_steps": 5}``)."""
    path = find_recipe(name_or_path)
    data = load_json(path, "recipe")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_recipe(data, str(path)), path
