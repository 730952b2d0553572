"""Chaos soak: one 2-rank CLIP training over an HTTP source that drops connections, killed with
kill -9 at chosen moments (mid-step, mid-save, mid-background-write, mid-evaluation, mid-fetch) and
stopped once with SIGTERM, resumed with the same command each time; then compared with an
uninterrupted run of the same seed: every train loss step by step, every val loss, the final
weights. Equal, or it prints where they differ.

    python benchmarks/chaos.py                                  # the full form: 10 kills and a SIGTERM
    python benchmarks/chaos.py --kills 3 --no-sigterm --steps 22 --eval-every 11   # tests/test_chaos.py

Exit 0 when every interruption was survived and the runs agree bit for bit, 1 otherwise. Each
launch first seals a checkpoint of its own before its interruption, so the run moves forward. The data are
synthetic shapes (make-synthetic-image-text) served from a loopback ThreadingHTTPServer that drops
every 7th connection inside the body (the loader retries and passes over the samples it has), so
the resumed runs also meet the retry path. Each kill takes the launcher and every rank at once
(SIGKILL to the process tree); the hooks of `benchmarks/chaos_worker.py` say where the run is.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER = str(REPO / "benchmarks" / "chaos_worker.py")
PHASES = ("step", "save", "write", "eval", "fetch")


class DroppingHandler(SimpleHTTPRequestHandler):
    """Serves the folder; every 7th GET of a shard sends its headers and half its body, then drops the
    connection (never twice in a row for one shard). With ``hold`` set, the next shard GET waits 5 s
    before answering (``held`` is set meanwhile): a fetch in flight for a kill to land in."""

    server_version = "chaos"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        name = self.path.rsplit("/", 1)[-1]
        if not name.endswith(".tar"):
            return super().do_GET()
        with srv.lock:
            srv.count += 1
            drop = srv.count % 7 == 0 and srv.last_dropped != name
            srv.last_dropped = name if drop else None
            hold, srv.hold = srv.hold, False
            if hold:
                srv.held.set()
        if hold:
            time.sleep(5)
        if not drop:
            return super().do_GET()
        body = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


def serve(folder: Path) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(DroppingHandler, directory=str(folder)))
    srv.daemon_threads = True
    srv.lock, srv.count, srv.last_dropped = threading.Lock(), 0, None
    srv.hold, srv.held = False, threading.Event()
    srv.handle_error = lambda request, address: None  # a client killed mid-answer is the point, not an error
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    e.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "LOCAL_WORLD_SIZE"):
        e.pop(k, None)
    return e


def make_data(work: Path) -> Path:
    data = work / "shapes"
    if not (data / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "data_pipelines.image.synthetic", "--output", str(data), "--count", "480"]
            + ["--image-size", "32", "--samples-per-shard", "32", "--val-fraction", "0.05", "--test-fraction", "0.05"]
            + ["--no-progress", "--overwrite"],
            check=True,
            env=env(),
            cwd=REPO,
            capture_output=True,
        )
    return data


def recipe(work: Path, data: Path, port: int, steps: int, eval_every: int) -> Path:
    shards = sorted(p.name for p in (data / "train").glob("shard-*.tar"))
    r = json.loads((REPO / "pretrain/recipes/clip-tiny.json").read_text())
    r["data"] = {
        "path": f"http://127.0.0.1:{port}/train/shard-{{{shards[0][6:12]}..{shards[-1][6:12]}}}.tar",
        "tokenizer": str(data / "tokenizer"),
        "shuffle_buffer": 64,
        "num_workers": 0,
        "augment": False,
        "holdout_fraction": 0.1,
        "fetch_retries": 4,
        "fetch_backoff": 0.05,
        "fetch_timeout": 30,
    }
    r["training"].update(micro_batch_size=16, max_steps=steps, warmup_steps=4, log_every=1)
    r["eval"] = {"every": eval_every, "max_samples": 32}
    r["checkpoint"] = {"every": 4, "keep_last": 3}
    path = work / "chaos-recipe.json"
    path.write_text(json.dumps(r, indent=2))
    return path


def launch(recipe_path: Path, run: Path, markers: Path, log) -> tuple[subprocess.Popen, str]:
    port = str(free_port())
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", port, WORKER, str(markers), "--"]
    cmd += ["--config", str(recipe_path), "--output-dir", str(run), "--no-progress"]
    return subprocess.Popen(
        cmd, env=env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    ), port


def kill_tree(proc: subprocess.Popen, port: str) -> None:
    import psutil

    try:
        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        tree = []
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    for leftover in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        os.remove(leftover)


def ranks_of(proc: subprocess.Popen):
    import psutil

    return [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "chaos_worker.py" in " ".join(p.cmdline()) and any(a.startswith("--local_rank") for a in p.cmdline())
    ]


def marker(markers: Path, phase: str, since: float) -> tuple[int, float] | None:
    """(step, time) of the newest mark of ``phase`` on any rank after ``since``."""
    best = None
    for f in markers.glob(f"{phase}-rank*"):
        try:
            _, step, at = f.read_text().split()
        except (OSError, ValueError):
            continue
        if float(at) > since and (best is None or float(at) > best[1]):
            best = (int(step), float(at))
    return best


def sealed_step(run: Path) -> int:
    """The step of the checkpoint ``latest`` names (0 before the first)."""
    try:
        return int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    except (OSError, ValueError):
        return 0


def interrupt(
    proc: subprocess.Popen, port: str, phase: str, run: Path, markers: Path, srv, rng: random.Random
) -> str | None:
    """Wait until this launch has sealed a checkpoint of its own (so every launch makes progress),
    then for ``phase``, then kill -9 the whole job (or SIGTERM its ranks for ``sigterm``); None when
    the run ended first. Returns what was hit."""
    resumed, progressed = sealed_step(run), None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progressed is None and sealed_step(run) > resumed:
            progressed = time.time()
        if progressed is not None:
            if phase in ("step", "sigterm") and marker(markers, "step", progressed):
                break
            if phase in ("save", "write", "eval") and marker(markers, phase, progressed):
                break
            if phase == "fetch":
                with srv.lock:  # ask the server to hold the next shard request (once)
                    if not srv.held.is_set():
                        srv.hold = True
                if srv.held.is_set():
                    break
        time.sleep(0.02)
    else:
        with srv.lock:
            srv.hold = False
        return None
    time.sleep(rng.uniform(0.0, 0.15) if phase not in ("fetch", "sigterm") else 0.0)
    if phase == "sigterm":
        for p in ranks_of(proc):
            p.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
        return f"sigterm at step {sealed_step(run)} (exit {proc.returncode})" if proc.returncode == 75 else None
    kill_tree(proc, port)
    with srv.lock:
        srv.hold = False
        srv.held.clear()
    return f"{phase} (resumes from step {sealed_step(run)})"


def train_losses(run: Path) -> tuple[dict[int, float], dict[int, float]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = {x["step"]: x["loss"] for x in lines if "loss" in x and "split" not in x and "event" not in x}
    val = {x["step"]: x["loss"] for x in lines if x.get("split") == "val"}
    return train, val


def final_weights(run: Path, steps: int) -> dict:
    import torch

    path = run / "checkpoints" / f"step_{steps:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]  # our own run's file


def compare(base: Path, chaos: Path, steps: int) -> list[str]:
    problems = []
    (bt, bv), (ct, cv) = train_losses(base), train_losses(chaos)
    if sorted(ct) != sorted(bt):
        problems.append(
            f"train steps logged differ: missing {sorted(set(bt) - set(ct))}, extra {sorted(set(ct) - set(bt))}"
        )
    for s in sorted(set(bt) & set(ct)):
        if bt[s] != ct[s]:
            problems.append(f"train loss differs first at step {s}: {ct[s]!r} vs uninterrupted {bt[s]!r}")
            break
    if bv != cv:
        problems.append(f"val losses differ: {cv} vs uninterrupted {bv}")
    wb, wc = final_weights(base, steps), final_weights(chaos, steps)
    differing = [k for k in wb if not torch_equal(wb[k], wc[k])]
    if differing:
        scale = max(float(w.abs().max()) for w in wb.values())
        worst = max(float((wb[k] - wc[k]).abs().max()) for k in differing) / scale
        problems.append(
            f"final weights differ in {len(differing)} tensors, first {differing[0]} (largest difference "
            f"{worst:.2e} of the largest weight)"
        )
    return problems


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmarks/chaos.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--kills", type=int, default=10, help="kill -9s to survive (default 10), cycling through the phases")
    p.add_argument("--no-sigterm", action="store_true", help="leave out the SIGTERM (a preemption: save, exit 75)")
    p.add_argument("--steps", type=int, default=90, help="optimizer steps of the run (default 90)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=6,
        help="evaluate every N steps (default 6; each evaluation reads the hold-out over HTTP)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the kill timing")
    p.add_argument("--workdir", help="where data and runs go (default: a temporary folder, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    start = time.time()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = make_data(work)
        srv = serve(data)
        rec = recipe(work, data, srv.server_address[1], args.steps, args.eval_every)
        base, run = work / "uninterrupted", work / "chaos"
        for d in (base, run, work / "markers-base", work / "markers"):
            shutil.rmtree(d, ignore_errors=True)
        with open(work / "uninterrupted.log", "w") as log:
            proc, _ = launch(rec, base, work / "markers-base", log)
            if proc.wait() != 0:
                print(f"the uninterrupted run failed: see {work / 'uninterrupted.log'}")
                return 1
        plan = [PHASES[i % len(PHASES)] for i in range(args.kills)]
        if not args.no_sigterm:
            plan.insert(len(plan) // 2, "sigterm")
        survived: list[str] = []
        markers = work / "markers"
        launches = 0
        with open(work / "chaos.log", "w") as log:
            for phase in plan:
                launches += 1
                proc, port = launch(rec, run, markers, log)
                hit = interrupt(proc, port, phase, run, markers, srv, rng)
                if hit is None:
                    proc.wait()
                    print(f"launch {launches}: the run ended before a {phase} to interrupt (exit {proc.returncode})")
                    break
                survived.append(hit)
                print(f"launch {launches}: {hit}", flush=True)
            launches += 1
            proc, _ = launch(rec, run, markers, log)
            rc = proc.wait()
        kills = sum(1 for s in survived if not s.startswith("sigterm"))
        wall = time.time() - start
        print(
            f"interruptions survived: {len(survived)} ({kills} kill -9, {len(survived) - kills} SIGTERM): "
            + ", ".join(survived)
        )
        print(f"launches {launches}, fetches {srv.count} (dropped {srv.count // 7}), wall time {wall:.0f} s")
        if rc != 0:
            print(f"the last launch exited {rc}: see {work / 'chaos.log'}")
            return 1
        problems = compare(base, run, args.steps)
        for line in problems:
            print(f"DIFFERS: {line}")
        if not problems:
            print(
                f"equal: {args.steps} train losses, val losses and final weights match the uninterrupted run "
                "bit for bit"
            )
        short = len(survived) < len(plan)
        if short:
            print(f"only {len(survived)} of {len(plan)} planned interruptions happened (raise --steps)")
        return 1 if problems or short else 0
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
