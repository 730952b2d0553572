#!/usr/bin/env python
"""What activation checkpointing (training.activation_checkpointing) saves, at a sequence length where
activations dominate: one forward + backward of a GPT-2 (hidden 256, 4 layers, 4 heads, vocab 4096,
fp32) on a batch of --micro x --seq-len random tokens, with and without checkpointing, each in a
fresh process.

Memory: on a CPU, the growth of the process's peak resident set during the step (ru_maxrss after
the step minus the resident set before it: what the step's activations and gradients added); on
a GPU, torch.cuda.max_memory_allocated during the step minus the memory allocated before it. Time:
seconds of the forward + backward (the recomputation costs about one more forward). Medians of
--repeats processes per variant; the ratios are checkpointed / plain.

    python benchmarks/bench_activation_memory.py --json ac.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def one(args: argparse.Namespace) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pretrain.models import get_family
    from pretrain.parallel.activation_checkpointing import checkpoint_blocks
    from pretrain.run.config import parse_recipe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=4096, n_positions=args.seq_len, n_embd=256, n_layer=4, n_head=4, use_cache=False)
    model = GPT2LMHeadModel(config).to(device).train()
    family = get_family("gpt")
    checkpoint_blocks(model, family, parse_recipe({"training": {"activation_checkpointing": args.checkpointing}}))
    ids = torch.randint(0, 4096, (args.micro, args.seq_len + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    start = time.perf_counter()
    family.loss(model, batch).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_s": time.perf_counter() - start, "step_memory_bytes": peak - before, "device": device}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench_activation_memory.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--micro", type=int, default=8, help="sequences in the batch (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per variant (default 3)")
    p.add_argument("--json", help="write every measurement and the medians here")
    p.add_argument("--one", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        args.checkpointing = args.one == "checkpointed"
        print(json.dumps(one(args)))
        return 0
    runs: dict[str, list[dict]] = {"plain": [], "checkpointed": []}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    for _ in range(args.repeats):
        for variant in runs:  # alternate, so slow drifts of the machine hit both
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    variant,
                    "--seq-len",
                    str(args.seq_len),
                    "--micro",
                    str(args.micro),
                ],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {
        v: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "step_memory_bytes")} for v, rs in runs.items()
    }
    mem_ratio = med["checkpointed"]["step_memory_bytes"] / med["plain"]["step_memory_bytes"]
    time_ratio = med["checkpointed"]["step_s"] / med["plain"]["step_s"]
    kind = "peak RSS growth" if runs["plain"][0]["device"] == "cpu" else "peak allocated"
    print(f"seq {args.seq_len} x micro {args.micro}, {runs['plain'][0]['device']}, medians of {args.repeats}:")
    print(f"{'variant':<13} {kind + ' MB':>20} {'fwd+bwd s':>10}")
    for v, m in med.items():
        print(f"{v:<13} {m['step_memory_bytes'] / 1e6:>20.0f} {m['step_s']:>10.3f}")
    print(f"checkpointed / plain: memory {mem_ratio:.2f}x, time {time_ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "settings": vars(args),
                    "runs": runs,
                    "medians": med,
                    "memory_ratio": mem_ratio,
                    "time_ratio": time_ratio,
                    "memory_measure": kind,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
