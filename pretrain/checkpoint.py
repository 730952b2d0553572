"""Finding checkpoints and reading their weights without a DeepSpeed engine (eval, export).

A run directory holds ``resolved-config.json``, ``model/config.json`` (the transformers
config), ``tokenizer/`` and ``checkpoints/<tag>/`` written by DeepSpeed. A user can point
at the run, at ``checkpoints/``, at one tag, or at an exported Hugging Face directory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

RESOLVED = "resolved-config.json"


class CheckpointError(ValueError):
    pass


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
        (p / f).exists() for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))


def _run_dir_of(p: Path) -> Path | None:
    for q in [p, *p.parents][:4]:
        if (q / RESOLVED).is_file():
            return q
    return None


def latest_tag(root: Path) -> str | None:
    f = root / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
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


def _has_zero_partitions(tag_dir: Path) -> bool:
    return any(tag_dir.glob("*zero_pp_rank_*optim_states.pt"))


def fp32_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a DeepSpeed checkpoint of any ZeRO stage."""
    if _has_zero_partitions(ref.path):
        # ZeRO 1-3 (and bf16): the fp32 master weights live in the per-rank optimizer partitions.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
        return {k: v.float() for k, v in sd.items()}
    files = sorted(ref.path.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ref.path}: no mp_rank_*_model_states.pt")
    if len(files) > 1:
        raise CheckpointError(f"{ref.path}: tensor-parallel checkpoints are not supported")
    try:  # tensors, numbers, strings and dicts: nothing in it needs unpickling of arbitrary objects
        state = torch.load(files[0], map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report which file, not a pickle trace
        raise CheckpointError(f"{files[0]}: cannot be read safely (weights_only=True): {e}") from None
    return {k: v.float() for k, v in state["module"].items()}


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights, accepting only the tied parameters (e.g. lm_head) as missing."""
    result = model.load_state_dict(state, strict=False)
    tied = {k for k in result.missing_keys if "lm_head" in k or "embed" in k}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"weights do not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if tied and not getattr(model.config, "tie_word_embeddings", False):
        raise CheckpointError(f"weights missing for untied parameters {sorted(tied)[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


# ---------------------------------------------------------------------------------------------
# Writing and resuming. DeepSpeed writes files in place and its rank 0 updates `latest` before
# the final barrier, so a crash on another rank can leave `latest` naming a half-written tag.
# We save with save_latest=False, mark the tag complete (`toolkit.json`) once every rank has
# returned from the save, and only then move `latest` to it, atomically.

COMPLETE = "toolkit.json"
TAG_PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        import os

        os.fsync(f.fileno())
    tmp.replace(path)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def complete_tags(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and is_complete(p)),
                  key=lambda p: p.name)


def safe_tag(root: Path, tag: str) -> Path:
    """``root/tag``, refusing a tag that would leave ``root`` (a tampered ``latest``)."""
    p = (root / tag).resolve()
    if p.parent != root.resolve():
        raise CheckpointError(f"{root}/latest: tag {tag!r} points outside the checkpoint directory")
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
    import shutil

    _atomic_write(tag_dir / COMPLETE, json.dumps(meta, indent=2))
    _atomic_write(tag_dir.parent / "latest", tag_dir.name)
    if keep_last:
        for old in complete_tags(tag_dir.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def rank_state_path(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"toolkit_rank{rank:05d}.pt"


def capture_rng() -> dict:
    import random

    import numpy as np

    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy": torch.from_numpy(np_state[1].astype("int64")), "numpy_pos": int(np_state[2])}


def restore_rng(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype("uint32"), state["numpy_pos"], 0, 0.0))


def load_rank_state(tag_dir: Path, rank: int) -> dict | None:
    p = rank_state_path(tag_dir, rank)
    # Plain tensors, ints and lists only: weights_only refuses anything that could run code.
    return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None
