"""The grid of a sweep: parsing and checking ``--grid key=v1,v2`` flags, the size rule, and the
expansion into points. Pure: nothing here reads data or starts a run.

Keys:
  lr=1e-4,3e-4       peak learning rate (training.lr; min_lr keeps the recipe's min_lr/lr ratio)
  batch=16,64        global batch in sequences (micro-batch x accumulation x ranks)
  size=64,128,256    a width, whose heads and layers follow the size rule; or a shipped recipe
                     name / recipe path, whose model section is taken whole (size=gpt-tiny,gpt2-124m)
  steps=100,200      optimizer steps (otherwise --steps)
  seed=1,2           training.seed
  training.X=..., model.X=..., data.X=...   any other recipe key; the recipe's own schema checks it

The size rule (``SizeRule``): heads = width / head_dim, layers = max(min_layers, round(width /
width_per_layer)). The defaults (head_dim 32, width_per_layer 32, min_layers 2) give gpt-tiny's own
shape at width 128 (4 heads, 4 layers), so depth grows with width at a fixed aspect ratio, as in the
model families Kaplan et al. 2020 fitted (their losses depend weakly on the aspect ratio).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

SWEEP_KEYS = ("lr", "batch", "size", "steps", "seed")
RECIPE_SECTIONS = ("model", "training", "data", "eval", "checkpoint")


class GridError(ValueError):
    """A grid that cannot run; lists every problem, each naming its key and value."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("bad sweep grid:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class SizeRule:
    head_dim: int = 32
    width_per_layer: int = 32
    min_layers: int = 2

    def shape(self, width: int) -> dict[str, int]:
        """hidden_size, num_heads and num_layers of a width; ValueError when the heads do not divide it."""
        if width <= 0 or width % self.head_dim:
            raise ValueError(f"width {width} is not a positive multiple of the head dimension {self.head_dim}")
        layers = max(self.min_layers, round(width / self.width_per_layer))
        return {"hidden_size": width, "num_heads": width // self.head_dim, "num_layers": layers}

    def describe(self) -> str:
        return (
            f"heads = width / {self.head_dim}, layers = max({self.min_layers}, round(width / {self.width_per_layer}))"
        )


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its settings in the grid's key order."""

    settings: dict[str, Any] = field(hash=False)
    name: str = ""


def _number(text: str, kind: type) -> int | float:
    value = float(text) if kind is float else int(text)
    if kind is float and not math.isfinite(value):
        raise ValueError
    return value


def parse_grid_arg(text: str) -> tuple[str, list[str]]:
    """``key=v1,v2,...`` into (key, raw values); ValueError naming what is wrong."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--grid {text!r}: expected key=v1,v2,... (e.g. lr=1e-4,3e-4)")
    raw = [v.strip() for v in values.split(",")]
    if not values.strip() or any(not v for v in raw):
        raise ValueError(f"--grid {key}: empty value in {values!r}")
    return key, raw


def _typed(key: str, raw: str, problems: list[str]) -> Any:
    """One grid value in its type, or None after appending a problem that names the key and value."""
    if key == "lr":
        try:
            v = _number(raw, float)
        except ValueError:
            problems.append(f"lr={raw}: not a number")
            return None
        if v <= 0:
            problems.append(f"lr={raw}: must be > 0")
            return None
        return v
    if key in ("batch", "steps", "seed"):
        try:
            v = _number(raw, int)
        except ValueError:
            problems.append(f"{key}={raw}: not a whole number")
            return None
        if key != "seed" and v <= 0:
            problems.append(f"{key}={raw}: must be > 0")
            return None
        return v
    if key == "size":
        return int(raw) if raw.isdigit() else raw  # a recipe name is checked by the caller, which can load it
    try:  # a recipe key: JSON where it parses (0.1, true, null, [0.9, 0.95]), else the string itself
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_grid(args: list[str], rule: SizeRule | None = None, ranks: int = 1) -> dict[str, list[Any]]:
    """Every ``--grid`` flag checked and typed, in the order given; GridError lists all problems."""
    rule = rule or SizeRule()
    problems: list[str] = []
    grid: dict[str, list[Any]] = {}
    for text in args:
        try:
            key, raw = parse_grid_arg(text)
        except ValueError as e:
            problems.append(str(e))
            continue
        if key in grid:
            problems.append(f"{key}: given twice (put every value in one --grid {key}=...)")
            continue
        if key not in SWEEP_KEYS and key.split(".")[0] not in RECIPE_SECTIONS:
            problems.append(
                f"{key}: unknown key (known: {', '.join(SWEEP_KEYS)}, or a recipe key under "
                f"{', '.join(s + '.' for s in RECIPE_SECTIONS)})"
            )
            continue
        if key in ("training.lr", "training.max_steps", "training.micro_batch_size", "output_dir"):
            problems.append(f"{key}: use the sweep's own key ({'lr' if 'lr' in key else 'steps or batch'})")
            continue
        values = [_typed(key, r, problems) for r in raw]
        if len(set(map(json.dumps, values))) < len(values):
            problems.append(f"{key}: a value is repeated in {','.join(raw)}")
        if key == "size":
            for v in values:
                if isinstance(v, int):
                    try:
                        rule.shape(v)
                    except ValueError as e:
                        problems.append(f"size={v}: {e}")
        if key == "batch":
            problems += [f"batch={v}: not a multiple of the {ranks} ranks" for v in values if v and v % ranks]
        grid[key] = values
    if problems:
        raise GridError(problems)
    return grid


def expand(grid: dict[str, list[Any]]) -> list[Point]:
    """The cartesian product, the first key outermost; each point named by its settings."""
    keys = list(grid)
    return [
        Point(dict(zip(keys, combo)), point_name(dict(zip(keys, combo)))) for combo in itertools.product(*grid.values())
    ]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}".replace("+", "")
    text = value if isinstance(value, str) else json.dumps(value)
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text.rsplit("/", 1)[-1].removesuffix(".json"))


def point_name(settings: dict[str, Any]) -> str:
    """A directory name that is the same for the same settings on every rerun (what makes a sweep resumable)."""
    return "-".join(f"{key.rsplit('.', 1)[-1]}{_short(v)}" for key, v in settings.items())


def split_batch(batch: int, ranks: int, max_micro: int | None) -> tuple[int, int]:
    """(micro_batch_size, gradient_accumulation_steps) giving ``batch`` sequences per step on ``ranks``:
    the largest micro-batch up to ``max_micro`` that divides the per-rank share."""
    per_rank = batch // ranks
    micro = per_rank if not max_micro else max(d for d in range(1, min(per_rank, max_micro) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def point_overrides(
    settings: dict[str, Any],
    base: dict[str, Any],
    *,
    steps: int,
    rule: SizeRule,
    named_models: dict[str, dict] | None = None,
    ranks: int = 1,
    max_micro: int | None = None,
    warmup_fraction: float | None = 0.1,
    lr_width_ref: int | None = None,
) -> dict[str, Any]:
    """The dotted-key recipe overrides of one point. ``base`` is the recipe's training section (for
    the min_lr/lr ratio and the warmup); ``named_models`` maps a named size to its model section.
    With ``lr_width_ref`` W, a grid LR is the LR of width W and a point of width w trains at
    lr·W/w (see ``scaled_lr``)."""
    out: dict[str, Any] = {}
    run_steps = settings.get("steps", steps)
    out["training.max_steps"] = run_steps
    if warmup_fraction is not None:
        # a fixed warmup would be most of a short run and nothing of a long one
        out["training.warmup_steps"] = int(round(warmup_fraction * run_steps))
    if "size" in settings:
        size = settings["size"]
        model = rule.shape(size) if isinstance(size, int) else (named_models or {})[size]
        if isinstance(size, int):
            out.update({f"model.{k}": v for k, v in model.items()})
        else:
            out["model"] = model
    if "lr" in settings:
        width = out.get("model.hidden_size", (out.get("model") or {}).get("hidden_size"))
        lr = scaled_lr(settings["lr"], width, lr_width_ref)
        out["training.lr"] = lr
        out["training.min_lr"] = lr * base.get("min_lr", 0.0) / base.get("lr", lr)
        # the sweep measures the LR it names: a batch rule would move it
        out["training.lr_scaling"] = "none"
    if "batch" in settings:
        micro, gas = split_batch(settings["batch"], ranks, max_micro)
        out["training.micro_batch_size"] = micro
        out["training.gradient_accumulation_steps"] = gas
    if "seed" in settings:
        out["training.seed"] = settings["seed"]
    out.update({k: v for k, v in settings.items() if k not in SWEEP_KEYS})
    return out


def scaled_lr(lr: float, width: int | None, ref: int | None) -> float:
    """The LR a point trains at: ``lr`` itself, or with a reference width, lr·ref/width. Adam's best LR for
    the hidden matrices falls about as 1/width (the muP rule, Yang et al. 2022, Table 3), so one grid of
    multipliers stays centred on every size's optimum instead of sliding off the range's edge."""
    return lr if not ref or not width else lr * ref / width
