"""The planner's math (`pretrain-plan`, `pretrain/cli/plan.py`): what a pretraining run costs before
anyone starts it: FLOPs, GPU-days, and the memory per GPU under each ZeRO stage.

    pretrain-plan --recipe gpt2-124m --tokens 10B --gpu a100 --num-gpus 8
    pretrain-plan --params 7b --tokens 2T --gpu h100 --num-gpus 512 --json
    pretrain-plan --params 150M --flops-per-sample 4.4e9 --samples 400M --gpu a100   (non-text models)

Formulas (each pure function below cites its own):

* Compute. Training FLOPs ~ 6·N·D for N parameters and D tokens: 2·N per token forward, twice that
  backward (Kaplan et al. 2020, "Scaling Laws", sec. 2.1; Hoffmann et al. 2022, "Chinchilla",
  Appendix F). ``--attention-flops`` adds the attention-score term of Chowdhery et al. 2022, "PaLM",
  Appendix B: 12·n_layers·seq_len·hidden per token (QK^T and AV, forward and backward, without
  halving for the causal mask). A model that is not a token stream gives its forward FLOPs per
  sample F; training costs 3·F per sample (forward + backward ~ 2x forward).
* Time. GPU-days = FLOPs / (peak × MFU) / 86400 s; wall-days divides by the GPU count (linear scaling).
* Model states. Rajbhandari et al. 2020, "ZeRO", sec. 3.1 and Figure 1: mixed-precision Adam holds
  2 bytes of fp16/bf16 weights, 2 of gradients and K=12 of optimizer state (fp32 master weights,
  momentum, variance) per parameter; stages 1, 2, 3 shard the optimizer state, then the gradients,
  then the weights across the Nd data-parallel ranks. fp32 (and tf32) training keeps 4 + 4 bytes and
  K=8 (momentum, variance; the weights are their own master copy).
* Activations. Korthikanti et al. 2022, "Reducing Activation Recomputation", sec. 4.1: one layer
  stores s·b·h·(34 + 5·a·s/h) bytes in 16-bit without tensor/sequence parallelism; full recomputation
  keeps only each layer's 2·s·b·h input plus one layer's activations while it is recomputed.

GB here is 1e9 bytes throughout, as in the ZeRO paper (so are the vendors' memory sizes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

# The FLOPs math and the accelerator table are shared with the trainer's MFU.
from pretrain.runtime.flops import BYTES_PER_ELEMENT, DTYPES, GPUS, total_flops, total_flops_from_samples  # noqa: F401

GB = 1e9
SECONDS_PER_DAY = 86_400

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12, "p": 10**15}


# ---------------------------------------------------------------------------------------------
# The math: small pure functions.


def parse_count(text: str) -> int:
    """A positive count written as ``124e6``, ``1.3B``, ``350M``, ``7b``, ``2.5T`` or ``1_000_000``.

    Suffixes (any case): K=1e3, M=1e6, B or G=1e9, T=1e12, P=1e15. Parsed in decimal, so ``1.3B`` is
    exactly 1,300,000,000; a result that is not a whole number is rounded to the nearest one.
    """
    s = str(text).strip().replace("_", "").replace(",", "")
    suffix = s[-1:].lower() if s[-1:].isalpha() and s[-1:].lower() in _SUFFIXES else ""
    number = s[: len(s) - len(suffix)]
    try:
        value = Decimal(number) * _SUFFIXES[suffix]
    except InvalidOperation:
        raise ValueError(f"not a count: {text!r} (expected e.g. 124e6, 350M, 1.3B, 2.5T)") from None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"not a positive count: {text!r}")
    return int(value.to_integral_value())


def gpu_days(flops: float, peak_tflops: float, mfu: float, num_gpus: int = 1) -> float:
    """Days to do ``flops`` on ``num_gpus`` GPUs each achieving ``mfu`` of ``peak_tflops``:
    flops / (num_gpus · peak · 1e12 · mfu) / 86400 (linear scaling across GPUs)."""
    return flops / (num_gpus * peak_tflops * 1e12 * mfu) / SECONDS_PER_DAY


def zero_bytes_per_param(stage: int, dtype: str = "bf16") -> tuple[int, int]:
    """(bytes replicated on every rank, bytes sharded over the Nd ranks) per parameter.

    ZeRO (Rajbhandari et al. 2020, sec. 3.1 and Figure 1), mixed precision: weights 2, gradients 2,
    Adam state K=12 (fp32 master weights, momentum, variance). fp32/tf32 training: 4 + 4 + K=8.
    Stage 0 shards nothing, 1 the optimizer state, 2 also the gradients, 3 also the weights.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    w, g, k = (2, 2, 12) if BYTES_PER_ELEMENT[dtype] == 2 else (4, 4, 8)
    return [(w + g + k, 0), (w + g, k), (w, g + k), (0, w + g + k)][stage]


def zero_model_states_bytes(params: float, stage: int, dp: int, dtype: str = "bf16") -> float:
    """Model-state bytes per GPU under ZeRO ``stage`` with ``dp`` data-parallel ranks (Ψ = params):
    stage 0 (2+2+12)Ψ; 1: 2Ψ+2Ψ+12Ψ/Nd; 2: 2Ψ+(2+12)Ψ/Nd; 3: (2+2+12)Ψ/Nd (fp32: 4, 4, K=8)."""
    replicated, sharded = zero_bytes_per_param(stage, dtype)
    return params * (replicated + sharded / dp)


def activation_bytes(
    seq_len: int,
    micro_batch: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int | None,
    *,
    checkpointing: bool = False,
    flash_attention: bool = False,
    dtype: str = "bf16",
    tp: int = 1,
    sp: int = 1,
) -> float:
    """Activation bytes per GPU for one micro-batch, Korthikanti et al. 2022, sec. 4.1 (no tensor or
    sequence parallelism): each layer stores s·b·h·(34 + 5·a·s/h) bytes in 16-bit.

    The 5·a·s/h part is the a·s² attention scores, softmax and dropout mask; ``flash_attention``
    drops it (fused attention never materialises them, the same as the paper's selective
    recomputation). With full ``checkpointing`` (sec. 4.3) only each layer's input, 2·s·b·h, is kept,
    plus one layer's full activations while it is recomputed in the backward. fp32/tf32 doubles it
    all (a slight overestimate: the dropout masks stay one byte). Embeddings and the logits are not
    counted.

    Tensor parallelism of degree ``tp`` (Korthikanti Table 2, without Megatron's sequence
    parallelism) splits the attention and MLP internals: s·b·h·(10 + 24/t + 5·a·s/(h·t)) per layer.
    Ulysses sequence parallelism of degree ``sp`` gives each rank s/p of the sequence outside
    attention and a/p of the heads over the whole sequence inside it: everything divides by p.
    """
    sbh = seq_len * micro_batch * hidden_size / sp
    if flash_attention:
        per_layer = sbh * (10.0 + 24.0 / tp)
    else:
        if not num_heads:
            raise ValueError("the attention-score term needs num_heads (or assume --flash-attention)")
        per_layer = sbh * (10.0 + 24.0 / tp + 5.0 * num_heads * seq_len / (hidden_size * tp))
    total = 2.0 * sbh * num_layers + per_layer if checkpointing else per_layer * num_layers
    return total * BYTES_PER_ELEMENT[dtype] / 2


def min_gpus(
    params: float, stage: int, usable_bytes: float, other_bytes: float = 0.0, dtype: str = "bf16"
) -> int | None:
    """Smallest Nd at which stage's model states plus ``other_bytes`` (activations) fit in
    ``usable_bytes``: replicated·Ψ + sharded·Ψ/Nd + other <= usable. None when no Nd does (stage 0
    shards nothing, so it is 1 or None)."""
    replicated, sharded = zero_bytes_per_param(stage, dtype)
    room = usable_bytes - other_bytes - replicated * params
    if room < 0 or (room == 0 and sharded):
        return None
    if sharded == 0:
        return 1
    n = max(1, math.ceil(sharded * params / room))
    while zero_model_states_bytes(params, stage, n, dtype) + other_bytes > usable_bytes:  # float rounding
        n += 1
    while n > 1 and zero_model_states_bytes(params, stage, n - 1, dtype) + other_bytes <= usable_bytes:
        n -= 1
    return n


def layout_states_bytes(
    params: float, stage: int, num_gpus: int, tp: int = 1, sp: int = 1, dtype: str = "bf16"
) -> float:
    """Model-state bytes per GPU on ``num_gpus`` = TP x SP x DP GPUs: tensor parallelism splits every
    weight (and its gradient and optimizer state) t ways; ZeRO then shards over the SP x DP ranks
    that hold the same TP slice (DeepSpeed's Ulysses counts SP ranks as data-parallel for ZeRO)."""
    return zero_model_states_bytes(params / tp, stage, num_gpus // tp, dtype)


def min_gpus_layout(
    params: float,
    stage: int,
    usable_bytes: float,
    other_bytes: float = 0.0,
    dtype: str = "bf16",
    tp: int = 1,
    sp: int = 1,
) -> int | None:
    """Fewest GPUs (a multiple of tp x sp) on which the stage's model states plus ``other_bytes``
    fit, or None."""
    zero_ranks = min_gpus(params / tp, stage, usable_bytes, other_bytes, dtype)
    if zero_ranks is None:
        return None
    return tp * sp * math.ceil(zero_ranks / sp)


def layout_problems(num_gpus: int, tp: int, sp: int, num_heads: int | None, seq_len: int | None) -> list[str]:
    """What keeps a (TP, SP) layout from running: sizes that do not divide."""
    problems = []
    if tp < 1 or sp < 1:
        problems.append("--tp and --sp must be at least 1")
        return problems
    if num_gpus % (tp * sp):
        problems.append(f"--num-gpus {num_gpus} is not a multiple of tp x sp = {tp * sp}")
    if num_heads and num_heads % (tp * sp):
        problems.append(f"{num_heads} attention heads do not divide among tp x sp = {tp * sp} ranks")
    if seq_len and seq_len % sp:
        problems.append(f"seq_len {seq_len} does not divide among sp = {sp} ranks")
    return problems


def layout_runs(tp: int, sp: int, stage: int) -> bool:
    """Whether the trainer runs this combination: the rules `pretrain.parallel.tensor_parallel.check` and
    `pretrain.parallel.sequence_parallel.check` apply before any rank starts (AutoTP with any ZeRO stage,
    Ulysses with ZeRO-3, not both at once); tests/test_sequence_parallel.py keeps the two in step."""
    if tp > 1 and sp > 1:
        return False
    return sp == 1 or stage == 3


LAYOUT_DEGREES = (1, 2, 4, 8)  # TP beyond one 8-GPU node, or SP beyond 8, are left to the user


def smallest_layout(
    params: float, usable_bytes: float, dtype: str, act_bytes, num_heads: int | None, seq_len: int | None
) -> dict | None:
    """The (TP, SP, ZeRO stage) that fits on the fewest GPUs; ties go to less model parallelism,
    then to the lower stage. ``act_bytes(tp, sp)`` gives the activations per GPU of a layout."""
    best = None
    for tp in LAYOUT_DEGREES:
        for sp in LAYOUT_DEGREES:
            if layout_problems(tp * sp, tp, sp, num_heads, seq_len):
                continue
            act = act_bytes(tp, sp)
            for stage in range(4):
                if not layout_runs(tp, sp, stage):
                    continue
                gpus = min_gpus_layout(params, stage, usable_bytes, act, dtype, tp, sp)
                if gpus is None:
                    continue
                key = (gpus, tp * sp, stage)
                if best is None or key < best[0]:
                    states = layout_states_bytes(params, stage, gpus, tp, sp, dtype)
                    best = (
                        key,
                        {
                            "tp": tp,
                            "sp": sp,
                            "zero_stage": stage,
                            "num_gpus": gpus,
                            "dp": gpus // (tp * sp),
                            "memory_gb_per_gpu": (states + act) / GB,
                        },
                    )
    return None if best is None else best[1]


# ---------------------------------------------------------------------------------------------
# Model families: what a recipe tells the planner. A family registers a function taking
# (Recipe, vocab_size) and returning a ModelShape; a family whose samples are not token streams
# (CLIP: an image and a caption) sets forward_flops_per_sample and the plan counts 3·F per sample.


@dataclass(frozen=True)
class ModelShape:
    params: int
    seq_len: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    forward_flops_per_sample: float | None = None  # None: a token stream, 6·N·D applies
    micro_batch: int | None = None
    precision: str | None = None
    accumulation: int | None = None
    contrastive_dim: int | None = None  # CLIP: the embedding width its step-wide contrastive batch holds


def gpt_shape(recipe: Any, vocab_size: int) -> ModelShape:
    """A gpt-family recipe: parameters counted on the meta device (nothing allocated); vocab_size
    stands in for the tokenizer's vocabulary and is rounded up to pad_vocab_multiple, as training does."""
    from transformers import AutoConfig

    from pretrain.models.gpt import count_params, hf_config
    from pretrain.runtime.checkpoint import hf_load

    config = (
        hf_load(AutoConfig.from_pretrained, recipe.model.init_from)
        if recipe.model.init_from
        else hf_config(recipe.model, vocab_size)
    )
    return ModelShape(
        params=count_params(config),
        seq_len=config.max_position_embeddings,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        micro_batch=recipe.training.micro_batch_size,
        precision=recipe.training.precision,
    )


def clip_shape(recipe: Any, vocab_size: int) -> ModelShape:
    """A clip-family recipe: forward FLOPs per image-text pair from `pretrain.runtime.flops.clip_forward_flops`
    (the function the trainer's MFU uses too)."""
    from transformers import AutoConfig

    from pretrain.models.clip import count_params, hf_config
    from pretrain.runtime.checkpoint import hf_load
    from pretrain.runtime.flops import clip_forward_flops

    config = (
        hf_load(AutoConfig.from_pretrained, recipe.model.init_from)
        if recipe.model.init_from
        else hf_config(recipe.model, vocab_size, eos_token_id=0)
    )
    v, t = config.vision_config, config.text_config
    return ModelShape(
        params=count_params(config),
        forward_flops_per_sample=clip_forward_flops(config),
        hidden_size=max(v.hidden_size, t.hidden_size),
        micro_batch=recipe.training.micro_batch_size,
        precision=recipe.training.precision,
        accumulation=recipe.training.gradient_accumulation_steps,
        contrastive_dim=config.projection_dim,
    )


FAMILY_SHAPES: dict[str, Callable[[Any, int], ModelShape]] = {"gpt": gpt_shape, "clip": clip_shape}


def recipe_shape(name_or_path: str, vocab_size: int = 50304) -> ModelShape:
    from pretrain.run.config import load_recipe

    recipe, path = load_recipe(name_or_path)
    shape_of = FAMILY_SHAPES.get(recipe.family)
    if shape_of is None:
        raise ValueError(
            f"{path}: the planner knows no family {recipe.family!r} (known: {', '.join(FAMILY_SHAPES)}); "
            "give --params and --flops-per-sample instead"
        )
    return shape_of(recipe, vocab_size)


# ---------------------------------------------------------------------------------------------
# The plan.


def plan(
    *,
    params: int,
    gpu: str,
    dtype: str = "bf16",
    tokens: int | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    forward_flops_per_sample: float | None = None,
    attention_flops: bool = False,
    num_gpus: int = 1,
    mfu: float = 0.4,
    micro_batch: int = 1,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    activation_checkpointing: bool = False,
    flash_attention: bool = False,
    reserve_gb: float = 2.0,
    tp: int = 1,
    sp: int = 1,
    accumulation: int = 1,
    contrastive_dim: int | None = None,
) -> dict:
    """Everything the CLI reports, as the dict printed by ``--json``. ``contrastive_dim``: a
    contrastive model's embedding width, whose step-wide batch (micro x accumulation x DP pairs)
    adds its cached embeddings and one micro-batch's logits to the memory per GPU."""
    problems = layout_problems(num_gpus, tp, sp, num_heads, seq_len)
    if problems:
        raise ValueError("; ".join(problems))
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r} (known: {', '.join(GPUS)})")
    spec = GPUS[gpu]
    if dtype not in spec.tflops:
        raise ValueError(
            f"{spec.name} has no {dtype} peak (it supports {', '.join(spec.tflops)}); pick another --dtype"
        )
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    if num_gpus < 1 or micro_batch < 1:
        raise ValueError("--num-gpus and --micro-batch must be at least 1")
    if reserve_gb < 0:
        raise ValueError("--reserve-gb must not be negative")
    if tokens is not None and samples is not None:
        raise ValueError("give --tokens or --samples, not both")
    notes: list[str] = []

    if forward_flops_per_sample is not None:
        if attention_flops:
            raise ValueError("--attention-flops applies to 6·N·D; with --flops-per-sample attention is already in F")
        if samples is None:
            if tokens is None or not seq_len:
                raise ValueError("with --flops-per-sample give --samples (or --tokens with --seq-len)")
            samples = tokens // seq_len
        tokens = samples * seq_len if seq_len else None
        flops = total_flops_from_samples(forward_flops_per_sample, samples)
        notes.append("FLOPs = 3 x forward FLOPs per sample x samples")
    else:
        if tokens is None:
            if samples is None:
                raise ValueError("give --tokens, or --samples with --seq-len")
            if not seq_len:
                raise ValueError("--samples needs --seq-len (or a --recipe to take it from) to count tokens")
            tokens = samples * seq_len
        elif seq_len:
            samples = tokens // seq_len
        flops = total_flops(
            params, tokens, attention=attention_flops, num_layers=num_layers, seq_len=seq_len, hidden_size=hidden_size
        )
        notes.append("FLOPs = 6·N·D" + (" + 12·L·s·h·D (attention)" if attention_flops else ""))

    peak = spec.tflops[dtype]
    usable = (spec.memory_gb - reserve_gb) * GB
    act = act_ckpt = None
    has_shape = bool(seq_len and hidden_size and num_layers and (num_heads or flash_attention))

    def act_of(t: int, p: int, ckpt: bool) -> float:
        return (
            activation_bytes(
                seq_len,
                micro_batch,
                hidden_size,
                num_layers,
                num_heads,
                checkpointing=ckpt,
                flash_attention=flash_attention,
                dtype=dtype,
                tp=t,
                sp=p,
            )
            if has_shape
            else 0.0
        )

    if has_shape:
        act, act_ckpt = act_of(tp, sp, False), act_of(tp, sp, True)
    else:
        notes.append(
            "activations not estimated (give --recipe, or --seq-len, --hidden-size, --num-layers and "
            "--num-heads): memory is model states only"
        )
    if flash_attention:
        notes.append("activations assume fused (flash) attention: no a·s² scores stored")
    used_act = (act_ckpt if activation_checkpointing else act) or 0.0
    contrastive = None
    if contrastive_dim:
        from pretrain.models.contrastive import step_cache_bytes

        pairs = micro_batch * accumulation * (num_gpus // (tp * sp))
        contrastive = {
            "pairs_per_step": pairs,
            "gb_per_gpu": step_cache_bytes(pairs, contrastive_dim, micro_batch) / GB,
        }
        notes.append(
            f"contrastive batch: {pairs:,} pairs per step (micro {micro_batch} x accumulation {accumulation} x DP); "
            f"their embeddings and one micro-batch's logits take {contrastive['gb_per_gpu']:.3f} GB per GPU, "
            "in the totals"
        )
        used_act += contrastive["gb_per_gpu"] * GB

    zero = {}
    for stage in range(4):
        states = layout_states_bytes(params, stage, num_gpus, tp, sp, dtype)
        zero[f"zero{stage}"] = {
            "model_states_gb_per_gpu": states / GB,
            "activations_gb_per_gpu": None if act is None else act / GB,
            "activations_checkpointed_gb_per_gpu": None if act_ckpt is None else act_ckpt / GB,
            "memory_gb_per_gpu": (states + used_act) / GB,
            "fits": states + used_act <= usable,
            "min_gpus": min_gpus_layout(params, stage, usable, used_act, dtype, tp, sp),
            "runs": layout_runs(tp, sp, stage),  # False: the trainer refuses this stage with this layout
        }
    cheapest = next((s for s in range(4) if zero[f"zero{s}"]["fits"] and layout_runs(tp, sp, s)), None)
    smallest = smallest_layout(
        params, usable, dtype, lambda t, p: act_of(t, p, activation_checkpointing), num_heads, seq_len
    )
    if tp > 1 or sp > 1:
        notes.append(
            f"layout TP {tp} x SP {sp} x DP {num_gpus // (tp * sp)}: weights split {tp} ways, ZeRO shards "
            f"over the {num_gpus // tp} SP x DP ranks, activations per Korthikanti et al. Table 2 / sp"
        )
        runs = [f"ZeRO-{s}" for s in range(4) if layout_runs(tp, sp, s)]
        notes.append(
            f"the trainer runs this layout with {', '.join(runs) if runs else 'no ZeRO stage'} "
            "(Ulysses SP with ZeRO-3 only, and not together with AutoTP)"
        )
    days = gpu_days(flops, peak, mfu)
    return {
        "params": params,
        "tokens": tokens,
        "samples": samples,
        "seq_len": seq_len,
        "total_flops": flops,
        "gpu_days": days,
        "wall_days": gpu_days(flops, peak, mfu, num_gpus),
        "gpu_hours": days * 24,
        "weights_gb": params * BYTES_PER_ELEMENT[dtype] / GB,
        "zero": zero,
        "cheapest_stage": cheapest,
        "gpu": gpu,
        "gpu_name": spec.name,
        "gpu_memory_gb": spec.memory_gb,
        "reserve_gb": reserve_gb,
        "dtype": dtype,
        "peak_tflops": peak,
        "mfu": mfu,
        "num_gpus": num_gpus,
        "micro_batch": micro_batch,
        "activation_checkpointing": activation_checkpointing,
        "tp": tp,
        "sp": sp,
        "dp": num_gpus // (tp * sp),
        "smallest_layout": smallest,
        "accumulation": accumulation,
        "contrastive": contrastive,
        "notes": notes,
    }
