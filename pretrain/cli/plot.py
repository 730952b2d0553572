"""pretrain-plot: PNG plots of a run, or of a learning-rate schedule before anyone trains with it.

pretrain-plot RUN_DIR                   -> RUN_DIR/plots/{loss,lr,throughput}.png (+ zero_shot.png for CLIP)
pretrain-plot --schedule ds_configs/X.json --steps N    -> schedule.png (or --output)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pretrain.runtime.metrics import read_metrics  # noqa: E402


def smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def _loss_panel(ax, train: list[dict], evals: list[dict], x: str, label: str) -> None:
    xs = [m[x] for m in train]
    losses = [m["loss"] for m in train]
    ax.plot(xs, losses, color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(xs, smooth(losses), color="tab:blue", lw=1.5, label="train (smoothed)")
    if evals:
        ex = [e["step"] if x == "step" else e.get("tokens_seen", 0) for e in evals]
        val = [e["loss"] for e in evals]
        tr = [e.get("train_loss") for e in evals]
        ax.plot(ex, val, "o-", color="tab:orange", lw=1.5, label="val")
        if all(t is not None for t in tr):
            ax.plot(ex, tr, "s--", color="tab:green", lw=1, ms=4, label="train over the same window")
            ax.fill_between(ex, tr, val, color="tab:red", alpha=0.15, label="gap (val - train)")
    ax.set_xlabel(label)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _event_marks(ax, events: list[dict]) -> None:
    """What a weeks-long run went through, on the loss-by-step panel: each loss spike (x at the
    loudest rank's loss), the steps whose data was skipped (shaded), the steps at a lowered LR."""
    labelled: set[str] = set()

    def label(name: str) -> str | None:  # one legend entry per kind
        if name in labelled:
            return None
        labelled.add(name)
        return name

    for e in events:
        kind = e.get("event")
        if kind in ("loss_spike", "rewind") and e.get("loss_max") is not None:
            at = e.get("spike_step", e["step"])
            ax.plot([at], [e["loss_max"]], "x", color="tab:red", ms=9, mew=2, label=label("loss spike"))
            if kind == "rewind":
                ax.annotate(f"rewind to {e['step']}", (at, e["loss_max"]), fontsize=7, color="tab:red")
        elif kind == "skipped_data":
            first, last = e["steps"]
            ax.axvspan(first - 0.5, last + 0.5, color="tab:red", alpha=0.12, label=label("data skipped"))
        elif kind == "lr_lowered":
            first, last = e["steps"]
            ax.axvspan(first - 0.5, last + 0.5, color="tab:green", alpha=0.10, label=label("LR lowered"))
    if labelled:
        ax.legend(fontsize=8)


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [m for m in records if "split" not in m and "event" not in m and m.get("loss") is not None]
    evals = [m for m in records if m.get("split") == "val" and m.get("loss") is not None]
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no train lines")
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _loss_panel(axes[0], train, evals, "step", "step")
    _event_marks(
        axes[0], [m for m in records if m.get("event") in ("loss_spike", "rewind", "skipped_data", "lr_lowered")]
    )
    _loss_panel(axes[1], train, evals, "tokens", "tokens seen")
    last = evals[-1] if evals else None
    title = f"{run_dir.name}: loss" + (
        f" (last val {last['loss']:.3f}, gap {last.get('gap', float('nan')):+.3f})" if last else ""
    )
    fig.suptitle(title)
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in train], [m["lr"] for m in train], color="tab:purple")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{run_dir.name}: learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "lr.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    tput = [m.get("throughput") or 0.0 for m in train]
    ax.plot([m["step"] for m in train], tput, color="tab:gray", alpha=0.4, lw=0.8)
    ax.plot([m["step"] for m in train], smooth(tput), color="tab:gray", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{train[-1].get('throughput_unit', 'tokens/s')} (all ranks)")
    ax.set_title(f"{run_dir.name}: throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "throughput.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    zs = [m for m in evals if "zero_shot_top1" in m]
    if zs:  # CLIP: zero-shot and retrieval against chance
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [m["step"] for m in zs]
        for key, style in (
            ("zero_shot_top1", "o-"),
            ("zero_shot_top5", "s-"),
            ("zero_shot_top1_held_out", "^--"),
            ("image_to_text_R@1", "x:"),
            ("text_to_image_R@1", "+:"),
        ):
            if all(key in m for m in zs):
                ax.plot(steps, [m[key] for m in zs], style, label=key)
        ax.axhline(zs[-1]["chance_top1"], color="gray", lw=1, ls="--", label="chance (top-1)")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy / recall")
        ax.set_ylim(0, 1)
        ax.set_title(f"{run_dir.name}: zero-shot over {zs[-1]['num_classes']} classes, retrieval")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "zero_shot.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def plot_schedule(
    ds_path: str, steps: int, output: str | Path, recipe_name: str | None = None, world_size: int = 1
) -> Path:
    from pretrain.run.config import Recipe, load_json, load_recipe
    from pretrain.run.ds_config import resolve_ds_config, run_optimization
    from pretrain.run.schedules import lrs_for_config

    recipe = load_recipe(recipe_name)[0] if recipe_name else Recipe()
    recipe.training.max_steps = steps
    ds, _ = resolve_ds_config(
        load_json(ds_path, "DeepSpeed config"), recipe, world_size, recipe.model.hidden_size, ds_path
    )
    tr = run_optimization(recipe.training, ds)  # a concrete optimizer lr that won is the peak
    lrs = lrs_for_config(ds, tr.lr, tr.min_lr, tr.warmup_steps, tr.max_steps, steps)
    kind = (ds.get("scheduler") or {}).get("type", "warmup + cosine (no scheduler section)")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, steps + 1), lrs, color="tab:purple")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{Path(ds_path).name}: {kind}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain-plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", nargs="?", help="run directory holding metrics.jsonl; plots go to RUN_DIR/plots/")
    p.add_argument(
        "--schedule", metavar="DS_CONFIG", help="draw the LR schedule of this DeepSpeed JSON instead of a run"
    )
    p.add_argument(
        "--steps", type=int, default=1000, help='with --schedule: steps to draw (fills total_num_steps "auto")'
    )
    p.add_argument(
        "--recipe",
        help='with --schedule: recipe whose training section fills the "auto" values (default: built-in defaults)',
    )
    p.add_argument(
        "--world-size", type=int, default=1, help="with --schedule: ranks, for batch arithmetic and LR scaling"
    )
    p.add_argument("--output", default="schedule.png", help="with --schedule: PNG to write (default schedule.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pretrain.run.config import RecipeError

    try:
        if args.schedule:
            print(plot_schedule(args.schedule, args.steps, args.output, args.recipe, args.world_size))
        elif args.run_dir:
            for path in plot_run(args.run_dir):
                print(path)
        else:
            build_parser().error("give RUN_DIR or --schedule DS_CONFIG")
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
