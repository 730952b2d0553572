#!/usr/bin/env python
"""What a resume costs the data stream, early and late in a run.

Writes token shards (``--shards`` x ``--per-shard`` windows of ``--seq-len`` + 1 ids), runs one
training stream (batch ``--batch``, shuffle buffer ``--buffer``) to each position in
``--steps``, saves its ``state_dict()``, and times a fresh stream from construction through
``load_state_dict`` to its first batch, in two ways:

  cursor   the saved state as it is: each slot jumps to its cursor (whole shards skipped
           unopened, one shard and one shuffle block re-read)
  replay   the same state without its cursors, as checkpoints written before them: the
           stream replays every batch up to the position (what every resume used to do)

It also reports the shards opened and raw samples read by the resumed stream, and checks that
both ways give the batch the uninterrupted stream gives. The model and DeepSpeed parts of a
resume do not depend on the position; this is the part that did.

    python benchmarks/bench_resume.py --json resume.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from data_pipelines.loader import TextShards, train_loader  # noqa: E402
from data_pipelines.manifest import write_manifest  # noqa: E402


def write_shards(root: Path, shards: int, per_shard: int, seq_len: int) -> TextShards:
    (root / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for s in range(shards):
        name = f"train/shard-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for i in range(per_shard):
                w.write(
                    {"__key__": f"{s:06d}-{i:06d}", "tokens.npy": rng.integers(0, 4096, seq_len + 1, dtype=np.uint16)}
                )
        names.append(name)
    write_manifest(
        root,
        {
            "kind": "text",
            "version": 1,
            "seq_len": seq_len,
            "tokenizer": {"vocab_size": 4096},
            "splits": {
                "train": {"shards": names, "shard_samples": [per_shard] * shards, "samples": shards * per_shard}
            },
        },
    )
    return TextShards(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 1000], help="positions (batches pulled) to resume at")
    p.add_argument("--shards", type=int, default=64, help="train shards written")
    p.add_argument("--per-shard", type=int, default=256, help="windows per shard")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (each holds seq_len + 1 ids)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch size")
    p.add_argument("--buffer", type=int, default=1000, help="shuffle buffer (block) size")
    p.add_argument("--repeats", type=int, default=3, help="timings per (position, way); the median is reported")
    p.add_argument("--data", help="write the shards here (default: a temporary directory)")
    p.add_argument("--json", help="write the full record here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        data = write_shards(Path(args.data or tmp), args.shards, args.per_shard, args.seq_len)
        opts = dict(seed=0, shuffle_buffer=args.buffer)
        rows = []
        for step in args.steps:
            run = train_loader(data, "train", args.batch, 0, 1, **opts)
            for _ in range(step):
                next(run)
            state = run.state_dict()
            want = next(run)["input_ids"]
            epoch = state["slots"]["0"]["cursors"][0]["epoch"]
            for way, saved in (("cursor", state), ("replay", {k: v for k, v in state.items() if k != "slots"})):
                times, io = [], {}
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    resumed = train_loader(data, "train", args.batch, 0, 1, **opts)
                    resumed.load_state_dict(saved)
                    got = next(resumed)["input_ids"]
                    times.append(time.perf_counter() - t0)
                    assert torch.equal(got, want), f"{way} at step {step}: not the uninterrupted stream's batch"
                    io = dict(resumed.dataset.io)
                rows.append(
                    {
                        "step": step,
                        "epoch": epoch,
                        "way": way,
                        "seconds": statistics.median(times),
                        "times": times,
                        "shards_opened": io.get("shards_opened", 0),
                        "samples_read": io.get("raw_samples", 0),
                    }
                )
    by = {(r["step"], r["way"]): r for r in rows}
    print(f"{'step':>6} {'epoch':>5} {'way':>7} {'seconds':>9} {'shards':>7} {'samples':>8}")
    for r in rows:
        print(
            f"{r['step']:>6} {r['epoch']:>5} {r['way']:>7} {r['seconds']:>9.4f} {r['shards_opened']:>7} "
            f"{r['samples_read']:>8}"
        )
    first, last = args.steps[0], args.steps[-1]
    ratios = {way: by[(last, way)]["seconds"] / by[(first, way)]["seconds"] for way in ("cursor", "replay")}
    for way, ratio in ratios.items():
        print(f"{way}: resume at step {last} / at step {first} = {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
