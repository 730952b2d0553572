#!/usr/bin/env python
"""How far a bf16 run's accumulated gradient is from the exact one, with bf16 and with fp32 accumulation.

A small GPT-2 (``--width`` x ``--layers``) and ``--accum`` fixed random token micro-batches. The
gradient each real DeepSpeed engine (bf16, one process, each ZeRO stage in ``--stages``) holds after
the last micro-batch's backward, before its step, is read with ``deepspeed.utils.safe_get_full_grad``
and compared, as ||g - g_ref|| / ||g_ref|| over all parameters, with two references:

  vs fp32 model    the same model and batches in fp32, micro-gradients summed in fp64: the whole
                   error of training in bf16 (bf16 forward/backward plus the accumulation)
  vs exact sum     the bf16 model's own micro-gradients summed in fp64: the accumulation's error alone

``torch emulation`` rows sum the same bf16 micro-gradients (plain torch) into a bf16 buffer and into
an fp32 buffer, as a check on what the engines are read to hold. ZeRO-0 with fp32 accumulation is
refused by DeepSpeed 0.19 ("unsupported mix of model_dtype and grad_accum_dtype") and reported so.
DeepSpeed's ``communication_data_type`` is bf16 when bf16 is on; rows with comm fp32 set it to fp32. One
process: a reduction across ranks adds nothing here, but a cast to the communication dtype still shows.

    python benchmarks/bench_grad_accum.py --json grad_accum.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def build(args, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.seq_len,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).to(dtype)


def batches(args) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for _ in range(args.accum):
        ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


def micro_grads(model, data, accum: int):
    """Each micro-batch's gradient of loss / accum (as an engine scales it), as the model's dtype gives it."""
    from pretrain.models.gpt import loss

    for batch in data:
        model.zero_grad(set_to_none=True)
        (loss(model, batch) / accum).backward()
        yield {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def summed(grads, dtype) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for g in grads:
        for n, t in g.items():
            total[n] = total[n] + t.to(dtype) if n in total else t.to(dtype)
    return total


def rel_error(g: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float((g[n].double() - ref[n].double()).pow(2).sum()) for n in ref)
    den = sum(float(ref[n].double().pow(2).sum()) for n in ref)
    return (num / den) ** 0.5


def engine_grads(args, data, stage: int, accum_dtype: str, comm: str | None = None) -> tuple[dict, str]:
    """The accumulated gradient a bf16 DeepSpeed engine holds before its step."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from pretrain.models.gpt import loss

    model = build(args, torch.float32)
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.accum,
        "train_batch_size": args.micro_batch * args.accum,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "data_types": {"grad_accum_dtype": accum_dtype},
    }
    if comm:
        config["communication_data_type"] = comm
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    names = [n for n, _ in engine.module.named_parameters()]
    for i, batch in enumerate(data):
        engine.backward(loss(engine, batch))
        if i < len(data) - 1:
            engine.step()  # not a boundary: only counts the micro-batch
    grads = {n: safe_get_full_grad(p).detach().double().clone() for n, p in zip(names, engine.module.parameters())}
    kind = type(engine.optimizer).__name__
    engine.step()
    engine.destroy()
    return grads, kind


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256, help="hidden size (default 256)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default 2048)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch (default 4)")
    p.add_argument("--accum", type=int, default=16, help="micro-batches accumulated per step (default 16)")
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], help="ZeRO stages (default 0 1 2 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every figure and the settings here")
    args = p.parse_args(argv)

    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    start = time.perf_counter()
    data = batches(args)
    fp32_ref = summed(micro_grads(build(args, torch.float32), data, args.accum), torch.float64)
    bf16_micro = list(micro_grads(build(args, torch.bfloat16), data, args.accum))
    exact = summed(bf16_micro, torch.float64)

    rows = []

    def row(source: str, stage, accum: str, g: dict | None, note: str = "", comm: str = "bf16") -> None:
        rows.append(
            {
                "source": source,
                "zero_stage": stage,
                "accumulation": accum,
                "communication": comm,
                "note": note,
                "vs_fp32_model": None if g is None else rel_error(g, fp32_ref),
                "vs_exact_sum": None if g is None else rel_error(g, exact),
            }
        )

    row("torch emulation", "-", "bf16", summed(bf16_micro, torch.bfloat16), comm="-")
    row("torch emulation", "-", "fp32", summed(bf16_micro, torch.float32), comm="-")
    for stage in args.stages:
        # communication_data_type defaults to bf16 with bf16 on; fp32 shows what the reduction's cast costs
        for accum, comm in (("bf16", None), ("fp32", None), ("fp32", "fp32")):
            try:
                g, kind = engine_grads(args, data, stage, accum, comm)
                row("deepspeed", stage, accum, g, kind, comm or "bf16")
            except NotImplementedError as e:
                row("deepspeed", stage, accum, None, f"refused: {e}", comm or "bf16")
                if comm is None:
                    break

    print(
        f"GPT-2 width {args.width}, {args.layers} layers, {args.accum} micro-batches of {args.micro_batch} x "
        f"{args.seq_len} tokens; relative gradient error ||g - g_ref|| / ||g_ref||"
    )
    print(f"{'source':<16} {'ZeRO':>4} {'accum':>5} {'comm':>5} {'vs fp32 model':>14} {'vs exact sum':>13}  optimizer")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.2e}"  # noqa: E731
        print(
            f"{r['source']:<16} {r['zero_stage']!s:>4} {r['accumulation']:>5} {r['communication']:>5} "
            f"{fmt(r['vs_fp32_model']):>14} {fmt(r['vs_exact_sum']):>13}  {r['note'][:60]}"
        )
    if args.json:
        import deepspeed as ds
        import transformers

        record = {
            "settings": vars(args),
            "rows": rows,
            "seconds": time.perf_counter() - start,
            "versions": {
                "torch": torch.__version__,
                "deepspeed": ds.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        }
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
