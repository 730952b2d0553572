"""pretrain-sweep: a grid of short trainings from one recipe, and the scaling laws fitted to them.

    pretrain-sweep --config gpt-tiny --data DIR --grid lr=1e-4,3e-4,1e-3 --grid batch=16,64 \\
        --grid size=64,128,256 --steps 200 --output runs/sweep
    pretrain-sweep ... --print-commands          one launcher command per point per line (a SLURM array)
    pretrain-sweep fit runs/sweep/sweep.jsonl [--json]
    pretrain-sweep fit points.csv                columns params, tokens, loss (optional flops, lr, batch)

Each point is an ordinary run directory (OUTPUT/points/NAME) trained by pretrain/train.py, so its
checkpoints, resume and metrics are the trainer's own. Rerunning the same command skips finished
points and resumes an interrupted one (--resume auto); a point whose trainer fails is recorded in
sweep.jsonl and the sweep goes on (exit 1 at the end). Compute per point is the planner's
total_flops(N, D) (pretrain.runtime.flops), N the model's parameters and D the tokens trained.

Fits (pretrain.sweep.fit): (a) L(C) = L_inf + a·C^-alpha over the compute envelope; (b) Chinchilla
approach 3, L(N, D) = E + A/N^alpha + B/D^beta (Huber on log L, L-BFGS from a grid of starts,
bootstrap intervals), on the best-LR run of each (N, D); (c) the optimal LR as k·B^gamma.
`pretrain-plan --budget FLOPS --fit sweep.jsonl` turns (b) into a compute-optimal model and run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path

PROG = "pretrain-sweep"


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the recipe every point starts from: a JSON path or shipped name")
    p.add_argument("--data", required=True, help="the data every point trains on (as pretrain-train --data)")
    p.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2,...",
        help="one axis of the grid; repeat for more (the product is run, the first axis outermost). Keys: "
        "lr (peak LR; min_lr keeps the recipe's min_lr/lr ratio), batch (global batch in sequences), size (a "
        "width, shaped by the size rule, or a recipe name whose model section is used), steps, seed, or any "
        "recipe key such as training.weight_decay",
    )
    p.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps per point (default 200)")
    p.add_argument("--output", required=True, help="the sweep's directory: points/, logs/, sweep.jsonl, plots/")
    r = p.add_argument_group("the size rule (for size=WIDTH)")
    r.add_argument("--head-dim", type=_positive_int, default=32, help="heads = width / head-dim (default 32)")
    r.add_argument(
        "--width-per-layer",
        type=_positive_int,
        default=32,
        help="layers = max(--min-layers, round(width / this)) (default 32: gpt-tiny's shape at width 128)",
    )
    r.add_argument("--min-layers", type=_positive_int, default=2, help="fewest layers (default 2)")
    t = p.add_argument_group("training of each point")
    t.add_argument(
        "--warmup-fraction",
        type=_fraction,
        default=0.1,
        help="warmup_steps = this x the point's steps, so short and long points warm up alike (default 0.1)",
    )
    t.add_argument(
        "--lr-width-ref",
        type=_positive_int,
        metavar="W",
        help="the grid's LRs are those of width W; a point of width w trains at lr x W / w (Adam's best LR falls "
        "about as 1/width, the muP rule), so one grid stays centred on every size's optimum; sweep.jsonl and the "
        "plots give the LR trained (default: every size trains at the grid's LR)",
    )
    t.add_argument(
        "--eval-samples",
        type=_positive_int,
        help="val samples of the final evaluation (eval.max_samples; default: the recipe's)",
    )
    t.add_argument(
        "--checkpoint-every",
        type=int,
        help="checkpoint every N steps, so an interrupted point resumes from there (default: the recipe's; "
        "0 = only at the end)",
    )
    t.add_argument(
        "--ranks",
        type=_positive_int,
        default=1,
        help="data-parallel ranks of each point (with --launcher); the batch is split micro x accumulation x "
        "ranks (default 1)",
    )
    t.add_argument("--max-micro-batch", type=_positive_int, help="largest micro-batch; the rest is accumulation")
    t.add_argument(
        "--launcher",
        help='command that starts the trainer, e.g. "deepspeed --num_gpus 8" or "torchrun --nproc_per_node 8" '
        "(default: this Python, one process)",
    )
    t.add_argument(
        "--trainer-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed to every pretrain-train as is (repeat; e.g. --trainer-arg=--allow-pipe)",
    )
    o = p.add_argument_group("what to do")
    o.add_argument(
        "--print-commands",
        action="store_true",
        help="write each point's recipe, print one launcher command per point per line (all points, in grid "
        "order, for a SLURM array: a finished point's command exits at once) and train nothing; rerun "
        "with --collect-only afterwards for sweep.jsonl, the fits and the plots",
    )
    o.add_argument("--collect-only", action="store_true", help="train nothing: read the points' runs, fit, plot")
    o.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples of the fits (default 100)")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_fit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} fit",
        description="Fit the scaling laws to a sweep.jsonl, or to a points file from elsewhere (JSONL or CSV with "
        "columns params, tokens, loss and optionally flops, lr, batch). " + (__doc__ or "").split("Fits ")[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("points", help="sweep.jsonl, or a .jsonl / .csv points file")
    p.add_argument("--json", action="store_true", help="print the fits as JSON")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the intervals (default 100)")
    p.add_argument("--plots", metavar="DIR", help="also write lr.png, compute.png, laws.png there")
    return p


def _fit_and_plot(rows, bootstrap: int, plots: Path | None, echo=print) -> dict | None:
    from pretrain.sweep.fit import fit_all
    from pretrain.sweep.plots import format_report, write_plots

    try:
        report = fit_all(rows, n_bootstrap=bootstrap)
    except ValueError as e:
        echo(f"{PROG}: no fit: {e}")
        return None
    echo(format_report(report))
    if plots:
        for path in write_plots(rows, report, plots):
            echo(f"plot: {path}")
    return report


def fit_main(argv: list[str]) -> int:
    from pretrain.runtime.metrics import dumps
    from pretrain.sweep.fit import fit_all, load_points
    from pretrain.sweep.plots import format_report, write_plots

    args = build_fit_parser().parse_args(argv)
    try:
        rows = load_points(args.points)
        report = fit_all(rows, n_bootstrap=args.bootstrap)
    except (OSError, ValueError) as e:
        print(f"{PROG} fit: error: {e}", file=sys.stderr)
        return 2
    print(dumps(report, indent=2) if args.json else format_report(report))
    if args.plots:
        write_plots(rows, report, Path(args.plots))
    return 0


def run_main(argv: list[str]) -> int:
    from pretrain.runtime.metrics import dumps
    from pretrain.sweep.grid import GridError, SizeRule, expand, parse_grid
    from pretrain.sweep.plots import format_table
    from pretrain.sweep.runner import (
        SweepError,
        collect,
        command,
        plan_points,
        run_sweep,
        sweep_lock,
        write_jsonl,
        write_recipes,
    )

    args = build_parser().parse_args(argv)
    rule = SizeRule(args.head_dim, args.width_per_layer, args.min_layers)
    output = Path(args.output)
    extra = {"eval.every": 0}  # a sweep compares final losses: evaluations along the way are time not spent training
    if args.eval_samples:
        extra["eval.max_samples"] = args.eval_samples
    if args.checkpoint_every is not None:
        extra["checkpoint.every"] = args.checkpoint_every
    try:
        grid = parse_grid(args.grid, rule, args.ranks)
        # importing the models prints DeepSpeed's accelerator notice on stdout, where --print-commands
        # must print commands and nothing else
        with contextlib.redirect_stdout(sys.stderr):
            planned = plan_points(
                args.config,
                args.data,
                expand(grid),
                output,
                steps=args.steps,
                rule=rule,
                ranks=args.ranks,
                max_micro=args.max_micro_batch,
                warmup_fraction=args.warmup_fraction,
                lr_width_ref=args.lr_width_ref,
                extra=extra,
            )
        launcher = shlex.split(args.launcher) if args.launcher else None
        with sweep_lock(output):
            write_recipes(planned)
            (output / "sweep.json").write_text(
                json.dumps(
                    {
                        "config": args.config,
                        "data": args.data,
                        "grid": grid,
                        "steps": args.steps,
                        "size_rule": rule.describe(),
                        "points": [pp.point.name for pp in planned],
                    },
                    indent=2,
                )
            )
            if args.print_commands:
                for pp in planned:
                    print(shlex.join(command(pp, args.data, launcher, args.trainer_arg)))
                return 0
            if args.collect_only:
                rows = [collect(pp) for pp in planned]
                write_jsonl(rows, output / "sweep.jsonl")
            else:
                print(f"{PROG}: {len(planned)} points; size rule: {rule.describe()}", flush=True)
                rows = run_sweep(
                    planned,
                    args.data,
                    output,
                    launcher=launcher,
                    trainer_args=args.trainer_arg,
                    progress=not args.no_progress,
                )
    except (GridError, SweepError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    report = _fit_and_plot(rows, args.bootstrap, None if args.no_plots else output / "plots")
    if report is not None:
        (output / "fit.json").write_text(dumps(report, indent=2) + "\n")
    failed = [r["name"] for r in rows if r["status"] != "done"]
    if failed:
        print(f"{PROG}: {len(failed)} point(s) not finished: {', '.join(failed)} (see {output}/logs; rerun to resume)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fit"]:
        return fit_main(argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
