"""Reading back what the trackers wrote, for the tests: wandb offline runs (the .wandb transaction log,
LevelDB log framing around protobuf records) and an MLflow file store; and a network guard."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from pretrain.runtime.trackers import scalars, transaction_log


def expected_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] from metrics.jsonl, as the trackers should hold it (event lines aside)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" in record:
            continue
        for k, v in scalars(record).items():
            out.setdefault(k, []).append((int(record["step"]), float(v)))
    return out


def wandb_offline(run_dir: Path) -> tuple[set[str], dict[str, list[tuple[int, float]]], list[dict]]:
    """(run ids, key -> [(step, value)] over every offline segment in step order, configs logged)."""
    ids, series, configs = set(), {}, []
    rows = []
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for r in transaction_log(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
            elif kind == "config":
                configs.append({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                rows.append((r.history.step.num, items))
    for step, items in sorted(rows, key=lambda x: x[0]):
        for k, v in items.items():
            if not k.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                series.setdefault(k, []).append((step, float(v)))
    return ids, series, configs


def mlflow_runs(run_dir: Path) -> list[tuple[str, dict[str, list[tuple[int, float]]], dict]]:
    """Every run of the file store RUN/mlruns: (run id, key -> [(step, value)] by step, params)."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    out = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            series = {}
            for key in run.data.metrics:
                hist = client.get_metric_history(run.info.run_id, key)
                series[key] = sorted(((m.step, m.value) for m in hist), key=lambda x: x[0])
            out.append((run.info.run_id, series, run.data.params))
    return out


GUARD = """
import os, socket
_real = socket.socket.connect
def _guarded(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
        with open(os.environ["NET_GUARD_LOG"], "a") as fh:
            fh.write(f"{os.getpid()} {address}\\n")
        raise OSError("network connection refused by the test's guard: " + repr(address))
    return _real(self, address)
socket.socket.connect = _guarded
socket.socket.connect_ex = lambda self, a: (_guarded(self, a), 0)[1]
"""


def install_guard(folder: Path) -> dict[str, str]:
    """A sitecustomize that refuses (and records) every non-loopback connect of any Python process
    started with the returned environment."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(GUARD)
    path = f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {"PYTHONPATH": path, "NET_GUARD_LOG": str(folder / "attempts.log")}


def remote_sockets(pids: list[int]) -> set[str]:
    """Non-loopback TCP peers of the sockets these processes hold now (for wandb-core, a Go binary the
    Python guard cannot see): their socket inodes looked up in /proc/net/tcp{,6}."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    peers = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                peer = cols[2].split(":")[0]
                if peer.lstrip("0") and not _loopback(peer):
                    peers.add(cols[2])
    return peers


def _loopback(hexaddr: str) -> bool:
    if len(hexaddr) == 8:  # IPv4, little-endian
        return socket.inet_ntoa(bytes.fromhex(hexaddr)[::-1]).startswith("127.")
    raw = b"".join(bytes.fromhex(hexaddr[i : i + 8])[::-1] for i in range(0, 32, 8))
    addr = socket.inet_ntop(socket.AF_INET6, raw)
    return addr == "::1" or addr.startswith("::ffff:127.")
