"""Background checkpoint writes on 2 ranks through the deepspeed launcher: the tag is sealed and
`latest` moved only after both ranks' files are written (rank 1's writer slowed), training goes on
meanwhile, and a resume from that checkpoint repeats the run; a full disk on rank 1 alone stops
both ranks with the path and the errno, the previous checkpoint still latest."""

import json
from pathlib import Path

import pytest

from tests.launch import FAULTS, deepspeed_cmd, metrics, run

pytestmark = pytest.mark.slow


def _args(data: Path, out: Path, steps: int, every: int) -> list[str]:
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
        str(steps),
        "--checkpoint-every",
        str(every),
        "--eval-every",
        "0",
        "--no-progress",
    ]


def test_a_background_save_is_sealed_after_every_rank_wrote_and_resumes_exactly(prepared_stdlib, tmp_path):
    out = tmp_path / "run"
    run(deepspeed_cmd(2, ["--slow-write", "1:0.7", "--", *_args(prepared_stdlib, out, 8, 4)], script=FAULTS))
    root = out / "checkpoints"
    seen = [line.split("\t") for line in (out / "slow-write-rank1.txt").read_text().splitlines()]
    assert {tag for tag, _, _ in seen} == {"step_00000004", "step_00000008"}
    assert all(latest != tag for tag, _, latest in seen), f"latest named a tag rank 1 had not written: {seen}"
    for tag in ("step_00000004", "step_00000008"):
        seal = root / tag / "toolkit.json"
        files = json.loads(seal.read_text())["files"]
        assert any(name.startswith("toolkit_rank00001") for name in files), "rank 1's files are in the seal"
        newest_file = max((root / tag / name).stat().st_mtime for name in files)
        assert seal.stat().st_mtime >= newest_file, "sealed after the last file was written"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    order = [(m.get("event"), m.get("step"), m.get("tag")) for m in lines]
    sealed_at = order.index(("checkpoint", 4, "step_00000004"))
    assert any(e is None and s > 4 for e, s, _ in order[:sealed_at]), f"training went on during the write: {order}"
    first = next(m for m in lines if m.get("tag") == "step_00000004")
    assert first["save_s"] > 1.0 > first["save_blocking_s"], first  # rank 1 slept 2 x 0.7 s in its writer
    assert (root / "latest").read_text() == "step_00000008"
    assert run(["pretrain-ckpt", "verify", str(out)]).returncode == 0

    reference = [m["loss"] for m in metrics(out)[0]]
    p = run(deepspeed_cmd(2, [*_args(prepared_stdlib, out, 8, 4), "--resume", str(root / "step_00000004")]))
    assert "resumed from" in p.stdout and "step_00000004" in p.stdout
    resumed = metrics(out)[0]
    assert [m["step"] for m in resumed] == list(range(1, 9))
    assert [m["loss"] for m in resumed] == pytest.approx(reference, rel=1e-6)


def test_a_full_disk_on_one_rank_stops_every_rank_and_latest_stays(prepared_stdlib, tmp_path):
    out = tmp_path / "run"
    p = run(
        deepspeed_cmd(2, ["--disk-full-at", "4:1", "--", *_args(prepared_stdlib, out, 8, 2)], script=FAULTS),
        check=False,
    )
    assert p.returncode != 0
    text = p.stdout + p.stderr
    assert "rank 1: could not write" in text and "step_00000004/" in text and "[Errno 28 ENOSPC]" in text, text[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (out / "checkpoints" / "step_00000004").exists()
