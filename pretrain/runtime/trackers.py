"""Weights & Biases and MLflow beside metrics.jsonl: the same scalars, each (key, step) once, across
kill -9, resume and a loss-spike rewind.

The trackers are fed from metrics.jsonl itself, and only with the lines no resume can take back.
A resumed run rewinds metrics.jsonl to its checkpoint (`metrics.rewind` moves the later lines to
metrics-discarded.jsonl), but a wandb run cannot un-log a step and MLflow would keep both values.
So a line reaches the trackers once its step is at or before the newest *sealed* checkpoint (the
steps a resume keeps) or when the run finishes; how many lines the tracker runs were fed is kept
with their ids in RUN/trackers.json, and a resumed process continues the same tracker runs from
that line. The cost: a tracker lags metrics.jsonl by up to checkpoint.every steps (TensorBoard
does not: it is written at once, and shows the steps a killed run logged after its checkpoint).

Event lines ("event": resumed, preempted, rewind, ...) mark a moment rather than a curve, and a
resume logs them at a step the tracker already has: they stay in metrics.jsonl only.

Nothing here connects anywhere unless asked: wandb follows WANDB_MODE (offline writes
RUN/wandb/offline-run-* for a later `wandb sync`), MLflow defaults to a file: store under RUN,
and both libraries' telemetry / error reporting is turned off unless the environment says otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "mlflow")
# report_to name -> (module to import, pip extra that installs it)
PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
STATE = "trackers.json"


def tracker_problems(report_to: list[str]) -> list[str]:
    """One line per tracker whose package is missing, naming the extra: checked before any rank starts."""
    problems = []
    for name in report_to:
        module, extra = PACKAGES.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            problems.append(
                f"logging.report_to: {name!r} needs the {module} package, which is not installed here "
                f"(pip install .[{extra}])"
            )
    return problems


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl line under the names TensorBoard shows them: SPLIT/key (train
    when the line has no split) and SPLIT/key/name for a dict of numbers (samples_by_source,
    eval/<task>/<metric>)."""
    prefix = record.get("split", "train")
    out: dict[str, float] = {}
    for k, v in record.items():
        if k in ("step", "split"):
            continue
        if _number(v):
            out[f"{prefix}/{k}"] = v
        elif isinstance(v, dict):
            for name, n in v.items():
                if _number(n):
                    out[f"{prefix}/{k}/{name}"] = n
    return out


def sealed_step(run_dir: Path) -> int | None:
    """The step of the checkpoint a resume would load now (None: none yet)."""
    from pretrain.runtime.checkpoint import TAG_PREFIX, resumable

    try:
        tag = resumable(run_dir / "checkpoints")
    except ValueError:  # a tampered `latest`: nothing counts as sealed
        return None
    return int(tag.name[len(TAG_PREFIX) :]) if tag is not None else None


class Trackers:
    """The wandb / MLflow runs of one training run, fed from its metrics.jsonl by the process that writes it."""

    def __init__(
        self,
        run_dir: str | Path,
        report_to: list[str],
        config: dict[str, Any],
        project: str,
        fresh: bool,
        mlflow_tracking_uri: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.names = [n for n in report_to if n in PACKAGES]
        self.config, self.project, self.fresh, self.mlflow_uri = config, project, fresh, mlflow_tracking_uri
        self.backends: list[Any] = []
        self._offset = 0

    def start(self) -> None:
        """Open (or continue) the tracker runs; metrics.jsonl is already rewound or truncated for this process."""
        state_path = self.run_dir / STATE
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if self.fresh and state.get("lines", 0):
            state = {}  # a run started over (--resume none): new tracker runs for the new history
        state.setdefault("lines", 0)
        self.state = state
        self._offset = self._skip_lines(state["lines"])
        _quiet_telemetry()
        for name in self.names:
            cls = WandbRun if name == "wandb" else MlflowRun
            self.backends.append(cls(self.run_dir, state.setdefault(name, {}), self.config, self.project, self))
        self._save()
        for backend in self.backends:
            if isinstance(backend, WandbRun):
                self._backfill(backend)

    def _backfill(self, backend: WandbRun) -> None:
        """wandb-core writes its transaction log every 15 s, so a kill -9 loses the steps it was given
        last: give them again, from metrics.jsonl, after the last step its files hold."""
        held = backend.steps_on_disk()
        by_step: dict[int, dict[str, float]] = {}
        with self.path.open("rb") as fh:
            for raw in fh.read(self._offset).splitlines():
                record = json.loads(raw)
                step = int(record.get("step", 0))
                if "event" not in record and step > held:
                    by_step.setdefault(step, {}).update(scalars(record))
        if by_step:
            backend.log(by_step)

    def _skip_lines(self, n: int) -> int:
        """The byte offset after the first ``n`` complete lines of metrics.jsonl (those already fed)."""
        kept, offset = 0, 0
        if n and self.path.is_file():
            with self.path.open("rb") as fh:
                for raw in fh:
                    if kept == n or not raw.endswith(b"\n"):
                        break
                    offset, kept = offset + len(raw), kept + 1
        if kept < n:
            # resumed from an older checkpoint than the trackers were fed to: they keep those later steps
            print(
                f"warning: the trackers were fed {n} lines of metrics.jsonl but this run keeps {kept}: the "
                "tracker runs keep the steps after the checkpoint it resumed from",
                flush=True,
            )
            self.state["lines"] = kept
        return offset

    def pump(self, finished: bool = False) -> None:
        """Feed the trackers every new line of metrics.jsonl up to the sealed checkpoint (all when finished)."""
        limit = math.inf if finished else sealed_step(self.run_dir)
        if limit is None or not self.path.is_file():
            return
        by_step: dict[int, dict[str, float]] = {}
        offset, lines = self._offset, 0
        with self.path.open("rb") as fh:
            fh.seek(offset)
            for raw in fh:
                if not raw.endswith(b"\n"):  # a line still being written
                    break
                record = json.loads(raw)
                step = int(record.get("step", 0))
                if step > limit:
                    break
                offset, lines = offset + len(raw), lines + 1
                if "event" not in record:
                    by_step.setdefault(step, {}).update(scalars(record))
        if not lines:
            return
        for backend in self.backends:
            backend.log(by_step)
        self._offset = offset
        self.state["lines"] += lines
        self._save()

    def _save(self) -> None:
        tmp = self.run_dir / f".{STATE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.run_dir / STATE)

    def close(self, finished: bool = False) -> None:
        self.pump(finished)
        for backend in self.backends:
            backend.close(finished)
        self.backends = []


def _quiet_telemetry() -> None:
    # Usage telemetry and crash reports are connections nobody asked for; the user's own setting wins.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")


class WandbRun:
    """One wandb run, resumed by id. Offline (WANDB_MODE=offline) every process writes its own
    RUN/wandb/offline-run-*-ID folder with the steps it fed; `wandb sync` uploads the folders of one
    run ID in order of their start."""

    def __init__(self, run_dir: Path, state: dict, config: dict, project: str, owner: Trackers):
        import wandb

        state.setdefault("id", uuid.uuid4().hex[:12])  # wandb ids: lowercase letters and digits
        self.id = state["id"]
        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            id=self.id,
            resume="allow",
            dir=str(run_dir),
            # console capture would wrap stdout (tqdm, --json); code saving copies the script
            settings=wandb.Settings(console="off", save_code=False),
        )
        self.run.config.update(config, allow_val_change=True)  # the resolved config may change on a resume
        self.run_dir = run_dir
        self.own = Path(self.run.dir).parent.name  # this process's segment (RUN/wandb/<segment>/files)

    def steps_on_disk(self) -> int:
        """The last step the run's transaction logs (RUN/wandb/*run-*-ID/run-ID.wandb, offline or not)
        hold from earlier processes (-1: none)."""
        last = -1
        for path in (self.run_dir / "wandb").glob(f"*run-*-{self.id}/run-{self.id}.wandb"):
            if path.parent.name == self.own:
                continue
            for record in transaction_log(path):
                if record.WhichOneof("record_type") == "history":
                    last = max(last, record.history.step.num)
        return last

    def log(self, by_step: dict[int, dict[str, float]]) -> None:
        for step, values in by_step.items():
            if values:
                # commit=True: with an explicit step wandb would otherwise hold the row until the next step
                self.run.log(values, step=step, commit=True)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


def transaction_log(path: Path):
    """The records of a wandb transaction log (run-ID.wandb): LevelDB log framing (32 KiB blocks of
    checksum, length, type, data) around protobuf Records, after a 7-byte header. A torn tail, which
    a kill leaves, ends the reading."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    if data[:4] != b":W&B":
        return
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):
            return
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL / FIRST start a record; MIDDLE / LAST extend it
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


class MlflowRun:
    """One MLflow run, continued by run id; a file: store under RUN unless the recipe or
    MLFLOW_TRACKING_URI names another."""

    BATCH = 1000  # MLflow's log_batch limit on metrics per call

    def __init__(self, run_dir: Path, state: dict, config: dict, project: str, owner: Trackers):
        uri = owner.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3.x keeps the file store in maintenance mode and refuses it without this opt-out;
            # it needs no server and no database, which is what an offline run wants
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if state.get("run_id") and state.get("tracking_uri") == uri:
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(project)
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            # params are write-once in MLflow: the recipe as started; the files below follow each resume
            params = [Param(k, str(v)[:500]) for k, v in _flatten(config.get("recipe", {})).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        state.update(run_id=self.run_id, tracking_uri=uri)
        for name, value in config.items():
            self.client.log_dict(self.run_id, value, f"{name}.json")

    def log(self, by_step: dict[int, dict[str, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for step, values in by_step.items() for k, v in values.items()]
        for i in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + self.BATCH])

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def trackers_for(run_dir: Path, recipe, fresh: bool) -> Trackers | None:
    """The trainer's trackers for ``recipe.logging`` (None: TensorBoard or nothing), configured with the
    recipe and the resolved config (RUN/resolved-config.json, written before this)."""
    from pretrain.runtime.checkpoint import RESOLVED

    lg = recipe.logging
    if not any(name in PACKAGES for name in lg.report_to):
        return None
    resolved_path = Path(run_dir) / RESOLVED
    config = {"recipe": recipe.model_dump(mode="json")}
    if resolved_path.is_file():
        config["resolved"] = json.loads(resolved_path.read_text())
    return Trackers(run_dir, lg.report_to, config, lg.project or recipe.name, fresh, lg.mlflow_tracking_uri)
