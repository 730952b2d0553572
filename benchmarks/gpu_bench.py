#!/usr/bin/env python
"""The GPU benchmark in one command (``bash benchmarks/gpu.sh``): on one CUDA GPU, in under 8 minutes,

  1. data: prepare-text on this Python's standard library sources (seq 1024, a 50,257-token BPE)
     and make-synthetic-image-text (256 px JPEGs), both local, nothing downloaded;
  2. GPT-2 350M, bf16, ZeRO-1, sdpa attention, no activation checkpointing, micro-batch --gpt-micro
     (16 fills an 80 GB card), --steps optimizer steps;
  3. CLIP ViT-B/32, bf16, ZeRO-1, micro-batch --clip-micro, DataLoader workers = min(8, cores);
  4. benchmarks/bench_step.py on the GPU (the toolkit's step against a bare DeepSpeed loop);

then prints one table: tokens/s, samples/s, achieved TFLOP/s per GPU, MFU (against the card's
dense bf16 peak, pretrain/runtime/flops.py), peak memory, and the time each step waited for the loader,
all medians over the logged steps after --warmup. The runs' metrics.jsonl are the source: the
same numbers every run logs. Results also go to OUT/results.json.

Both training runs use the toolkit's own AdamW (torch.optim.AdamW; no "optimizer" section in the
DeepSpeed config), so nothing needs the CUDA compiler that DeepSpeed's FusedAdam would build.

    bash benchmarks/gpu.sh                      # the GPU benchmark
    bash benchmarks/gpu.sh --smoke              # the same pipeline with tiny models on a CPU (plumbing check)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def sh(cmd: list[str], log: Path) -> None:
    """Run one step of the benchmark; its output goes to a log file, its failure stops the benchmark."""
    shown = " ".join(cmd)
    print(f"$ {shown if len(shown) < 400 else shown[:200] + ' ... ' + shown[-150:]}", flush=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}); the last lines of {log}:\n" + "".join(open(log).readlines()[-30:]))


def corpus(max_bytes: int) -> list[str]:
    """Standard-library sources up to max_bytes: a real text corpus on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for p in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts) or not p.is_file():
            continue
        files.append(str(p))
        total += p.stat().st_size
        if total >= max_bytes:
            break
    return files


def ds_config(out: Path) -> Path:
    """ZeRO-1 bf16 with the toolkit's AdamW (no optimizer section): ds_configs/zero1_bf16.json otherwise."""
    ds = json.loads((REPO / "ds_configs" / "zero1_bf16.json").read_text())
    ds.pop("optimizer", None)
    path = out / "zero1_bf16_torch_adamw.json"
    path.write_text(json.dumps(ds, indent=2))
    return path


def recipe(name: str, out: Path, micro: int, workers: int, steps: int, log_every: int, **data) -> Path:
    r = json.loads((REPO / "pretrain" / "recipes" / f"{name}.json").read_text())
    r["training"].update(micro_batch_size=micro, gradient_accumulation_steps=1, max_steps=steps, log_every=log_every)
    r["data"].update(num_workers=workers, **data)
    r["eval"].update(every=0, max_samples=min(512, r["eval"].get("max_samples") or 512))
    r["checkpoint"].update(every=0, at_end=False)
    path = out / f"{name}-bench.json"
    path.write_text(json.dumps(r, indent=2))
    return path


def summary(run_dir: Path, warmup: int) -> dict:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [m for m in lines if "split" not in m and "event" not in m and m["step"] > warmup]
    if not train:
        sys.exit(f"{run_dir}: no train lines after step {warmup}")

    def med(key):
        values = [m[key] for m in train if m.get(key) is not None]
        return statistics.median(values) if values else None

    mem = [m["peak_memory_gb"] for m in train if m.get("peak_memory_gb") is not None]
    return {
        "tokens_per_s": med("tokens_per_s"),
        "samples_per_s": med("samples_per_s"),
        "tflops_per_gpu": med("tflops_per_gpu"),
        "mfu": med("mfu"),
        "peak_memory_gb": max(mem) if mem else None,
        "data_wait_ms_per_step": 1000 * med("data_wait_s"),
        "steps_measured": len(train),
        "model_flops_per_step": train[-1]["model_flops_per_step"],
    }


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmarks/gpu.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models and data on whatever device there is (a CPU): checks the plumbing",
    )
    p.add_argument(
        "--out", default="runs/gpu-bench", help="folder for data, runs, logs and results.json (default runs/gpu-bench)"
    )
    p.add_argument("--steps", type=int, help="optimizer steps per training run (default 120; smoke 12)")
    p.add_argument("--warmup", type=int, help="logged steps left out of the medians (default 20; smoke 4)")
    p.add_argument("--gpt-micro", type=int, default=16, help="GPT-350M micro-batch at seq 1024 (default 16)")
    p.add_argument("--clip-micro", type=int, default=256, help="CLIP ViT-B/32 micro-batch (default 256)")
    p.add_argument("--workers", type=int, help="DataLoader workers per run (default min(8, cores))")
    p.add_argument("--skip-step-bench", action="store_true", help="leave out benchmarks/bench_step.py")
    args = p.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run on a GPU machine, or use --smoke to check the pipeline on a CPU")
    steps = args.steps or (12 if args.smoke else 120)
    warmup = args.warmup if args.warmup is not None else (4 if args.smoke else 20)
    workers = args.workers if args.workers is not None else (0 if args.smoke else min(8, os.cpu_count() or 1))
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    py = sys.executable
    started = time.time()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; results in {out}", flush=True)

    # 1. data
    text, images = out / "text", out / "images"
    if not (text / "manifest.json").is_file():
        sh(
            [
                py,
                "-m",
                "data_pipelines.text.prepare",
                *corpus(2_000_000 if args.smoke else 40_000_000),
                "--output",
                str(text),
                "--vocab-size",
                "1024" if args.smoke else "50257",
                "--seq-len",
                "64" if args.smoke else "1024",
                "--val-fraction",
                "0.01",
                "--test-fraction",
                "0",
                "--workers",
                str(max(1, min(8, os.cpu_count() or 1))),
                "--no-progress",
            ],
            out / "logs" / "prepare-text.log",
        )
    if not (images / "manifest.json").is_file():
        sh(
            [
                py,
                "-m",
                "data_pipelines.image.synthetic",
                "--output",
                str(images),
                "--count",
                "600" if args.smoke else "12000",
                "--image-size",
                "64" if args.smoke else "256",
                "--no-progress",
            ],
            out / "logs" / "synthetic.log",
        )

    # 2-3. training runs
    ds = ds_config(out)
    runs = {
        "gpt": ("gpt-tiny" if args.smoke else "gpt2-350m", text, args.gpt_micro if not args.smoke else 8),
        "clip": ("clip-tiny" if args.smoke else "clip-vit-b32", images, args.clip_micro if not args.smoke else 16),
    }
    results: dict[str, dict] = {}
    for key, (name, data, micro) in runs.items():
        r = recipe(
            name,
            out,
            micro,
            workers,
            steps,
            log_every=1 if args.smoke else 10,
            shuffle_buffer=256 if args.smoke else 2000,
        )
        run_dir = out / f"run-{key}"
        sh(
            [
                py,
                "-m",
                "pretrain.train",
                "--config",
                str(r),
                "--deepspeed_config",
                str(ds),
                "--data",
                str(data),
                "--output-dir",
                str(run_dir),
                "--resume",
                "none",
                "--no-progress",
            ],
            out / "logs" / f"train-{key}.log",
        )
        results[name] = {**summary(run_dir, warmup), "micro_batch": micro}

    # 4. the step against a bare loop
    if not args.skip_step_bench:
        step_json = out / "bench-step.json"
        sh(
            [
                py,
                "benchmarks/bench_step.py",
                "--ranks",
                "1",
                "--sizes",
                "tiny" if args.smoke else "tiny,compute",
                "--deepspeed-config",
                str(ds),
                "--steps",
                "2" if args.smoke else "10",
                "--repeats",
                "3",
                "--data",
                str(out / "bench-step-data"),
                "--json",
                str(step_json),
            ],
            out / "logs" / "bench-step.log",
        )
        step = json.loads(step_json.read_text())["results"]
    else:
        step = {}

    print(f"\n{device}, {time.time() - started:.0f} s in all; medians over steps {warmup + 1}..{steps}\n")
    print("| run | micro | tokens/s | samples/s | TFLOP/s/GPU | MFU | peak mem GB | loader wait ms/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['micro_batch']} | {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['samples_per_s'], ',.1f')} | "
            f"{fmt(r['tflops_per_gpu'], '.1f')} | {fmt(r['mfu'], '.1%')} | {fmt(r['peak_memory_gb'], '.1f')} | "
            f"{fmt(r['data_wait_ms_per_step'], '.1f')} |"
        )
    if step:
        print("\n| bench_step.py size | toolkit ms/step | bare DeepSpeed ms/step | toolkit / bare |")
        print("|---|---:|---:|---:|")
    for size, r in step.items():
        print(
            f"| {size} | {r['toolkit_median_s'] * 1000:.1f} | {r['bare_median_s'] * 1000:.1f} "
            f"| {r['ratio_median']:.3f} |"
        )
    (out / "results.json").write_text(
        json.dumps(
            {
                "device": device,
                "steps": steps,
                "warmup": warmup,
                "workers": workers,
                "runs": results,
                "bench_step": step,
                "seconds": time.time() - started,
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
