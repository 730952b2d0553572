"""SIGTERM (what SLURM sends before the time limit) to every rank: finish the step, save, exit 75, resume."""

import json
import signal
import subprocess
import time

import psutil
import pytest

from tests.launch import REPO, deepspeed_cmd, env, metrics, run

pytestmark = pytest.mark.slow


def test_sigterm_saves_a_checkpoint_exits_75_and_the_run_resumes(prepared_stdlib, tmp_path):
    out = tmp_path / "run"
    args = [
        "--config",
        "gpt-tiny",
        "--deepspeed_config",
        "ds_configs/zero2_fp32.json",
        "--data",
        str(prepared_stdlib),
        "--output-dir",
        str(out),
        "--eval-every",
        "0",
        "--checkpoint-every",
        "0",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        deepspeed_cmd(2, [*args, "--max-steps", "100000"]),
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    ranks = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "train.py" in " ".join(p.cmdline()) and any(a.startswith("--local_rank") for a in p.cmdline())
    ]
    assert len(ranks) == 2
    for p in ranks:
        p.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, output[-3000:]
    train, _ = metrics(out)
    last = train[-1]["step"]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"
    assert (out / "checkpoints" / f"step_{last:08d}" / "toolkit.json").is_file()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "event" in line]
    assert events and events[-1]["event"] == "preempted"

    p = run(deepspeed_cmd(2, [*args, "--max-steps", str(last + 2)]))
    assert "resumed from" in p.stdout
    assert [m["step"] for m in metrics(out)[0]] == list(range(1, last + 3))
