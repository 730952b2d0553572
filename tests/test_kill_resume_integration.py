"""kill -9 of the whole deepspeed job, between checkpoints and in the middle of a save, then
`--resume auto`: the losses step by step are those of a run that was never interrupted."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch import FAULTS, REPO, deepspeed_cmd, env, kill_tree, metrics, run

pytestmark = pytest.mark.slow
STEPS = 16


def _args(data: Path, out: Path) -> list[str]:
    return [
        "--config",
        "gpt-tiny",
        "--deepspeed_config",
        "ds_configs/zero2_fp32.json",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        str(STEPS),
        "--checkpoint-every",
        "4",
        "--eval-every",
        "8",
        "--no-progress",
    ]


def _kill_job_when(cmd: list[str], ready, extra_env: dict | None = None, timeout: float = 300) -> None:
    """Start the job, wait until ready() holds, then SIGKILL the launcher and every rank at once."""
    e = {**env(), **(extra_env or {})}
    proc = subprocess.Popen(
        cmd, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, (
                f"job ended (exit {proc.returncode}) before the kill:\n{proc.stdout.read()[-3000:]}"
            )
            assert time.time() < deadline, "timed out waiting for the kill point"
            time.sleep(0.2)
    finally:
        kill_tree(proc, cmd[cmd.index("--master_port") + 1])


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def test_kill_9_between_checkpoints_and_during_a_save_then_resume_repeats_the_uninterrupted_run(
    prepared_stdlib, tmp_path
):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    run(deepspeed_cmd(2, _args(prepared_stdlib, ref)))

    # Kill 1: between checkpoints (after step 6 is logged; the last complete checkpoint is step 4).
    _kill_job_when(deepspeed_cmd(2, _args(prepared_stdlib, out)), lambda: _steps_logged(out) >= 6)
    first_latest = _latest(out)
    assert first_latest in ("step_00000004", "step_00000008")

    # Kill 2: every rank inside the save of step 12 (files written, not sealed, latest not moved).
    _kill_job_when(
        deepspeed_cmd(2, ["--stall-in-save", "12", "--", *_args(prepared_stdlib, out)], script=FAULTS),
        lambda: all((out / f"stalled-in-save-rank{r}").is_file() for r in range(2)),
    )
    assert _latest(out) == "step_00000008", "a half-written checkpoint is never named by latest"
    half = out / "checkpoints" / "step_00000012"
    assert half.is_dir() and not (half / "toolkit.json").exists()

    # Resume to the end.
    for marker in out.glob("stalled-in-save-rank*"):
        marker.unlink()
    p = run(deepspeed_cmd(2, _args(prepared_stdlib, out)))
    assert "resumed from" in p.stdout and "step_00000008" in p.stdout

    (t_ref, e_ref), (t_out, e_out) = metrics(ref), metrics(out)
    assert [m["step"] for m in t_out] == list(range(1, STEPS + 1)), "metrics.jsonl reads as one run"
    assert [m["loss"] for m in t_out] == pytest.approx([m["loss"] for m in t_ref], rel=1e-6)
    assert [m["lr"] for m in t_out] == pytest.approx([m["lr"] for m in t_ref], rel=1e-9)
    assert [m["samples"] for m in t_out] == [m["samples"] for m in t_ref]
    assert [e["loss"] for e in e_out] == pytest.approx([e["loss"] for e in e_ref], rel=1e-6)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "event" in line]
    assert [e["event"] for e in events if e["event"] != "checkpoint"] == ["resumed", "resumed"]
    assert (out / "metrics-discarded.jsonl").is_file(), "lines logged after the last checkpoint are kept aside"
    assert _latest(out) == f"step_{STEPS:08d}" and (half / "toolkit.json").is_file()
