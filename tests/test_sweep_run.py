"""A real sweep (pretrain-sweep running pretrain/train.py for each point) killed with kill -9 while its
second point trains, then rerun: the finished point is not redone, the interrupted one resumes from
its checkpoint, and sweep.jsonl reads both runs back with the planner's FLOPs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from pretrain.runtime.flops import total_flops
from pretrain.sweep.runner import is_finished
from tests.launch import REPO, env, module_cmd, prepare_small_corpus, run

STEPS = 150


@pytest.mark.slow
def test_a_sweep_killed_with_kill_9_resumes_without_redoing_finished_points(tmp_path):
    data = prepare_small_corpus(
        tmp_path / "data", files=12, min_bytes=2_000, max_bytes=20_000, vocab_size=320, samples_per_shard=4096
    )
    out = tmp_path / "sweep"
    cmd = module_cmd(
        "pretrain.cli.sweep",
        ["--config", "gpt-tiny", "--data", str(data), "--grid", "lr=3e-3,1e-2", "--grid", "size=32",
         "--grid", "batch=4", "--steps", str(STEPS), "--checkpoint-every", "50", "--eval-samples", "32",
         "--output", str(out), "--bootstrap", "0", "--no-plots", "--no-progress"],
    )  # fmt: skip
    first, second = out / "points" / "lr0.003-size32-batch4", out / "points" / "lr0.01-size32-batch4"
    # its own session, so that the kill takes the sweep and its trainer at once, as a lost node would
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 120
    try:
        while not (is_finished(first, STEPS) and (second / "checkpoints" / "latest").is_file()):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the sweep did not reach its second point's first checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not is_finished(second, STEPS), "the second point ended before the kill: raise STEPS"
    done_metrics = (first / "metrics.jsonl").read_bytes()
    done_mtime = (first / "metrics.jsonl").stat().st_mtime_ns

    p = run(cmd, timeout=180)
    assert "1 of 2 points already finished: skipped" in p.stdout
    assert (first / "metrics.jsonl").read_bytes() == done_metrics  # not retrained, not even restarted
    assert (first / "metrics.jsonl").stat().st_mtime_ns == done_mtime
    assert (out / "logs" / "lr0.003-size32-batch4.log").read_text().count("pretrain/train.py --config") == 1
    events = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.get("event") == "resumed"]
    assert resumed and resumed[0]["step"] >= 50  # continued from its checkpoint, not from step 0
    steps = [e["step"] for e in events if "split" not in e and "event" not in e]
    assert steps == list(range(1, STEPS + 1))  # one uninterrupted history after the rewind

    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == [first.name, second.name]
    for r, run_dir in zip(rows, (first, second)):
        resolved = json.loads((run_dir / "resolved-config.json").read_text())
        assert r["status"] == "done" and r["params"] == resolved["parameters"]["total"]
        assert r["tokens"] == STEPS * 4 * 32
        assert r["flops"] == total_flops(r["params"], r["tokens"])
        assert r["val_loss"] is not None and r["val_loss"] < r["initial_loss"]
        assert not r["diverged"] and r["curve"]
    assert "size32" in p.stdout and "done" in p.stdout  # the table
