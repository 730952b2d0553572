"""Running a sweep: one ordinary run directory per point, trained by the real trainer
(pretrain/train.py) in a child process, then read back into sweep.jsonl.

Layout of OUTPUT:
    points/NAME/recipe.json     the point's recipe (the sweep's recipe with the point's settings)
    points/NAME/...             the run directory itself: metrics.jsonl, checkpoints/, model/, ...
    points/NAME/sweep-status.json   written by the sweep when a point's trainer failed (exit code, log tail)
    logs/NAME.log               the trainer's stdout and stderr
    sweep.jsonl                 one line per point, rewritten after each point
    plots/*.png

A point is finished when its metrics.jsonl holds the last step's train and eval records: that is read
from the run itself, so points trained elsewhere (``--print-commands`` on a cluster) count too. An
unfinished point is started with ``--resume auto`` and continues from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.runtime.flops import total_flops
from pretrain.sweep.grid import Point, SizeRule, point_overrides

REPO = Path(__file__).resolve().parent.parent.parent
TRAIN = REPO / "pretrain" / "train.py"
CURVE_POINTS = 40  # train-loss samples kept per point in sweep.jsonl: enough for the loss-vs-compute plot


class SweepError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the sweep cannot start:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class PlannedPoint:
    point: Point
    recipe: dict[str, Any]  # the recipe JSON written for the point
    run_dir: Path
    params: int | None  # from the planner's count; None for a family it cannot count
    planned_tokens: int | None

    @property
    def steps(self) -> int:
        return self.recipe["training"]["max_steps"]


def _set(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _data_manifest(data: str) -> dict[str, Any]:
    path = Path(data, "manifest.json")
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def plan_points(
    config: str,
    data: str,
    points: list[Point],
    output: Path,
    *,
    steps: int,
    rule: SizeRule,
    ranks: int = 1,
    max_micro: int | None = None,
    warmup_fraction: float | None = 0.1,
    lr_width_ref: int | None = None,
    extra: dict[str, Any] | None = None,
) -> list[PlannedPoint]:
    """Every point's recipe, validated by the recipe schema before any run starts; SweepError lists
    every problem, each naming its point."""
    from pretrain.run.config import RecipeError, find_recipe, load_json, load_recipe
    from pretrain.run.planner import FAMILY_SHAPES
    from pretrain.train import _resolve_path

    problems: list[str] = []
    try:
        base_path = find_recipe(config)
        base = load_json(base_path, "recipe")
    except RecipeError as e:
        raise SweepError([str(e)]) from None
    local = "://" not in data and not data.startswith("pipe:")
    if local and not Path(data).exists():
        problems.append(f"--data {data}: no such directory")
    manifest = _data_manifest(data) if local else {}
    vocab = (manifest.get("tokenizer") or {}).get("vocab_size")
    named: dict[str, dict] = {}
    for p in points:
        size = p.settings.get("size")
        if isinstance(size, str) and size not in named:
            try:
                named[size] = load_json(find_recipe(size), "recipe")["model"]
            except (RecipeError, KeyError) as e:
                problems.append(f"size={size}: not a width, and not a recipe with a model section ({e})")
    if problems:
        raise SweepError(problems)
    planned = []
    for p in points:
        # the point's own settings go last: a grid key wins over a sweep-wide default
        overrides = dict(extra or {})
        overrides |= point_overrides(
            p.settings,
            base.get("training", {}),
            steps=steps,
            rule=rule,
            named_models=named,
            ranks=ranks,
            max_micro=max_micro,
            warmup_fraction=warmup_fraction,
            lr_width_ref=lr_width_ref,
        )
        run_dir = output / "points" / p.name
        recipe = json.loads(json.dumps(base))
        for key, value in overrides.items():
            _set(recipe, key, value)
        recipe["name"] = f"{base.get('name', 'sweep')}-{p.name}"
        recipe["output_dir"] = str(run_dir)
        if recipe.get("deepspeed_config"):  # the point's recipe lives elsewhere: keep its config findable
            recipe["deepspeed_config"] = str(_resolve_path(recipe["deepspeed_config"]).resolve())
        try:
            parsed, _ = load_recipe(str(base_path), {**overrides, "output_dir": str(run_dir)})
        except RecipeError as e:
            problems += [f"point {p.name}: {q}" for q in e.problems]
            continue
        params = None
        shape_of = FAMILY_SHAPES.get(parsed.family)
        if shape_of is not None and (vocab or parsed.model.vocab_size) and parsed.family == "gpt":
            params = shape_of(parsed, vocab or parsed.model.vocab_size).params
        seq_len = manifest.get("seq_len")
        t = parsed.training
        tokens = t.max_steps * t.micro_batch_size * t.gradient_accumulation_steps * ranks * seq_len if seq_len else None
        planned.append(PlannedPoint(p, recipe, run_dir, params, tokens))
        old = run_dir / "recipe.json"
        if old.is_file():
            before = json.loads(old.read_text())
            changed = sorted(k for k in set(before) | set(recipe) if before.get(k) != recipe.get(k))
            if changed:
                problems.append(
                    f"point {p.name}: {run_dir} was started with a different recipe ({', '.join(changed)} differ); "
                    "give the sweep another --output, or remove that point's directory"
                )
    if problems:
        raise SweepError(problems)
    return planned


def write_recipes(planned: list[PlannedPoint]) -> None:
    for pp in planned:
        pp.run_dir.mkdir(parents=True, exist_ok=True)
        path = pp.run_dir / "recipe.json"
        if not path.is_file():
            path.write_text(json.dumps(pp.recipe, indent=2) + "\n")


def command(pp: PlannedPoint, data: str, launcher: list[str] | None = None, trainer_args: list[str] = ()) -> list[str]:
    """The launcher command of one point; without a launcher, this Python runs the trainer as one process."""
    prefix = [*launcher, str(TRAIN)] if launcher else [sys.executable, str(TRAIN)]
    return [
        *prefix,
        "--config",
        str(pp.run_dir / "recipe.json"),
        "--data",
        data,
        "--output-dir",
        str(pp.run_dir),
        "--resume",
        "auto",
        "--no-progress",
        *trainer_args,
    ]


# ---------------------------------------------------------------------------------------------
# Reading a run back


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl; a torn last line (kill -9) is skipped."""
    path = run_dir / "metrics.jsonl"
    train, evals = [], []
    if not path.is_file():
        return train, evals
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "split" in m:
            evals.append(m)
        elif "event" not in m:
            train.append(m)
    return train, evals


def is_finished(run_dir: Path, steps: int) -> bool:
    train, evals = read_metrics(run_dir)
    return bool(train and train[-1].get("step") == steps and evals and evals[-1].get("step") == steps)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def collect(pp: PlannedPoint) -> dict[str, Any]:
    """The sweep.jsonl line of a point, from its run directory."""
    steps = pp.steps
    s = pp.point.settings
    row: dict[str, Any] = {
        "name": pp.point.name,
        "dir": str(pp.run_dir),
        "settings": s,
        "lr": pp.recipe.get("training", {}).get("lr"),
        "batch": s.get("batch"),
        "size": s.get("size"),
        "steps": steps,
    }
    train, evals = read_metrics(pp.run_dir)
    status_file = pp.run_dir / "sweep-status.json"
    failure = json.loads(status_file.read_text()) if status_file.is_file() else None
    finished = is_finished(pp.run_dir, steps)
    row["status"] = "done" if finished else ("failed" if failure else "pending")
    params = pp.params
    resolved = pp.run_dir / "resolved-config.json"
    if resolved.is_file():  # the model as built wins over the planner's count (they agree for gpt)
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            params = json.loads(resolved.read_text())["parameters"]["total"]
    tokens = train[-1]["tokens"] if finished else pp.planned_tokens
    row.update(params=params, tokens=tokens, flops=total_flops(params, tokens) if params and tokens else None)
    first = next((m["loss"] for m in train if _finite(m.get("loss"))), None)
    last_train = train[-1].get("loss") if train else None
    val = evals[-1].get("loss") if evals and evals[-1].get("step") == steps else None
    # the eval's train_loss averages every step since the last eval: less noisy than the last step's
    mean_train = evals[-1].get("train_loss") if evals and evals[-1].get("step") == steps else None
    row["val_loss"] = val if _finite(val) else None
    row["train_loss"] = mean_train if _finite(mean_train) else (last_train if _finite(last_train) else None)
    row["initial_loss"] = first
    row["loss"] = row["val_loss"] if row["val_loss"] is not None else (row["train_loss"] if finished else None)
    skips = train[-1].get("nonfinite_skips", 0) if train else 0
    failed_nonfinite = bool(failure and "non-finite" in failure.get("log_tail", ""))
    # diverged: the loss ended non-finite or above where it started (the run made the model worse)
    row["diverged"] = bool(
        failed_nonfinite
        or (
            finished
            and (
                row["loss"] is None
                or (first is not None and row["train_loss"] is not None and row["train_loss"] > first)
            )
        )
        or skips
    )
    if failure and not finished:
        row.update(returncode=failure.get("returncode"), error=failure.get("error"))
    if finished and train:
        row["wall_s"] = train[-1].get("elapsed_s")
    # window means, not every k-th step: one step's loss is too noisy to read a curve from
    finite = [m for m in train if _finite(m.get("loss"))]
    width = max(1, len(finite) // CURVE_POINTS)
    row["curve"] = [
        [
            finite[min(i + width, len(finite)) - 1]["tokens"],
            sum(m["loss"] for m in finite[i : i + width]) / len(finite[i : i + width]),
        ]
        for i in range(0, len(finite), width)
    ]
    return row


# ---------------------------------------------------------------------------------------------
# Running


def _die_with_parent() -> None:
    """In the trainer child: be killed when the sweep dies (kill -9 included), so no orphan keeps
    writing into a run directory that the next sweep resumes."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def sweep_lock(output: Path):
    """One sweep at a time per output directory; the lock goes with the process (kill -9 included)."""
    import fcntl

    output.mkdir(parents=True, exist_ok=True)
    fh = (output / ".sweep.lock").open("w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise SweepError([f"{output}: another pretrain-sweep is running on this output"]) from None
    try:
        yield
    finally:
        fh.close()


def run_point(pp: PlannedPoint, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Train one point to its end (or failure); a failure is written to the point's sweep-status.json."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    status = pp.run_dir / "sweep-status.json"
    status.unlink(missing_ok=True)
    started = time.time()
    with log_path.open("a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=REPO,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            rc = proc.wait()
        except BaseException:  # Ctrl-C: stop the child too, so the next sweep resumes a clean run
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        error = next((line for line in reversed(tail) if line.startswith("error")), tail[-1] if tail else "")
        status.write_text(
            json.dumps(
                {"returncode": rc, "error": error, "log_tail": "\n".join(tail), "seconds": time.time() - started},
                indent=2,
            )
        )
    return rc


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    from pretrain.runtime.metrics import dumps

    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)  # a reader (or a kill) never sees half a file


def run_sweep(
    planned: list[PlannedPoint],
    data: str,
    output: Path,
    *,
    launcher: list[str] | None = None,
    trainer_args: list[str] = (),
    progress: bool = True,
    env: dict[str, str] | None = None,
    echo=print,
) -> list[dict[str, Any]]:
    """Every unfinished point in order; finished ones are skipped, a failed one is recorded and the
    sweep goes on. Returns the sweep.jsonl rows."""
    from tqdm import tqdm

    rows = [collect(pp) for pp in planned]
    write_jsonl(rows, output / "sweep.jsonl")
    todo = [i for i, pp in enumerate(planned) if not is_finished(pp.run_dir, pp.steps)]
    if len(todo) < len(planned):
        echo(f"{len(planned) - len(todo)} of {len(planned)} points already finished: skipped")
    bar = tqdm(total=len(planned), initial=len(planned) - len(todo), unit="point", disable=not progress or None)
    for i in todo:
        pp = planned[i]
        bar.set_description(pp.point.name)
        rc = run_point(pp, command(pp, data, launcher, trainer_args), output / "logs" / f"{pp.point.name}.log", env)
        rows[i] = collect(pp)
        if rc != 0:
            tqdm.write(f"point {pp.point.name} failed (exit {rc}): {rows[i].get('error', '')}; see logs/")
        write_jsonl(rows, output / "sweep.jsonl")
        bar.update(1)
    bar.close()
    return rows
