"""The chaos soak's short form (issue 24, part 3): a 2-rank CLIP run over an HTTP source that drops
connections, killed with kill -9 mid-step, mid-save and mid-background-write and resumed each time,
ends with the uninterrupted run's train losses, val losses and final weights. The full form (10 kills
and a SIGTERM) is `python benchmarks/chaos.py`; its figures are in benchmarks/README.md."""

import subprocess
import sys

import pytest

from tests.launch import REPO


@pytest.mark.slow
def test_three_kills_at_chosen_moments_end_equal_to_the_uninterrupted_run(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/chaos.py"),
            "--kills",
            "3",
            "--no-sigterm",
            "--steps",
            "22",
            "--eval-every",
            "11",
        ]
        + ["--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    out = p.stdout + p.stderr[-3000:]
    assert p.returncode == 0, out + (tmp_path / "chaos.log").read_text()[-4000:]
    assert "interruptions survived: 3 (3 kill -9, 0 SIGTERM): step (" in out and ", save (" in out, out
    assert "equal: 22 train losses, val losses and final weights match the uninterrupted run bit for bit" in out, out
    dropped = int(out.split("(dropped ")[1].split(")")[0])
    assert dropped >= 3, "the server's dropped connections were met (and retried)"
