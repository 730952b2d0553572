#!/usr/bin/env python
"""How long a checkpoint save stops training: background writes against synchronous ones.

Starts 2 ranks with the deepspeed launcher (gloo on CPU; ``--nproc``), builds a model of
``--params-m`` million parameters (``--layers`` square Linear layers with GELU, fp32, AdamW), and
for each ZeRO stage in ``--zero`` trains it and saves through the toolkit's `CheckpointManager`,
``--saves`` saves per mode with ``--steps-between`` training steps between them (the manager
polled each step, as the trainer does), the modes taking turns, ``--repeats`` times:

  sync        checkpoint.background false: the save returns once every file is written, fsynced and sealed
  background  checkpoint.background true: the save returns once the state is copied to host memory;
              a writer thread per rank writes and hashes, the seal follows when every rank's writes ended
  decoupled   (with --decoupled) DeepSpeed 0.19.8's own decoupled writer ("checkpoint": {"writer":
              {"type": "python", "decoupled": true}}), a writer process per rank, without the toolkit's
              seal; it waits for the writes in the next optimizer step, so its blocking time is the
              save call plus what that step took beyond a normal step

The numbers per save are the ones the trainer logs in metrics.jsonl: ``save_blocking_s`` (the step
loop waited: the copy to host memory, a wait for the previous save, the seal) and ``save_s`` (start
to seal). Also the median step time while saves were in flight against the steps of the sync rows,
since on 2 cores the writer takes CPU from the step. Each rank runs ``--threads`` torch threads.

    python benchmarks/bench_checkpoint.py --json ckpt.json
    python benchmarks/bench_checkpoint.py --zero 2 --saves 2 --repeats 1     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--params-m", type=float, default=64.0, help="model size in millions of parameters (default 64)")
    p.add_argument("--layers", type=int, default=8, help="square Linear layers the parameters are spread over")
    p.add_argument("--zero", type=int, nargs="+", default=[2, 3], help="ZeRO stages to measure (default 2 3)")
    p.add_argument("--saves", type=int, default=3, help="saves per mode and repeat (default 3)")
    p.add_argument("--steps-between", type=int, default=4, help="training steps between saves (default 4)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of sync/background in turn (default 1)")
    p.add_argument("--micro-batch", type=int, default=4, help="samples per rank and step (default 4)")
    p.add_argument("--decoupled", action="store_true", help="also measure DeepSpeed's decoupled writer")
    p.add_argument("--nproc", type=int, default=2, help="ranks started by the deepspeed launcher (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1: 2 ranks on 2 cores)")
    p.add_argument("--dir", help="where checkpoints are written (default: a temporary directory, removed)")
    p.add_argument("--json", help="write the full record (settings, every save) here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


def _engine(args, zero: int, decoupled: bool = False):
    import deepspeed
    import torch

    width = int((args.params_m * 1e6 / args.layers) ** 0.5)
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers)
    params = sum(p.numel() for p in model.parameters())
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if decoupled:
        # data_parallel "machine": its default (None) fails in 0.19.8 without an mpu (UniversalParallelInfo.dp_rank)
        config["checkpoint"] = {"writer": {"type": "python", "decoupled": True, "data_parallel": "machine"}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, width, params


def _step(engine, width: int, micro: int) -> float:
    import torch

    t = time.perf_counter()
    x = torch.randn(micro, width)
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - t


def _toolkit_mode(args, engine, width, root: Path, zero: int, background: bool, first_step: int) -> dict:
    import torch.distributed as dist

    from pretrain.runtime.checkpoint import CheckpointManager

    manager = CheckpointManager(
        root,
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        zero_stage=zero,
        seed=0,
        resume="none",
        keep_last=1,
        background=background,
    )
    step, steps, records = first_step, [], []
    for _ in range(args.saves):
        for _ in range(args.steps_between):
            step += 1
            t = time.perf_counter()
            _step(engine, width, args.micro_batch)
            manager.poll()
            steps.append(time.perf_counter() - t)
        manager.save(engine, step, {"step": step}, {})
        records += manager.take_records()
    for _ in range(args.steps_between):  # the last save gets the same time to finish as the others
        step += 1
        t = time.perf_counter()
        _step(engine, width, args.micro_batch)
        manager.poll()
        steps.append(time.perf_counter() - t)
    manager.flush()
    records += manager.take_records()
    assert [r["event"] for r in records] == ["checkpoint"] * args.saves, records
    return {"records": records, "step_s": steps, "last_step": step}


def _decoupled_mode(args, root: Path) -> dict:
    """DeepSpeed's decoupled writer on a fresh engine (ZeRO-2): save_checkpoint, then the extra time of
    the next step (which waits for the writer process to finish)."""
    engine, width, _ = _engine(args, 2, decoupled=True)
    normal = [_step(engine, width, args.micro_batch) for _ in range(3)]
    base = statistics.median(normal)
    blocking, steps = [], []
    for i in range(args.saves):
        for _ in range(args.steps_between - 1):
            steps.append(_step(engine, width, args.micro_batch))
        t = time.perf_counter()
        try:
            engine.save_checkpoint(str(root), tag=f"decoupled_{i}", save_latest=False)
        except Exception:
            writer = engine.checkpoint_engine  # its process would wait for a commit that never comes
            if getattr(writer, "ckpt_process", None) is not None:
                writer.ckpt_process.kill()
                writer.ckpt_process, writer.commit_info, writer._cleanup_called = None, None, True
            raise
        call = time.perf_counter() - t
        after = _step(engine, width, args.micro_batch)
        blocking.append(call + max(0.0, after - base))
        steps.append(after)
    engine.checkpoint_engine.cleanup()
    return {"save_blocking_s": blocking, "step_s": steps}


def worker(args) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    base = Path(args.dir)
    out = {"zero": {}, "settings": vars(args)}
    for zero in args.zero:
        engine, width, params = _engine(args, zero)
        for _ in range(2):
            _step(engine, width, args.micro_batch)
        rows = {"sync": [], "background": []}
        step = 0
        for r in range(args.repeats):
            order = ("sync", "background") if r % 2 == 0 else ("background", "sync")
            for mode in order:
                res = _toolkit_mode(args, engine, width, base / f"z{zero}-{mode}", zero, mode == "background", step)
                step = res["last_step"]
                rows[mode].append(res)
        out["zero"][zero] = {"params": params, "rows": rows}
        del engine
        dist.barrier()
    if args.decoupled:
        try:
            out["decoupled"] = _decoupled_mode(args, base / "decoupled")
        except Exception as e:  # noqa: BLE001 - reported, the other rows stand
            out["decoupled"] = {"error": f"{type(e).__name__}: {e}"}
    if rank == 0:
        (base / "result.json").write_text(json.dumps(out))
    dist.barrier()
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def report(out: dict, base: Path) -> dict:
    summary = {}
    print(f"{'ZeRO':>4} {'mode':>10} {'saves':>5} {'blocking s (median)':>20} {'save_s (median)':>16} {'step s':>8}")
    for zero, z in out["zero"].items():
        stats = {}
        for mode, runs in z["rows"].items():
            records = [rec for run in runs for rec in run["records"]]
            steps = [s for run in runs for s in run["step_s"]]
            stats[mode] = {
                "blocking_s": statistics.median(r["save_blocking_s"] for r in records),
                "save_s": statistics.median(r["save_s"] for r in records),
                "step_s": statistics.median(steps),
                "saves": len(records),
                "all_blocking_s": [r["save_blocking_s"] for r in records],
            }
            s = stats[mode]
            cells = f"{s['blocking_s']:>20.3f} {s['save_s']:>16.3f} {s['step_s']:>8.3f}"
            print(f"{zero:>4} {mode:>10} {s['saves']:>5} {cells}")
        ratio = stats["background"]["blocking_s"] / stats["sync"]["blocking_s"]
        size = _size(base / f"z{zero}-sync")
        print(
            f"     ZeRO-{zero}: {z['params'] / 1e6:.1f}M parameters, {size / 1e9:.2f} GB per checkpoint; "
            f"background / sync blocking = {ratio:.3f}x (goal <= 0.3x)"
        )
        summary[zero] = {**stats, "ratio": ratio, "params": z["params"], "checkpoint_bytes": size}
    if "decoupled" in out:
        d = out["decoupled"]
        if "error" in d:
            print(f"decoupled (DeepSpeed): failed: {d['error']}")
        else:
            b = statistics.median(d["save_blocking_s"])
            print(
                f"decoupled (DeepSpeed writer process, ZeRO-2): blocking {b:.3f} s median "
                f"({b / summary[2]['sync']['blocking_s']:.3f}x the toolkit's sync save)"
                if 2 in summary
                else ""
            )
            summary["decoupled"] = {"blocking_s": b, "all_blocking_s": d["save_blocking_s"]}
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    base.mkdir(parents=True, exist_ok=True)
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--json",)]
    if args.json:
        i = passed.index(args.json)
        passed = passed[:i] + passed[i + 1 :]
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(args.nproc),
        "--master_port",
        str(_free_port()),
        __file__,
        "--worker",
        "--dir",
        str(base),
        *[a for a in passed if a != "--dir" and a != args.dir],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not (base / "result.json").is_file():
        print(proc.stdout[-4000:], proc.stderr[-6000:], sep="\n")
        return 1
    out = json.loads((base / "result.json").read_text())
    out["zero"] = {int(k): v for k, v in out["zero"].items()}
    summary = report(out, base)
    print(f"wall time {time.time() - started:.0f} s; torch threads per rank: {args.threads}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "raw": out}, indent=2))
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
