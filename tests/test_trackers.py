"""logging.report_to: wandb (offline) and MLflow (file store) beside metrics.jsonl. Every scalar of a
metrics.jsonl line reaches both trackers once, at its step, also across kill -9 and resume; nothing
connects to the network; a tracker that is not installed is refused before training, naming its extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.runtime.metrics import MetricsLogger, rewind
from pretrain.runtime.trackers import Trackers, scalars, tracker_problems
from tests.launch import REPO, env, prepare_small_corpus
from tests.tracker_reads import expected_series, install_guard, mlflow_runs, remote_sockets, wandb_offline

OFFLINE = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_ERROR_REPORTING": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The trackers' environment offline, with every non-loopback connect of this process refused and
    recorded, and the TCP peers of this process and its children (wandb-core) checked at the end."""
    import socket

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # not the user's ~/.config/wandb
    attempts, real = [], socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"network connection refused by the test: {address!r}")
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield
    assert attempts == [], f"connections attempted: {attempts}"
    assert not remote_sockets(_tree(os.getpid())), "a non-loopback TCP peer"


def test_scalars_are_named_as_tensorboard_names_them():
    rec = {
        "step": 3,
        "loss": 2.5,
        "lr": 1e-3,
        "flag": True,
        "unit": "tokens/s",
        "mfu": None,
        "samples_by_source": {"a": 4, "b": 2},
    }
    assert scalars(rec) == {
        "train/loss": 2.5,
        "train/lr": 1e-3,
        "train/samples_by_source/a": 4,
        "train/samples_by_source/b": 2,
    }
    assert scalars({"step": 4, "split": "eval", "hellaswag": {"acc": 0.5}}) == {"eval/hellaswag/acc": 0.5}


def test_a_tracker_that_is_not_installed_is_named_with_its_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    (problem,) = tracker_problems(["tensorboard", "wandb", "mlflow"])
    assert problem.startswith("logging.report_to: 'wandb'") and "pip install .[wandb]" in problem
    assert tracker_problems(["tensorboard"]) == []


@pytest.mark.slow  # prepare() loads transformers and DeepSpeed: ~25 s in a fresh worker
def test_pretrain_train_refuses_a_missing_tracker_before_any_rank_starts(corpus, tmp_path, monkeypatch, capsys):
    """The refusal comes from prepare(), before the process group: no run directory is written."""
    import importlib.util

    from pretrain.train import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    recipe = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    recipe["logging"] = {"report_to": ["tensorboard", "mlflow"]}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    out = tmp_path / "out"
    code = main(
        ["--config", str(tmp_path / "r.json"), "--data", str(corpus), "--output-dir", str(out), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert "logging.report_to: 'mlflow' needs the mlflow package" in err and "pip install .[mlflow]" in err
    assert not out.exists(), "nothing written: refused before the run started"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_small_corpus(tmp_path_factory.mktemp("trk") / "data", 3, 5_000, 9_000, 400, 20)


def _line(step: int, **kw) -> dict:
    return {"step": step, "loss": 10.0 / step, "lr": 1e-3 * step, "samples_by_source": {"a": step}, **kw}


def _seal(run_dir: Path, step: int) -> None:
    tag = run_dir / "checkpoints" / f"step_{step:08d}"
    tag.mkdir(parents=True, exist_ok=True)
    (tag / "toolkit.json").write_text(json.dumps({"step": step}))
    (run_dir / "checkpoints" / "latest").write_text(tag.name)


def _logger(run_dir: Path, fresh: bool) -> MetricsLogger:
    trackers = Trackers(
        run_dir,
        ["tensorboard", "wandb", "mlflow"],
        {"recipe": {"name": "t", "training": {"lr": 1}}},
        "tracker-test",
        fresh,
    )
    return MetricsLogger(run_dir, tensorboard=False, append=not fresh, trackers=trackers)


def test_trackers_take_only_sealed_steps_so_a_resume_logs_no_step_twice(offline, tmp_path):
    """A process that dies after step 7 with step 4 sealed: steps 5-7 never reach the trackers; the
    resumed process rewinds metrics.jsonl to 4 and feeds 5.. once; the end of the run feeds the rest."""
    run_dir = tmp_path / "run"
    m = _logger(run_dir, fresh=True)
    for step in range(1, 8):
        m.log(_line(step))
        if step == 6:
            m.log({"step": 6, "split": "val", "loss": 3.0, "perplexity": 20.0})
        if step == 4:
            _seal(run_dir, 4)
    state = json.loads((run_dir / "trackers.json").read_text())
    assert state["lines"] == 4, "steps 5-7 wait for a sealed checkpoint"
    m._fh.close()  # the process dies: no close(), no finish
    for backend in m._trackers.backends:
        if hasattr(backend, "run"):
            backend.run.finish(exit_code=1)  # (in-process the wandb run must end before another starts)

    assert rewind(run_dir, 4) == 4  # the resume: lines of steps 5-7 (one of them val) set aside
    m = _logger(run_dir, fresh=False)
    m.log({"step": 4, "event": "resumed", "world_size": 1})
    for step in range(5, 10):
        m.log(_line(step, loss=1.0 / step))  # different values than the dead process logged
    m.log({"step": 9, "split": "val", "loss": 2.0, "perplexity": 7.4})
    m.close(finished=True)

    expected = expected_series(run_dir)
    assert [s for s, _ in expected["train/loss"]] == list(range(1, 10))
    assert expected["val/loss"] == [(9, 2.0)]
    ids, series, configs = wandb_offline(run_dir)
    assert len(ids) == 1, f"one wandb run continued by id: {ids}"
    assert series == expected
    assert configs and configs[0]["recipe"]["training"] == {"lr": 1}
    (run,) = mlflow_runs(run_dir)
    assert run[1] == expected and run[2]["training.lr"] == "1"


def test_a_fresh_start_opens_new_tracker_runs(offline, tmp_path):
    run_dir = tmp_path / "run"
    m = _logger(run_dir, fresh=True)
    m.log(_line(1))
    m.close(finished=True)
    first = json.loads((run_dir / "trackers.json").read_text())
    m = _logger(run_dir, fresh=True)  # --resume none over the same directory
    m.log(_line(1))
    m.close(finished=True)
    second = json.loads((run_dir / "trackers.json").read_text())
    assert first["wandb"]["id"] != second["wandb"]["id"] and first["mlflow"]["run_id"] != second["mlflow"]["run_id"]
    assert second["lines"] == 1


# ------------------------------------------------------------------ a real run, kill -9 and resume


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _watch(proc: subprocess.Popen, until, peers: set[str], timeout: float = 240) -> None:
    """Poll the job's sockets (wandb-core included) until ``until()`` or the job ends."""
    deadline = time.time() + timeout
    while proc.poll() is None and not until():
        peers |= remote_sockets(_tree(proc.pid))
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def _kill(proc: subprocess.Popen) -> None:
    for pid in reversed(_tree(proc.pid)):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def _fed(out: Path) -> int:
    try:
        return json.loads((out / "trackers.json").read_text())["lines"]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-replace
        return 0


def _steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(x).get("step", 0) for x in lines if x.endswith("}")), default=0)


@pytest.mark.slow
def test_kill_9_and_resume_leave_one_wandb_and_one_mlflow_run_equal_to_metrics_jsonl(corpus, tmp_path):
    recipe = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    recipe["training"].update(max_steps=10, warmup_steps=2)
    recipe["eval"].update(every=3, max_samples=16)
    recipe["checkpoint"].update(every=4)
    recipe["logging"] = {"report_to": ["tensorboard", "wandb", "mlflow"], "project": "trk"}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "pretrain/train.py"),
        "--config",
        str(tmp_path / "r.json"),
        "--data",
        str(corpus),
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    job_env = {**env(), **OFFLINE, **install_guard(tmp_path / "guard")}
    # an in-process test of this worker started a wandb service and named it in os.environ: the job gets its own
    job_env.pop("WANDB_SERVICE", None)
    job_env["PYTHONPATH"] += os.pathsep + str(REPO)
    job_env["WANDB_CONFIG_DIR"] = str(tmp_path / "wandb-config")
    peers: set[str] = set()

    proc = subprocess.Popen(cmd, env=job_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # killed once the trackers took the sealed steps (the save is sealed in the background, maybe steps
        # later) and metrics.jsonl holds lines after them
        _watch(proc, lambda: _steps(out) >= 6 and _fed(out) > 0, peers)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
    finally:
        _kill(proc)
    fed = json.loads((out / "trackers.json").read_text())["lines"]
    written = len((out / "metrics.jsonl").read_text().splitlines())
    assert 0 < fed < written, "the lines after the sealed step 4 were held back from the trackers"

    proc = subprocess.Popen(cmd, env=job_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _watch(proc, lambda: False, peers)
    finally:
        log = proc.stdout.read()
        _kill(proc)
    assert proc.returncode == 0, log[-4000:]
    assert (out / "metrics-discarded.jsonl").is_file(), "the resume threw away steps the killed run had logged"

    expected = expected_series(out)
    assert [s for s, _ in expected["train/loss"]] == list(range(1, 11))
    assert [s for s, _ in expected["val/loss"]] == [3, 6, 9, 10]
    ids, series, configs = wandb_offline(out)
    assert len(ids) == 1 and len(list((out / "wandb").glob("offline-run-*"))) == 2, "one run id, two segments"
    assert series == expected, "every scalar of metrics.jsonl, each step once"
    assert any(c.get("recipe", {}).get("logging", {}).get("project") == "trk" for c in configs)
    assert any("resolved" in c for c in configs), "the resolved config is the run's config too"
    (mlf,) = mlflow_runs(out)
    assert mlf[1] == expected and mlf[2]["training.max_steps"] == "10"
    assert not (tmp_path / "guard" / "attempts.log").exists(), (tmp_path / "guard" / "attempts.log").read_text()
    assert not peers, f"non-loopback TCP peers seen: {peers}"
