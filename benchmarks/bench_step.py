#!/usr/bin/env python
"""The toolkit's training step against a bare DeepSpeed loop, in one run, interleaved A/B.

Both arms run in the same processes, launched once per model size by the ``deepspeed``
launcher on ``--ranks`` ranks, on the same transformers GPT-2, the same DeepSpeed config
(``--deepspeed-config``, ZeRO-2 fp32 by default; ZeRO-1 bf16 on a GPU) and the same batch shape:

  toolkit   Trainer.train_step: the real data stream over prepared shards (read, shuffle buffer,
            collate), the per-micro-batch all-reduce of the finiteness flag, loss and counters,
            the gradient-norm read of a logged step, plus one metrics.jsonl line (log_every=1,
            the toolkit's most expensive setting)
  bare      engine(input_ids=x, labels=x).loss; engine.backward(loss); engine.step() on random
            tokens already in memory

Each repeat times ``--steps`` steps of one arm, then of the other (the order alternates), after
``--warmup`` untimed steps of each; devices are synchronised and ranks meet at a barrier at the
edges of every timed block. The table shows the medians of seconds per step and the median of
the per-repeat ratios toolkit / bare (1.00 = no overhead). Sizes:

  tiny      gpt-tiny: hidden 128, 4 layers, 4 heads, seq 64, micro-batch 8
  compute   hidden 512, 8 layers, 8 heads, seq 256, micro-batch 2 (compute-dominated)

Torch threads per rank = cores / ranks (--threads), so ranks do not fight over cores.

    python benchmarks/bench_step.py --json step.json                  # 2 CPU ranks, both sizes
    python benchmarks/bench_step.py --ranks 1 --sizes compute --deepspeed-config ds_configs/zero1_bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES = {
    "tiny": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "seq_len": 64, "micro": 8},
    "compute": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "seq_len": 256, "micro": 2},
}
VOCAB = 4096


# --------------------------------------------------------------------------------------------- parent


def prepare_data(seq_len: int, out: Path) -> Path:
    """Prepared shards of the stdlib's own sources at this sequence length (reused when present)."""
    if (out / "manifest.json").is_file():
        return out
    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipelines.text.prepare",
            *files,
            "--output",
            str(out),
            "--vocab-size",
            str(VOCAB),
            "--seq-len",
            str(seq_len),
            "--val-fraction",
            "0.02",
            "--no-progress",
        ],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(size: str, data: Path, args: argparse.Namespace, work: Path) -> dict:
    result = work / f"result-{size}.json"
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.ranks)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(args.ranks),
        "--master_port",
        str(free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        "--size",
        size,
        "--data",
        str(data),
        "--work",
        str(work),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--deepspeed-config",
        args.deepspeed_config,
        "--result",
        str(result),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result.is_file():
        sys.exit(f"{size}: the launch failed (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {**json.loads(result.read_text()), "threads_per_rank": threads}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench_step.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sizes", default="tiny,compute", help="comma-separated model sizes to run: tiny, compute (default both)"
    )
    p.add_argument("--ranks", type=int, default=2, help="ranks the deepspeed launcher starts (default 2; 1 on one GPU)")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per arm per repeat (default 4)")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed steps of each arm before the first repeat (default 3)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per arm, alternating the order (default 3)")
    p.add_argument(
        "--deepspeed-config",
        default="ds_configs/zero2_fp32.json",
        help="DeepSpeed JSON both arms use (default ds_configs/zero2_fp32.json; ds_configs/zero1_bf16.json on a GPU)",
    )
    p.add_argument("--data", help="folder for the prepared shards (one subfolder per size; reused when present)")
    p.add_argument("--json", help="write the full record (settings, versions, every repeat, medians) here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown sizes {unknown} (known: {', '.join(SIZES)})")
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        root = Path(args.data or tmp)
        rows = {}
        for size in sizes:
            data = prepare_data(SIZES[size]["seq_len"], root / f"stdlib-{SIZES[size]['seq_len']}")
            rows[size] = launch(size, data, args, Path(tmp))
    import deepspeed
    import torch

    print(f"{'size':<9} {'toolkit s/step':>15} {'bare s/step':>12} {'ratio':>7} {'min..max':>12}")
    for size, r in rows.items():
        print(
            f"{size:<9} {r['toolkit_median_s']:>15.4f} {r['bare_median_s']:>12.4f} {r['ratio_median']:>7.3f} "
            f"{min(r['ratios']):>5.3f}..{max(r['ratios']):.3f}"
        )
    if args.json:
        record = {
            "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "size", "work", "result")},
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "deepspeed": deepspeed.__version__,
                "device": rows[sizes[0]]["device"],
            },
            "sizes": SIZES,
            "results": rows,
            "date": time.strftime("%Y-%m-%d"),
        }
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


# --------------------------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist

    from pretrain.models import get_family
    from pretrain.run.ds_config import for_deepspeed
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    size = SIZES[args.size]
    work = Path(args.work)
    rank = int(os.environ.get("RANK", 0))
    recipe = {
        "name": f"bench-{args.size}",
        "family": "gpt",
        "model": {
            "arch": "gpt2",
            "hidden_size": size["hidden_size"],
            "num_layers": size["num_layers"],
            "num_heads": size["num_heads"],
            "max_position_embeddings": size["seq_len"],
        },
        "data": {"shuffle_buffer": 256, "num_workers": 0},
        "training": {
            "micro_batch_size": size["micro"],
            "max_steps": 10**6,
            "lr": 1e-4,
            "warmup_steps": 10,
            "precision": "bf16" if "bf16" in args.deepspeed_config else "fp32",
            "log_every": 1,
        },
        "eval": {"every": 0},
        "checkpoint": {"every": 0, "at_end": False},
    }
    recipe_path = work / f"recipe-{args.size}.json"
    if rank == 0:
        recipe_path.write_text(json.dumps(recipe))
    deepspeed.init_distributed()
    dist.barrier()
    targs = build_parser().parse_args(
        [
            "--config",
            str(recipe_path),
            "--deepspeed_config",
            args.deepspeed_config,
            "--data",
            args.data,
            "--output-dir",
            str(work / f"run-{args.size}"),
            "--resume",
            "none",
            "--no-progress",
        ]
    )
    resolved, inputs, run_dir = prepare(targs)
    trainer = Trainer(resolved, inputs, run_dir, "none", progress=False)
    trainer.setup()

    family = get_family("gpt")
    torch.manual_seed(resolved.recipe.training.seed)
    model = family.build_model(resolved.recipe.model, inputs.model_config)
    optimizer = None
    if "optimizer" not in resolved.deepspeed:  # the trainer then uses torch's AdamW; so does the bare arm
        tr, opt = resolved.recipe.training, resolved.optimization
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=opt.lr, betas=tr.betas, eps=tr.eps, weight_decay=tr.weight_decay
        )
    bare, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        config=for_deepspeed(resolved.deepspeed),
    )
    device = bare.device
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, inputs.model_config.vocab_size, (size["micro"], size["seq_len"]), generator=g).to(device)
    gas = bare.gradient_accumulation_steps()

    def bare_step() -> None:
        for _ in range(gas):
            loss = bare(input_ids=tokens, labels=tokens).loss
            bare.backward(loss)
            bare.step()

    def toolkit_step() -> None:
        out = trainer.train_step(log=True)
        out.pop("stop")
        trainer.metrics.log({"step": trainer.state.step, **out, "samples": trainer.state.samples})

    def timed(step_fn) -> float:
        sync(device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step_fn()
        sync(device)
        dist.barrier()
        return (time.perf_counter() - start) / args.steps

    for _ in range(args.warmup):
        toolkit_step()
        bare_step()
    toolkit, plain = [], []
    for r in range(args.repeats):
        order = [(toolkit_step, toolkit), (bare_step, plain)]
        for fn, out in order if r % 2 == 0 else order[::-1]:
            out.append(timed(fn))
    ratios = [t / b for t, b in zip(toolkit, plain)]
    if rank == 0:
        Path(args.result).write_text(
            json.dumps(
                {
                    "toolkit_s": toolkit,
                    "bare_s": plain,
                    "ratios": ratios,
                    "toolkit_median_s": statistics.median(toolkit),
                    "bare_median_s": statistics.median(plain),
                    "ratio_median": statistics.median(ratios),
                    "params": family.count_params(inputs.model_config),
                    "world_size": dist.get_world_size(),
                    "device": torch.cuda.get_device_name()
                    if torch.cuda.is_available()
                    else platform.processor() or "cpu",
                    "global_batch": resolved.global_batch,
                    "seq_len": size["seq_len"],
                    "model_flops_per_step": resolved.flops_per_step,
                }
            )
        )
    trainer.metrics.close()
    dist.barrier()
    return 0


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
