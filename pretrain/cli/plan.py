"""pretrain-plan: what a pretraining run costs before anyone starts it: FLOPs, GPU-days, and the
memory per GPU under each ZeRO stage; the command line over `pretrain.run.planner` (its docstring
gives the formulas).

    pretrain-plan --recipe gpt2-124m --tokens 10B --gpu a100 --num-gpus 8
    pretrain-plan --params 7b --tokens 2T --gpu h100 --num-gpus 512 --json
    pretrain-plan --params 150M --flops-per-sample 4.4e9 --samples 400M --gpu a100   (non-text models)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

# The FLOPs math and the accelerator table are shared with the trainer's MFU.
from pretrain.run.planner import (  # noqa: F401 - the planner's names, as the command's own
    FAMILY_SHAPES,
    LAYOUT_DEGREES,
    ModelShape,
    activation_bytes,
    gpt_shape,
    gpu_days,
    layout_runs,
    layout_states_bytes,
    min_gpus,
    parse_count,
    plan,
    recipe_shape,
    smallest_layout,
    zero_model_states_bytes,
)
from pretrain.runtime.flops import BYTES_PER_ELEMENT, DTYPES, GPUS, total_flops, total_flops_from_samples  # noqa: F401
from pretrain.runtime.metrics import dumps  # JSON with null, never a bare NaN

PROG = "pretrain-plan"

# ---------------------------------------------------------------------------------------------
# Command line.


def _count_arg(text: str) -> int:
    try:
        return parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Estimate a pretraining run: total FLOPs, GPU-days and wall-clock days, and the memory per GPU "
        "under ZeRO stages 0-3 (model states + activations). Counts accept suffixes: 350M, 1.3B, 2.5T, 124e6.",
        epilog="Formulas: FLOPs = 6·N·D (Kaplan 2020; Chinchilla App. F) [+ 12·L·s·h·D, PaLM App. B]; "
        "model states per ZeRO stage from Rajbhandari et al. 2020 (mixed precision 2+2+12 bytes/param, "
        "fp32 4+4+8); activations s·b·h·(34+5as/h) bytes per layer (Korthikanti et al. 2022). GB = 1e9 bytes.",
    )
    m = p.add_argument_group("model (one of)")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--params", type=_count_arg, help="parameter count N, e.g. 124e6, 350M, 1.3B, 7b")
    src.add_argument(
        "--recipe",
        help="recipe JSON or shipped name (gpt2-124m): its parameters are counted without "
        "allocating the model; it also gives seq-len, sizes, micro-batch and dtype defaults",
    )
    m.add_argument(
        "--vocab-size",
        type=int,
        default=50304,
        help="tokenizer vocabulary for a recipe whose model.vocab_size is null, rounded up to "
        "pad_vocab_multiple as training does (default 50304)",
    )
    m.add_argument(
        "--flops-per-sample",
        type=_count_arg,
        help="for non-text models: FORWARD FLOPs per sample F; training is then 3·F per sample "
        "(backward ~ 2x forward) and needs --samples",
    )
    f = p.add_argument_group("from a scaling-law fit (instead of --params and --tokens)")
    f.add_argument(
        "--budget",
        type=_count_arg,
        help="training compute in FLOPs (e.g. 1e21); with --fit, N and D are the compute-optimal ones",
    )
    f.add_argument(
        "--fit",
        metavar="POINTS",
        help="a pretrain-sweep sweep.jsonl (or a JSONL/CSV points file: params, tokens, loss): its Chinchilla "
        "L(N, D) fit (pretrain-sweep fit) gives the N and D that minimise the loss at --budget FLOPs, "
        "compared with 20 tokens per parameter; the plan is then for that N and D",
    )
    d = p.add_argument_group("data (one of)")
    amount = d.add_mutually_exclusive_group()
    amount.add_argument("--tokens", type=_count_arg, help="training tokens D, e.g. 10B, 300B, 2.5T")
    amount.add_argument("--samples", type=_count_arg, help="training samples S; tokens = S × --seq-len")
    d.add_argument(
        "--seq-len",
        type=int,
        help="tokens per sample (default: the recipe's max_position_embeddings); also the s of the activation estimate",
    )
    d.add_argument(
        "--attention-flops",
        action="store_true",
        help="add the attention-score FLOPs 12·n_layers·seq_len·hidden·D (PaLM App. B) to 6·N·D",
    )
    h = p.add_argument_group("hardware")
    h.add_argument(
        "--gpu",
        default="a100",
        choices=list(GPUS),
        help="GPU whose dense (no sparsity) vendor peak and memory are used (default a100 = A100 SXM 40GB)",
    )
    h.add_argument(
        "--dtype",
        choices=DTYPES,
        help="precision of the peak TFLOPS and of the weights/optimizer "
        "accounting (default: the recipe's precision, else bf16)",
    )
    h.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="GPUs in the run = TP x SP x DP (with --tp 1 --sp 1, the ZeRO data-parallel degree Nd; default 1)",
    )
    h.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel degree (DeepSpeed AutoTP's autotp_size): splits every weight and the attention/"
        "MLP activations t ways (default 1)",
    )
    h.add_argument(
        "--sp",
        type=int,
        default=1,
        help="sequence-parallel degree (DeepSpeed Ulysses, the config's sequence_parallel_size): splits each "
        "sequence's activations p ways; the trainer runs it with ZeRO-3 only, and not with --tp (default 1)",
    )
    h.add_argument(
        "--mfu", type=float, default=0.4, help="model FLOPs utilisation: the fraction of peak achieved (default 0.4)"
    )
    h.add_argument(
        "--reserve-gb",
        type=float,
        default=2.0,
        help="GPU memory kept back for the CUDA context, NCCL buffers and fragmentation (default 2)",
    )
    a = p.add_argument_group("activations (defaults from --recipe)")
    a.add_argument(
        "--micro-batch", type=int, help="sequences per GPU per forward (default: recipe micro_batch_size, else 1)"
    )
    a.add_argument(
        "--accumulation",
        type=int,
        help="gradient accumulation steps (default: recipe gradient_accumulation_steps, else 1); for a CLIP "
        "recipe, whose contrastive batch is the step's micro x accumulation x DP pairs, it sizes their cache",
    )
    a.add_argument("--hidden-size", type=int, help="model width h")
    a.add_argument("--num-layers", type=int, help="transformer layers L")
    a.add_argument("--num-heads", type=int, help="attention heads a (for the a·s² attention-score term)")
    a.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="count checkpointed activations in memory_gb_per_gpu and fits (both are reported anyway)",
    )
    a.add_argument(
        "--flash-attention",
        action="store_true",
        help="fused attention: the a·s² scores are never stored, so drop the 5·a·s/h term",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="--recipe with model.init_from: let transformers run Python code shipped in that directory "
        "(auto_map; it runs with your permissions); without it such a directory is refused",
    )
    return p


def pick(flag: Any, default: Any) -> Any:
    """A flag given on the command line wins over the recipe's value."""
    return default if flag is None else flag


def plan_from_args(args: argparse.Namespace) -> dict:
    if args.fit is not None or args.budget is not None:
        return _plan_from_fit(args)
    if args.params is None and args.recipe is None:
        raise ValueError("give --params N or --recipe R")
    if args.tokens is None and args.samples is None:
        raise ValueError("give --tokens D or --samples S")
    shape = recipe_shape(args.recipe, args.vocab_size) if args.recipe else ModelShape(params=args.params)
    return plan(
        params=shape.params,
        gpu=args.gpu,
        dtype=pick(args.dtype, shape.precision or "bf16"),
        tokens=args.tokens,
        samples=args.samples,
        seq_len=pick(args.seq_len, shape.seq_len),
        forward_flops_per_sample=pick(args.flops_per_sample, shape.forward_flops_per_sample),
        attention_flops=args.attention_flops,
        num_gpus=args.num_gpus,
        mfu=args.mfu,
        micro_batch=pick(args.micro_batch, shape.micro_batch or 1),
        hidden_size=pick(args.hidden_size, shape.hidden_size),
        num_layers=pick(args.num_layers, shape.num_layers),
        num_heads=pick(args.num_heads, shape.num_heads),
        activation_checkpointing=args.activation_checkpointing,
        flash_attention=args.flash_attention,
        reserve_gb=args.reserve_gb,
        tp=args.tp,
        sp=args.sp,
        accumulation=pick(args.accumulation, shape.accumulation or 1),
        contrastive_dim=shape.contrastive_dim,
    )


def _plan_from_fit(args: argparse.Namespace) -> dict:
    """The plan of the compute-optimal (N, D) that a sweep's L(N, D) fit gives for --budget."""
    from pretrain.sweep.fit import chinchilla_from, compute_optimal, fit_all, load_points, rule_of_thumb, usable

    if args.fit is None or args.budget is None:
        raise ValueError("--budget and --fit go together")
    if args.params is not None or args.recipe or args.tokens is not None or args.samples is not None:
        raise ValueError("--fit chooses the parameters and tokens: leave out --params, --recipe, --tokens, --samples")
    try:
        rows = load_points(args.fit)
    except OSError as e:
        raise ValueError(f"--fit {args.fit}: {e.strerror or e}") from None
    report = fit_all(rows, n_bootstrap=0)
    fit = chinchilla_from(report)
    n, d = compute_optimal(fit, args.budget)
    warnings = []
    sizes, counts = report["chinchilla"]["distinct_params"], report["chinchilla"]["distinct_tokens"]
    if min(sizes, counts) < 3:
        # two values of N (or D) fix a line through two points, not the curvature an exponent is read from
        warnings.append(
            f"the fit rests on {sizes} model sizes x {counts} token counts: with fewer than 3 of either, "
            "alpha or beta is not identified and this optimum means little (pretrain-sweep fit shows the intervals)"
        )
    top = max(r["flops"] for r in usable(rows))
    if args.budget > 1e3 * top:
        warnings.append(f"the budget is {args.budget / top:.1e} x the largest point's compute: an extrapolation")
    n20, d20 = rule_of_thumb(args.budget)
    result = plan_from_args(
        argparse.Namespace(**{**vars(args), "fit": None, "budget": None, "params": round(n), "tokens": round(d)})
    )
    result["scaling_fit"] = {
        "points": args.fit,
        "budget_flops": args.budget,
        "law": {"E": fit.E, "A": fit.A, "B": fit.B, "alpha": fit.alpha, "beta": fit.beta},
        "optimal_params": n,
        "optimal_tokens": d,
        "tokens_per_param": d / n,
        "predicted_loss": float(fit.loss(n, d)),
        "rule_20_params": n20,
        "rule_20_tokens": d20,
        "rule_20_predicted_loss": float(fit.loss(n20, d20)),
        "warnings": warnings,
    }
    return result


def format_fit(f: dict) -> str:
    law = f["law"]
    return "\n".join(
        [
            f"{PROG}: compute-optimal for {f['budget_flops']:.3g} FLOPs from the fit of {f['points']}:",
            f"  L(N, D) = {law['E']:.3f} + {law['A']:.3g}/N^{law['alpha']:.3f} + {law['B']:.3g}/D^{law['beta']:.3f}",
            f"  optimal          N = {_human(f['optimal_params'])} parameters, "
            f"D = {_human(f['optimal_tokens'])} tokens ({f['tokens_per_param']:.1f} tokens/parameter), "
            f"predicted loss {f['predicted_loss']:.4f}",
            f"  20 tokens/param  N = {_human(f['rule_20_params'])}, D = {_human(f['rule_20_tokens'])}, "
            f"predicted loss {f['rule_20_predicted_loss']:.4f}",
            *(f"  warning: {w}" for w in f["warnings"]),
            "",
        ]
    )


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:g}"


def _gb(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.1f}" if x >= 10 else f"{x:.2f}")


def format_plan(r: dict) -> str:
    usable = r["gpu_memory_gb"] - r["reserve_gb"]
    days = r["wall_days"]
    lines = [
        f"{PROG}: {_human(r['params'])} parameters on {r['num_gpus']} x {r['gpu_name']}, {r['dtype']}",
        "",
        "compute",
        f"  tokens           {_human(r['tokens'])}"
        + (f"   ({_human(r['samples'])} samples of {r['seq_len']})" if r["samples"] and r["seq_len"] else ""),
        f"  total FLOPs      {r['total_flops']:.3e}   ({r['notes'][0].removeprefix('FLOPs = ')})",
        f"  per GPU          {r['peak_tflops']:g} TFLOPS peak x {r['mfu']:g} MFU "
        f"= {r['peak_tflops'] * r['mfu']:.1f} TFLOPS",
        f"  GPU time         {r['gpu_days']:,.2f} GPU-days ({r['gpu_hours']:,.1f} GPU-hours)",
        f"  wall clock       {days:,.2f} days ({days * 24:,.1f} h) on {r['num_gpus']} GPUs, linear scaling",
        f"  weights          {_gb(r['weights_gb'])} GB in {r['dtype']}",
        "",
        f"memory per GPU (GB = 1e9 bytes; {r['gpu_memory_gb']:g} GB - {r['reserve_gb']:g} reserve = {usable:g} usable; "
        f"micro-batch {r['micro_batch']}, activations "
        f"{'checkpointed' if r['activation_checkpointing'] else 'stored'} in the total)",
        f"  {'stage':<7} {'model states':>12} {'activations':>12} {'act. ckpt':>10} {'total':>9} {'fits':>5} "
        f"{'min GPUs':>9}",
    ]
    for stage in range(4):
        z = r["zero"][f"zero{stage}"]
        lines.append(
            f"  ZeRO-{stage:<2} {_gb(z['model_states_gb_per_gpu']):>12} {_gb(z['activations_gb_per_gpu']):>12} "
            f"{_gb(z['activations_checkpointed_gb_per_gpu']):>10} {_gb(z['memory_gb_per_gpu']):>9} "
            f"{('yes' if z['fits'] else 'no') if z.get('runs', True) else 'n/a':>5} "
            f"{z['min_gpus'] if z['min_gpus'] is not None else '-':>9}"
        )
    c = r["cheapest_stage"]
    lines.append("")
    lines.append(
        f"cheapest stage that fits on {r['num_gpus']} GPUs: "
        + (
            f"ZeRO-{c}"
            if c is not None
            else "none (add GPUs"
            + ("" if r["activation_checkpointing"] else ", checkpoint activations")
            + " or shrink the micro-batch)"
        )
    )
    best = r["smallest_layout"]
    lines.append(
        "smallest layout that fits: "
        + (
            f"TP {best['tp']} x SP {best['sp']} x DP {best['dp']} = {best['num_gpus']} GPUs "
            f"with ZeRO-{best['zero_stage']} "
            f"({_gb(best['memory_gb_per_gpu'])} GB per GPU)"
            if best
            else "none up to TP 8 x SP 8"
        )
    )
    lines += [f"note: {n}" for n in r["notes"][1:]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    from pretrain.run.config import RecipeError
    from pretrain.runtime.checkpoint import trusting

    try:
        with trusting(remote_code=args.trust_remote_code):
            result = plan_from_args(args)
    except (RecipeError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    text = format_plan(result)
    if result.get("scaling_fit"):
        text = format_fit(result["scaling_fit"]) + text
    print(dumps(result, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
