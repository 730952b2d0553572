"""Checkpoints: where they are (a run, ``checkpoints/``, a tag, an export), and the
`CheckpointManager` that a training run saves, seals, prunes, finds and loads them with. Their
weights are read without an engine by `pretrain.run.build`, which rebuilds the model that wrote them.

A run directory holds ``resolved-config.json``, ``model/config.json`` (the transformers
config), ``tokenizer/`` and ``checkpoints/<tag>/``. A user can point at the run, at
``checkpoints/``, at one tag, or at an exported Hugging Face directory.

One tag holds DeepSpeed's files (model and optimizer states, partitioned by rank under ZeRO),
``toolkit_rank<r>.pt`` per rank (its RNG states and its data stream's position, an opaque
``state_dict``) and ``toolkit.json``, the seal: the run's counters, the world size and ZeRO
stage, rank 0's data position for people to read, and every file's size and SHA-256). The seal
is written last, by rank 0, once every rank's writes ended (in the background by default:
`pretrain.runtime.ckpt_writer`); a tag without it is not a checkpoint, and one whose files do not
match it is refused before a load (`pretrain.runtime.ckpt_verify`, `pretrain-ckpt verify`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.runtime.ckpt_verify import CHECKSUM, file_entry, first_verified, tag_files
from pretrain.runtime.ckpt_writer import Saves
from pretrain.runtime.rng import capture_rng, restore_rng, seed_replica

RESOLVED = "resolved-config.json"


class CheckpointError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# What may run code while loading. Two kinds of files can: a Hugging Face directory with its own
# Python modules (auto_map), run by transformers only with trust_remote_code=True, and a pickle
# (DeepSpeed writes its checkpoint files with torch.save and reads them with weights_only=False).
# Neither runs unless the command line says so: --trust-remote-code, --trust-checkpoint. A recipe
# never enables either. The commands set this process's choice once, with `trusting`.

TRUST_REMOTE_CODE_FLAG = "--trust-remote-code"
TRUST_CHECKPOINT_FLAG = "--trust-checkpoint"
_TRUST = {"remote_code": False, "checkpoint": False}


def add_trust_flags(parser) -> None:
    """--trust-remote-code and --trust-checkpoint, as the commands that read models and checkpoints offer them."""
    parser.add_argument(
        TRUST_REMOTE_CODE_FLAG,
        action="store_true",
        help="let transformers run Python code shipped inside a model or tokenizer directory (auto_map; it runs "
        "with your permissions); without it such a directory is refused",
    )
    parser.add_argument(
        TRUST_CHECKPOINT_FLAG,
        action="store_true",
        help="read DeepSpeed checkpoint files that only a full unpickling reads (it can run any code they "
        "carry); without it every file is read with torch.load(weights_only=True) and one that needs more is refused",
    )


@contextlib.contextmanager
def trusting(*, remote_code: bool = False, checkpoint: bool = False):
    """Within: what this process's loads may run (the command-line flags), put back on exit."""
    before = dict(_TRUST)
    _TRUST.update(remote_code=bool(remote_code), checkpoint=bool(checkpoint))
    try:
        yield
    finally:
        _TRUST.update(before)


def remote_code_trusted() -> bool:
    return _TRUST["remote_code"]


def checkpoint_trusted() -> bool:
    return _TRUST["checkpoint"]


def hf_load(load, path, trust_remote_code: bool | None = None, **kwargs):
    """``load(path, trust_remote_code=..., **kwargs)``, ``load`` being a transformers
    ``Auto*.from_pretrained``: always with the argument set, so transformers never asks y/N on
    stdin, from this process's --trust-remote-code unless the caller says. A directory whose
    loading needs its own code is refused, naming the flag."""
    trust = remote_code_trusted() if trust_remote_code is None else bool(trust_remote_code)
    try:
        return load(str(path), trust_remote_code=trust, **kwargs)
    except ValueError as e:
        if trust or "trust_remote_code" not in str(e):
            raise
        raise CheckpointError(remote_code_refused(path)) from None


def remote_code_refused(path) -> str:
    return (
        f"{path}: loading it would run Python code shipped in the directory (auto_map in its config); "
        f"refused. Pass {TRUST_REMOTE_CODE_FLAG} to allow it (the code runs with your permissions)"
    )


def _deepspeed_globals() -> list:
    """The classes DeepSpeed's own checkpoint files hold besides tensors and containers (ZeRO
    optimizer states: the stage, the fp32 partitions' addresses, the loss scaler)."""
    found = []
    for module, names in (
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found.extend(getattr(mod, n) for n in names if hasattr(mod, n))
    return found


@contextlib.contextmanager
def safe_torch_loads(trust: bool | None = None):
    """Within: every ``torch.load`` (DeepSpeed's, which asks for weights_only=False, included) reads
    with weights_only=True and the classes DeepSpeed's files need allowed (`_deepspeed_globals`).
    A file that does not load that way is refused, naming it and --trust-checkpoint; with that flag
    (``trust``, default this process's) it is unpickled as DeepSpeed would have, running any code it holds."""
    import argparse
    import collections

    trust = checkpoint_trusted() if trust is None else bool(trust)
    allowed = [*_deepspeed_globals(), argparse.Namespace, collections.OrderedDict, collections.defaultdict]
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs.pop("weights_only", None)
        kwargs.pop("pickle_module", None)
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            if not trust:
                raise CheckpointError(
                    f"{f}: refused: it holds Python objects that only a full unpickling restores, and "
                    f"unpickling can run any code the file carries ({str(e).splitlines()[0][:200]}). If you "
                    f"wrote this checkpoint or trust who did, pass {TRUST_CHECKPOINT_FLAG}"
                ) from None
        return original(f, *args, weights_only=False, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


@dataclass(frozen=True)
class CheckpointRef:
    kind: str  # "deepspeed" or "hf"
    path: Path  # the tag directory, or the HF directory
    run_dir: Path | None = None
    tag: str | None = None

    @property
    def root(self) -> Path:
        return self.path.parent


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any(
        (p / f).exists() for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    )


def _run_dir_of(p: Path) -> Path | None:
    for q in [p, *p.parents][:4]:
        if (q / RESOLVED).is_file():
            return q
    return None


def latest_tag(root: Path) -> str | None:
    """The tag ``root/latest`` names, if it is a directory; one outside ``root`` is refused (`safe_tag`)."""
    f = root / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not tag:
        return None
    safe_tag(root, tag)
    return tag if (root / tag).is_dir() else None


def resolve_checkpoint(path: str | Path) -> CheckpointRef:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint")
    if _is_hf_dir(p):
        return CheckpointRef("hf", p)
    for root in (p / "checkpoints", p):
        tag = latest_tag(root)
        if tag:
            return CheckpointRef("deepspeed", root / tag, _run_dir_of(root), tag)
    if any(p.glob("*model_states.pt")):
        return CheckpointRef("deepspeed", p, _run_dir_of(p), p.name)
    raise CheckpointError(f"{p}: not a run directory, DeepSpeed checkpoint or Hugging Face model directory")


def run_metadata(ref: CheckpointRef) -> dict:
    if ref.run_dir is None:
        raise CheckpointError(f"{ref.path}: no {RESOLVED} found above it; cannot tell which model it holds")
    return json.loads((ref.run_dir / RESOLVED).read_text())


# ---------------------------------------------------------------------------------------------
# Writing and resuming. DeepSpeed writes files in place and its rank 0 updates `latest` before
# the final barrier, so a crash on another rank can leave `latest` naming a half-written tag.
# We save with save_latest=False, seal the tag (`toolkit.json`) once every rank has returned
# from the save, and only then move `latest` to it, atomically.

COMPLETE = "toolkit.json"
TAG_PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def complete_tags(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and is_complete(p)),
        key=lambda p: p.name,
    )


def safe_tag(root: Path, tag: str) -> Path:
    """``root/tag``, refusing a tag that would leave ``root`` (a tampered ``latest``)."""
    p = (root / tag).resolve()
    if p.parent != root.resolve():
        raise CheckpointError(f"{root / 'latest'}: tag {tag!r} points outside the checkpoint directory; refused")
    return p


def resumable(root: Path) -> Path | None:
    """The checkpoint a resume should load: ``latest`` if it is complete, else the newest complete tag."""
    tag = latest_tag(root)
    if tag is not None and is_complete(safe_tag(root, tag)):
        return root / tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


def mark_complete(tag_dir: Path, meta: dict, keep_last: int | None) -> None:
    """Rank 0, after every rank's save returned: seal the tag, point `latest` at it, prune old tags."""
    _atomic_write(tag_dir / COMPLETE, json.dumps(meta, indent=2))
    _atomic_write(tag_dir.parent / "latest", tag_dir.name)
    if keep_last:
        for old in complete_tags(tag_dir.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def rank_state_path(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"toolkit_rank{rank:05d}.pt"


def load_rank_state(tag_dir: Path, rank: int) -> dict | None:
    p = rank_state_path(tag_dir, rank)
    # Plain tensors, ints, strings, lists and dicts only: weights_only refuses anything that could run code.
    return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None


def resume_target(root: Path, resume: str) -> Path | None:
    """The tag a run resumes from: ``auto`` (the newest complete one under ``root``, if any),
    ``none``, or a path (a checkpoints folder, a run's, or one tag), which must be complete."""
    if resume == "none":
        return None
    if resume == "auto":
        return resumable(root)
    p = Path(resume)
    for folder in (p, p / "checkpoints"):
        if (folder / "latest").is_file() or complete_tags(folder):
            p = resumable(folder) or p
            break
    if not is_complete(p):
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE})")
    return p


# ---------------------------------------------------------------------------------------------
# The manager


@dataclass(frozen=True)
class Restored:
    """What a resume hands back to the trainer."""

    tag: Path
    run_state: dict[str, Any]  # the counters the trainer saved (RunState's fields)
    data_state: dict[str, Any] | None  # this rank's data stream position (state_dict), None if absent
    old_world: int  # the world size it was saved on


class CheckpointManager:
    """Every checkpoint concern of a training run: save, seal, prune, find the resume target,
    convert for another world size (DeepSpeed's universal format), load, RNG and run state.

    Used in three calls, on every rank: ``deepspeed_config(ds)`` before ``deepspeed.initialize``
    (a world-size change needs ``load_universal``, and the conversion must happen first),
    ``load(engine)`` after it, and ``save(engine, step, run_state, data_state)`` during training.
    ``in_save`` (tests only) is called once a rank's files are handed to the writer, before the seal;
    ``before_write(step, rank, path)`` (tests only) before each file is written, in the writer's thread.
    """

    def __init__(
        self,
        root: Path,
        *,
        rank: int,
        world: int,
        zero_stage: int,
        seed: int,
        resume: str = "auto",
        keep_last: int | None = None,
        in_save=None,
        tp: int = 1,
        replica: int = 0,
        background: bool = False,
        on_error: str = "stop",
        before_write=None,
    ):
        self.root, self.rank, self.world, self.zero_stage, self.tp = Path(root), rank, world, zero_stage, tp
        self.replica = replica  # the data-parallel rank, which seeds this rank's generators
        self.seed, self.keep_last, self.in_save = seed, keep_last, in_save
        self.is_main = rank == 0
        self.target = self._verified(resume_target(self.root, resume), resume)
        self.saves = Saves(
            rank=rank, world=world, background=background, on_error=on_error, seal=self._seal, before_write=before_write
        )
        self.saved: dict[str, Any] | None = json.loads((self.target / COMPLETE).read_text()) if self.target else None
        self._universal: Path | None = None

    def _verified(self, target: Path | None, resume: str) -> Path | None:
        """``target`` if its files match its seal's checksums (collective). With ``auto`` a refused
        one falls back to the previous sealed checkpoint, saying so; an explicit path is refused."""
        if target is None:
            return None
        if resume != "auto":
            found, refused = first_verified([target], self.world, self.is_main)
            if found is None:
                raise CheckpointError(f"--resume {resume}: refused, it fails verification: {refused[0].describe()}")
            return found
        older = [t for t in reversed(complete_tags(self.root)) if t.name < target.name]
        found, refused = first_verified([target, *older], self.world, self.is_main)
        if found is None:
            raise CheckpointError(
                f"no sealed checkpoint under {self.root} passes verification "
                f"({'; '.join(v.describe() for v in refused)}); move them aside, or start afresh with --resume none"
            )
        return found

    @property
    def saved_world(self) -> int | None:
        return None if self.saved is None else int(self.saved.get("world_size", self.world))

    @property
    def same_layout(self) -> bool:
        """Saved on as many ranks, split the same tensor-parallel way: every rank loads its own files."""
        return self.saved_world == self.world and int(self.saved.get("tensor_parallel", 1)) == self.tp

    # -- before deepspeed.initialize
    def deepspeed_config(self, ds: dict) -> dict:
        """``ds``, asking DeepSpeed to load the universal format when the target was saved on another
        world size or tensor-parallel size. ZeRO-1/2/3 optimizer state is partitioned by rank, so it is
        converted (once, by rank 0, into the tag's universal/ folder; collective; DeepSpeed merges TP
        slices there too); ZeRO-0 state is whole and loads as it is, unless it is split by TP."""
        if self.saved is None or self.same_layout:
            return ds
        saved_tp = int(self.saved.get("tensor_parallel", 1))
        if self.saved.get("zero_stage", 0) == 0:
            if saved_tp > 1 or self.tp > 1:
                # ZeRO-0's model files are whole per TP rank and there is no universal form to re-split them
                raise CheckpointError(
                    f"{self.target} was saved with ZeRO-0 and tensor_parallel.autotp_size {saved_tp} on "
                    f"{self.saved_world} ranks; this run has {self.tp} on {self.world}. Resume it on the same layout, "
                    "or pretrain-export it and start from the export with --init-from"
                )
            return ds
        self._universal = self._convert(self.target)
        return {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}

    def _convert(self, target: Path) -> Path:
        import torch.distributed as dist

        universal = target / "universal"
        done = universal / "converted.json"
        if self.is_main and not done.is_file():
            print(
                f"converting {target} ({self.saved_world} ranks) to a universal checkpoint for {self.world}", flush=True
            )
            shutil.rmtree(universal, ignore_errors=True)
            # DeepSpeed's converter, run under safe_torch_loads as this process's loads are
            script = (
                "import runpy, sys\n"
                "from pretrain.runtime.checkpoint import safe_torch_loads\n"
                "sys.argv[0] = 'ds_to_universal'\n"
                f"with safe_torch_loads({checkpoint_trusted()!r}):\n"
                "    runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__', alter_sys=True)\n"
            )
            cmd = [
                sys.executable,
                "-c",
                script,
                "--input_folder",
                str(target),
                "--output_folder",
                str(universal),
                "--inject_missing_state",
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ]
            repo = str(Path(__file__).resolve().parents[2])
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode == 0:
                done.write_text(json.dumps({"from_world_size": self.saved_world, "time": time.time()}))
            else:
                print(
                    f"error: ds_to_universal {' '.join(cmd[3:])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}",
                    flush=True,
                )
        dist.barrier()
        if not done.is_file():
            raise CheckpointError(f"could not convert {target} to a universal checkpoint (see rank 0's output)")
        return universal

    # -- after deepspeed.initialize
    def load(self, engine) -> Restored | None:
        """Load the target into the engine and restore this rank's RNG; None when starting fresh.
        On another world size every rank gets rank 0's data position (all ranks pull the same
        number of batches) and the RNGs are reseeded from (seed, step, data-parallel rank): rank
        streams do not map across worlds."""
        if self.target is None or self.saved is None:
            return None
        return self._load(engine, self.target, self.saved)

    def sealed_before(self, step: int) -> Path | None:
        """The newest sealed checkpoint of this run taken before optimizer step ``step`` whose files
        match their checksums (a rewind's target; collective: every rank calls it, after `flush`)."""
        tags = [t for t in complete_tags(self.root) if int(json.loads((t / COMPLETE).read_text())["step"]) < step]
        return first_verified(tags[::-1], self.world, self.is_main)[0]  # the newest that verifies (collective)

    def reload(self, engine, target: Path) -> Restored:
        """Load ``target``, a sealed checkpoint of this run saved in this layout, into the running
        engine (a rewind): weights, optimizer, schedule, this rank's RNG and data position."""
        saved = json.loads((target / COMPLETE).read_text())
        if int(saved.get("world_size", self.world)) != self.world or int(saved.get("tensor_parallel", 1)) != self.tp:
            raise CheckpointError(f"{target}: saved on another layout; a rewind reloads only this run's own layout")
        self.target, self.saved, self._universal = target, saved, None
        return self._load(engine, target, saved)

    def _load(self, engine, target: Path, saved: dict) -> Restored:
        with safe_torch_loads():  # DeepSpeed unpickles its files: only with --trust-checkpoint
            if self._universal is not None:
                path, _ = engine.load_checkpoint(str(target), tag=self._universal.name)
            else:
                path, _ = engine.load_checkpoint(str(target.parent), tag=target.name)
        if path is None:
            raise CheckpointError(f"could not load the checkpoint {target}")
        from pretrain.runtime.engine import replay_cpu_adam_steps

        replay_cpu_adam_steps(engine.optimizer)  # DeepSpeed's CPU Adam: continue its beta^t exactly
        old_world = self.saved_world
        same_world = self.same_layout
        rank_state = load_rank_state(target, self.rank if same_world else 0) or {}
        if same_world and "rng" in rank_state:
            restore_rng(rank_state["rng"])
        elif not same_world:
            seed_replica(self.seed + int(saved["step"]), self.replica)
        data_state = rank_state.get("data", _data_state_of_old_seal(saved, rank_state))
        if self.is_main:
            saved_tp = int(saved.get("tensor_parallel", 1))
            change = (
                ""
                if same_world
                else f" ({old_world} -> {self.world} ranks)"
                if saved_tp == self.tp
                else f" ({old_world} ranks with TP {saved_tp} -> {self.world} with TP {self.tp})"
            )
            print(f"resumed from {target} at step {saved['step']}{change}", flush=True)
        return Restored(target, saved, data_state, old_world)

    # -- during training
    def save(self, engine, step: int, run_state: dict[str, Any], data_state: dict[str, Any]) -> Path:
        """Every rank: DeepSpeed's files and this rank's own state, copied to host memory and written
        in the background (`ckpt_writer`), or here when ``background`` is off. Rank 0 seals the tag,
        moves `latest` and prunes once every rank's writes ended (`poll`, `flush`). A save waits for
        the one before it; a tag being rewritten is unsealed first."""
        import torch.distributed as dist

        self.flush()
        started = time.perf_counter()
        tag_dir = self.root / tag_for(step)
        if self.is_main:
            (tag_dir / COMPLETE).unlink(missing_ok=True)
        dist.barrier()
        writer = self.saves.writer(engine)
        writer.begin(tag_dir, step)
        engine.save_checkpoint(str(self.root), tag=tag_dir.name, save_latest=False)
        writer.save({"rng": capture_rng(), "data": data_state}, str(rank_state_path(tag_dir, self.rank)))
        if self.in_save is not None:
            self.in_save(step, self.rank, tag_dir)
        seal = {
            **run_state,
            "world_size": self.world,
            "zero_stage": self.zero_stage,
            "tensor_parallel": self.tp,
            "time": time.time(),
            **data_state,
        }
        self.saves.started(writer, seal, started)
        return tag_dir

    def poll(self) -> None:
        """Seal the save in flight if every rank's writes ended (collective while one is in flight)."""
        self.saves.poll()

    def flush(self) -> None:
        """Collective: return once the save in flight is sealed, or has failed (removed; TrainingStopped
        unless checkpoint.on_error is "continue")."""
        self.saves.flush()

    def take_records(self) -> list[dict]:
        """The metrics.jsonl events of the saves that ended since the last call (rank 0 logs them)."""
        return self.saves.take_records()

    def _seal(self, tag_dir: Path, meta: dict, files: dict[str, dict]) -> None:
        """Rank 0, every rank's writes ended: the checksums of every file of the tag into its seal."""
        for rel in tag_files(tag_dir):  # files DeepSpeed wrote itself (zero_to_fp32.py), small
            if rel not in files:
                files[rel] = file_entry(tag_dir / rel)
        mark_complete(tag_dir, {**meta, "checksum": CHECKSUM, "files": dict(sorted(files.items()))}, self.keep_last)
        print(f"saved checkpoint {tag_dir.name}", flush=True)


def _data_state_of_old_seal(saved: dict, rank_state: dict) -> dict | None:
    """The data position of a checkpoint written before the stream kept its own (toolkit.json
    held the layout and history, toolkit_rank*.pt the batch count)."""
    if "micro" not in saved:
        return None
    return {
        "world": saved["world_size"],
        "workers": saved.get("num_workers", 0),
        "micro": saved["micro"],
        "micro_batches": rank_state.get("micro_batches", saved.get("micro_batches", 0)),
        "data_history": saved.get("data_history", []),
    }
