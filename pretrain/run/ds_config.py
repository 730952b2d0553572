"""DeepSpeed JSON as the user wrote it, with its "auto" values filled from the recipe.

Configs from DeepSpeedExamples or the Hugging Face docs use "auto" for batch sizes, the
optimizer and scheduler hyper-parameters, precision and bucket sizes; we fill those the way
the Hugging Face integration does, so such a file works unchanged.

A setting both files hold (lr, weight_decay, betas, eps, gradient clipping, precision) is then
compared, as the Hugging Face integration does: a concrete DeepSpeed value that differs from a
value the recipe (or the command line) wrote is refused, every such pair listed together; one
that differs from a recipe default the user never wrote wins, with a note, and `settled_recipe`
and `run_optimization` carry it into what the trainer uses. A setting the DeepSpeed config lacks
takes the recipe's value (gradient_clipping, and precision where no section is enabled). Batch
sizes: a concrete DeepSpeed value wins over the recipe's with a note (`_batch_sizes`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

from pretrain.run.config import Recipe, RecipeError
from pretrain.run.schedules import DEEPSPEED_TYPES, TOOLKIT_TYPES, Optimization, check_params, effective_optimization

AUTO = "auto"


def _set_auto(section: dict, key: str, value: Any) -> None:
    if section.get(key) == AUTO:
        section[key] = value


def _find_autos(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_autos(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_autos(v, f"{path}[{i}]")]
    return [path] if node == AUTO else []


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return _number(a) and _number(b) and math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def _agree(
    ds_key: str,
    ds_value: Any,
    field: str,
    value: Any,
    written: set[str],
    problems: list[str],
    notes: list[str],
    scaled: str = "",
) -> None:
    """One setting held by both files: a value the user wrote must agree; a recipe default gives way."""
    if _same(ds_value, value):
        return
    if field in written:
        problems.append(
            f"{ds_key} {_show(ds_value)} in the DeepSpeed config != training.{field} "
            f'{_show(value)}{scaled} in the recipe: write "auto" for {ds_key} in the DeepSpeed '
            f"config to use the recipe's value, or make the two agree"
        )
    else:
        notes.append(
            f"{ds_key}={_show(ds_value)} from the DeepSpeed config is used; the recipe does not set "
            f"training.{field} (its default is {_show(value)}{scaled})"
        )


def _show(v: Any) -> str:
    return str(list(v) if isinstance(v, tuple) else v).replace("True", "true").replace("False", "false")


def _shared_settings(ds: dict, tr, opt_values: Optimization, problems: list[str], notes: list[str]) -> None:
    """Compare the concrete values both files hold (before "auto" is filled, so only what the user wrote
    in the DeepSpeed config counts); fill gradient_clipping when the DeepSpeed config lacks it."""
    written = tr.model_fields_set
    opt = ds.get("optimizer")
    params = opt.get("params") if isinstance(opt, dict) else None
    if isinstance(params, dict):
        scaled = " (scaled to the global batch)" if opt_values.lr != tr.lr else ""
        pairs = (
            ("lr", "lr", opt_values.lr),
            ("weight_decay", "weight_decay", tr.weight_decay),
            ("betas", "betas", list(tr.betas)),
            ("eps", "eps", tr.eps),
        )
        for key, field, value in pairs:
            given = params.get(key, AUTO)
            if given == AUTO or not (_number(given) or isinstance(given, list)):
                continue  # DeepSpeed's own check reports a value of the wrong type
            _agree(
                f"optimizer.params.{key}", given, field, value, written, problems, notes, scaled if key == "lr" else ""
            )
    if "gradient_clipping" not in ds:
        ds["gradient_clipping"] = tr.grad_clip  # else DeepSpeed's own default (1.0) replaces the recipe's
    elif _number(ds["gradient_clipping"]):
        _agree("gradient_clipping", ds["gradient_clipping"], "grad_clip", tr.grad_clip, written, problems, notes)
    _precision(ds, tr, written, problems, notes)


def _precision(ds: dict, tr, written: set[str], problems: list[str], notes: list[str]) -> None:
    """bf16/fp16 sections: "auto" or no enabled section means the recipe's precision; an enabled
    section (or the recipe's own section switched off: fp32) is the DeepSpeed config's own value."""
    sections = {n: ds[n] for n in ("bf16", "fp16") if isinstance(ds.get(n), dict)}
    on = [n for n, s in sections.items() if s.get("enabled") is True]
    autos = [n for n, s in sections.items() if s.get("enabled") == AUTO]
    if len(on) > 1:
        return  # reported as "both true"
    # the recipe's own section switched off says fp32; another section switched off says nothing
    off = tr.precision != "fp32" and sections.get(tr.precision, {}).get("enabled") is False
    if on or off:
        given = on[0] if on else "fp32"
        for n in autos:
            sections[n]["enabled"] = False
        key = f"{given}.enabled true" if on else f"{tr.precision}.enabled false"
        if given == tr.precision:
            return
        if "precision" in written:
            problems.append(
                f"{key} in the DeepSpeed config trains in {given} != training.precision "
                f'"{tr.precision}" in the recipe: write "enabled": "auto" in the DeepSpeed '
                "config to use the recipe's value, or make the two agree"
            )
        else:
            notes.append(
                f"{key} in the DeepSpeed config: the run trains in {given}; the recipe does not set "
                f'training.precision (its default is "{tr.precision}")'
            )
        return
    for n in autos:
        sections[n]["enabled"] = tr.precision == n
    if tr.precision != "fp32":
        ds[tr.precision] = {**sections.get(tr.precision, {}), "enabled": True}


def run_optimization(training, ds: dict) -> Optimization:
    """The schedule's numbers the run uses: the recipe's (scaled to the global batch), with the peak LR
    the resolved DeepSpeed config's optimizer holds (the recipe's, or a concrete value that won)."""
    values = effective_optimization(training, ds.get("train_batch_size"))
    opt = ds.get("optimizer")
    lr = opt.get("params", {}).get("lr") if isinstance(opt, dict) else None
    if _number(lr) and lr != values.lr:
        return replace(values, lr=float(lr))
    return values


def settled_recipe(recipe: Recipe, ds: dict) -> Recipe:
    """The recipe with the values the run trains with where the resolved DeepSpeed config's won over a
    recipe default (weight decay, betas, eps, clipping, precision, batch sizes, an unscaled lr), so
    the parameter groups, the log and resolved-config.json hold what is used. The input is not changed."""
    tr = recipe.training
    update: dict[str, Any] = {}
    opt = ds.get("optimizer")
    params = opt.get("params", {}) if isinstance(opt, dict) else {}
    for key in ("weight_decay", "eps"):
        if _number(params.get(key)) and not _same(params[key], getattr(tr, key)):
            update[key] = float(params[key])
    betas = params.get("betas")
    if isinstance(betas, list) and len(betas) == 2 and all(map(_number, betas)) and not _same(betas, tr.betas):
        update["betas"] = (float(betas[0]), float(betas[1]))
    if _number(params.get("lr")) and tr.lr_scaling == "none" and not _same(params["lr"], tr.lr):
        update["lr"] = float(params["lr"])
    if _number(ds.get("gradient_clipping")) and not _same(ds["gradient_clipping"], tr.grad_clip):
        update["grad_clip"] = float(ds["gradient_clipping"])
    if precision(ds) != tr.precision:
        update["precision"] = precision(ds)
    for key, field in (
        ("train_micro_batch_size_per_gpu", "micro_batch_size"),
        ("gradient_accumulation_steps", "gradient_accumulation_steps"),
    ):
        if isinstance(ds.get(key), int) and ds[key] != getattr(tr, field):
            update[field] = ds[key]
    if not update:
        return recipe
    return recipe.model_copy(update={"training": tr.model_copy(update=update)})


def _legacy_forms(ds: dict, problems: list[str], notes: list[str]) -> None:
    """DeepSpeed's deprecated spellings that DeepSpeed itself still accepts, rewritten to the current
    ones (so every later reader sees one form); shapes DeepSpeed would crash on are refused."""
    zero = ds.get("zero_optimization")
    if isinstance(zero, bool):
        # DeepSpeed's read_zero_config_deprecated: true is stage 1 with allgather_size as its bucket
        ds["zero_optimization"] = (
            {"stage": 1, "allgather_bucket_size": ds.pop("allgather_size", 500_000_000)} if zero else {"stage": 0}
        )
        notes.append(
            f"zero_optimization: {str(zero).lower()} is DeepSpeed's deprecated form; read as "
            f'{{"stage": {ds["zero_optimization"]["stage"]}}}'
        )
    elif zero is not None and not isinstance(zero, dict):
        problems.append(f'zero_optimization: must be an object such as {{"stage": 2}} (got {zero!r})')
    if "bfloat16" in ds and "bf16" not in ds:
        ds["bf16"] = ds.pop("bfloat16")
        notes.append("bfloat16: DeepSpeed's old name for the bf16 section; read as bf16")
    for name in ("fp16", "bf16"):
        if name in ds and not isinstance(ds[name], dict):
            problems.append(f'{name}: must be an object such as {{"enabled": true}} (got {ds[name]!r})')
            ds.pop(name)


def _batch_sizes(ds: dict, recipe: Recipe, world_size: int, problems: list[str], notes: list[str]) -> None:
    """Make the three batch keys concrete and consistent: train = micro x accumulation x world."""
    tr = recipe.training
    keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    given = {k: ds.get(k) for k in keys if k in ds and ds[k] != AUTO}
    for k, v in given.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            problems.append(f'{k}: must be a positive integer or "auto" (got {v!r})')
    if len(given) != sum(isinstance(v, int) and v > 0 for v in given.values()):
        return
    micro = given.get(keys[0])
    gas = given.get(keys[1])
    tbs = given.get(keys[2])
    if micro is None and gas is None and tbs is not None:
        micro = tr.micro_batch_size
    if micro is None:
        micro = tr.micro_batch_size if tbs is None or gas is None else tbs // (gas * world_size)
    if gas is None and tbs is not None and tbs % (micro * world_size):
        problems.append(
            f"train_batch_size {tbs} is not a multiple of train_micro_batch_size_per_gpu {micro} x "
            f"data-parallel size {world_size}, so no gradient_accumulation_steps makes it add up"
        )
        ds.update({k: None for k in keys if ds.get(k) == AUTO})  # reported here, not again as an unfilled "auto"
        return
    if gas is None:
        gas = tr.gradient_accumulation_steps if tbs is None else tbs // (micro * world_size)
    expected = micro * gas * world_size
    if tbs is not None and tbs != expected:
        problems.append(
            f"train_batch_size {tbs} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
            f"{gas} x data-parallel size {world_size} (= {expected})"
        )
        ds.update({k: None for k in keys if ds.get(k) == AUTO})
        return
    for k, field, v in ((keys[0], "micro_batch_size", micro), (keys[1], "gradient_accumulation_steps", gas)):
        if k in given:
            _agree(k, v, field, getattr(tr, field), tr.model_fields_set, problems, notes)
        elif keys[2] in given and v != getattr(tr, field):  # derived from the DeepSpeed config's global batch
            _agree(
                f"train_batch_size {tbs} (so {k})", v, field, getattr(tr, field), tr.model_fields_set, problems, notes
            )
    ds[keys[0]], ds[keys[1]], ds[keys[2]] = micro, gas, expected


def _fill_scheduler(sched: dict, tr: Optimization, notes: list[str]) -> list[str]:
    kind = sched.get("type")
    params = sched.setdefault("params", {})
    if kind in TOOLKIT_TYPES:
        fills = {
            "warmup_num_steps": tr.warmup_steps,
            "total_num_steps": tr.max_steps,
            "base_lr": tr.min_lr,
            "max_lr": tr.lr,
            "eta_min": tr.min_lr,
            "min_lr": tr.min_lr,
        }
        for k, v in fills.items():
            _set_auto(params, k, v)
        return check_params(kind, params)
    if kind not in DEEPSPEED_TYPES:
        return [
            f"scheduler.type: unknown {kind!r} (DeepSpeed: {', '.join(DEEPSPEED_TYPES)}; "
            f"toolkit: {', '.join(TOOLKIT_TYPES)})"
        ]
    fills = {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": tr.lr,
        "warmup_num_steps": max(1, tr.warmup_steps),
        "total_num_steps": tr.max_steps,
        "warmup_min_ratio": 0.0,
        "cos_min_ratio": tr.min_lr / tr.lr,
        "cycle_min_lr": tr.min_lr,
        "cycle_max_lr": tr.lr,
        "lr_range_test_min_lr": tr.min_lr,
    }
    for k, v in fills.items():
        _set_auto(params, k, v)
    if kind in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR"):
        w = params.get("warmup_num_steps", 1000)
        notes.append(
            f"scheduler: DeepSpeed's {kind} trains the first two optimizer steps at no more than its warmup "
            f"minimum (0 by default) and warms up over max(2, warmup_num_steps) = "
            f"{max(2, w) if isinstance(w, int) else w} steps "
            f"(training.warmup_steps is {tr.warmup_steps}); without a scheduler section the toolkit's "
            "warmup + cosine trains step 1 at lr/warmup_steps, or at lr with no warmup"
        )
    return []


def _grad_accum_dtype(ds: dict, notes: list[str]) -> None:
    """Unset, DeepSpeed accumulates gradients in the model's dtype, and a bf16 sum (8 significant bits)
    rounds away what each micro-batch adds below its last bit (benchmarks/bench_grad_accum.py measures
    it). So bf16 configs under ZeRO-2/3 get fp32 accumulation; an explicit value is kept."""
    if not (isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") is True):
        return
    data_types = ds.get("data_types")
    if isinstance(data_types, dict) and data_types.get("grad_accum_dtype") not in (None, AUTO):
        return
    zero = ds.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage in (0, 1):
        if isinstance(data_types, dict) and data_types.get("grad_accum_dtype") == AUTO:
            data_types["grad_accum_dtype"] = "bf16"
        why = (
            "DeepSpeed 0.19 refuses fp32 accumulation without ZeRO"
            if stage == 0
            else "with it DeepSpeed 0.19 switches ZeRO-1 to its BF16_Optimizer, whose checkpoints its zero_to_fp32 "
            "(what pretrain-eval and pretrain-export read) refuses as 'not a zero checkpoint'"
        )
        if ds.get("gradient_accumulation_steps", 1) != 1:
            notes.append(
                f"data_types.grad_accum_dtype: left bf16 under ZeRO-{stage}: gradients are accumulated "
                f"over micro-batches in bf16 ({why}); ZeRO-2 or 3 accumulates in fp32"
            )
        return
    ds["data_types"] = {**(data_types if isinstance(data_types, dict) else {}), "grad_accum_dtype": "fp32"}
    notes.append(
        "data_types.grad_accum_dtype: fp32 (bf16 gradients are accumulated over micro-batches in fp32; "
        'set it to "bf16" in the DeepSpeed config to accumulate in bf16)'
    )


def toolkit_scheduler(ds: dict) -> dict | None:
    """The scheduler section if the toolkit (not DeepSpeed) implements its type."""
    sched = ds.get("scheduler")
    return sched if isinstance(sched, dict) and sched.get("type") in TOOLKIT_TYPES else None


def for_deepspeed(ds: dict) -> dict:
    """The config handed to deepspeed.initialize: without a scheduler section DeepSpeed cannot build."""
    if toolkit_scheduler(ds) is None:
        return ds
    return {k: v for k, v in ds.items() if k != "scheduler"}


def resolve_ds_config(
    raw: dict, recipe: Recipe, world_size: int, hidden_size: int, source: str = "<deepspeed config>"
) -> tuple[dict, list[str]]:
    """Return (the config DeepSpeed is given, notes for the log). Raises RecipeError listing every problem.

    The recipe is not modified: values derived from it (an LR scaled to the global batch) go
    into the DeepSpeed config's "auto" fields and `effective_optimization`, never back into it;
    `settled_recipe` and `run_optimization` give what the run uses where a DeepSpeed value won."""
    ds = copy.deepcopy(raw)
    tr = recipe.training
    problems: list[str] = []
    notes: list[str] = []
    _legacy_forms(ds, problems, notes)
    _batch_sizes(ds, recipe, world_size, problems, notes)
    opt_values = effective_optimization(tr, ds.get("train_batch_size"))
    if opt_values.note:
        notes.append(opt_values.note)
    _shared_settings(ds, tr, opt_values, problems, notes)
    _set_auto(ds, "gradient_clipping", tr.grad_clip)

    opt = ds.get("optimizer")
    if isinstance(opt, dict):
        params = opt.setdefault("params", {})
        for k, v in (
            ("lr", opt_values.lr),
            ("betas", list(tr.betas)),
            ("eps", tr.eps),
            ("weight_decay", tr.weight_decay),
        ):
            _set_auto(params, k, v)

    sched = ds.get("scheduler")
    if isinstance(sched, dict):
        problems += _fill_scheduler(sched, opt_values, notes)

    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        # The Hugging Face integration's rules: buckets scale with hidden_size^2.
        _set_auto(zero, "reduce_bucket_size", hidden_size * hidden_size)
        _set_auto(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        _set_auto(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
        stage = zero.get("stage", 0)
        if stage not in (0, 1, 2, 3):
            problems.append(f"zero_optimization.stage: must be 0, 1, 2 or 3 (got {stage!r})")

    _grad_accum_dtype(ds, notes)

    for path in _find_autos(ds):
        problems.append(f'{path}: "auto" has no value to fill it from')
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        problems.append("fp16.enabled and bf16.enabled are both true")
    if problems:
        raise RecipeError(source, problems)
    return ds, notes


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def precision(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"
