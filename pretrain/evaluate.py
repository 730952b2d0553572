"""pretrain-eval: a checkpoint's metrics on a data split (one process, no DeepSpeed engine).

gpt: loss and perplexity. clip: contrastive loss, zero-shot top-1/top-5 with prompt-template
ensembling (when the data has classes.json) and image->text / text->image recall@1/5/10.

The test split is read only here, and only when asked for by name.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import CheckpointError, fp32_state_dict, load_weights, resolve_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain-eval", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its checkpoints/ folder, one checkpoint tag, or an exported Hugging Face directory")
    p.add_argument("--data", required=True, help="prepared data directory (holds manifest.json)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split to evaluate (default val)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences (or image-text pairs) per forward pass")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N samples of the split")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


@dataclass
class Loaded:
    model: torch.nn.Module  # in fp32 on the CPU, eval mode; for CLIP the ContrastiveCLIP wrapper
    family: str
    config: Any  # the transformers config
    tokenizer_dir: Path | None
    info: dict


def load_model(checkpoint: str) -> Loaded:
    """A run's checkpoint (any ZeRO stage) or an exported Hugging Face directory, of either family."""
    from transformers import AutoConfig

    from pretrain.checkpoint import run_metadata
    from pretrain.config import Recipe
    from pretrain.models import family_of_hf_config, get_family

    ref = resolve_checkpoint(checkpoint)
    if ref.kind == "hf":
        config = AutoConfig.from_pretrained(ref.path)
        name = family_of_hf_config(config)
        model = get_family(name).from_pretrained(ref.path)
        return Loaded(model.eval(), name, config, ref.path, {"checkpoint": str(ref.path), "format": "hf", "family": name})
    meta = run_metadata(ref)
    name = meta["recipe"]["family"]
    family = get_family(name)
    config = AutoConfig.from_pretrained(ref.run_dir / "model")
    model = family.model_from_config(config, Recipe.model_validate(meta["recipe"]).model)
    load_weights(model, fp32_state_dict(ref))
    tok = ref.run_dir / "tokenizer"
    return Loaded(model.eval(), name, config, tok if tok.is_dir() else None,
                  {"checkpoint": str(ref.path), "format": "deepspeed", "tag": ref.tag, "family": name})


def evaluate(checkpoint: str, data_dir: str, split: str = "val", batch_size: int = 16,
             max_samples: int | None = None) -> dict:
    """The family's metrics on a split: loss and perplexity for gpt; contrastive loss, zero-shot
    top-1/top-5 and retrieval recall@1/5/10 for clip."""
    from pretrain.models import EvalRequest, RunData, get_family

    loaded = load_model(checkpoint)
    family = get_family(loaded.family)
    run = RunData(family.open_data(data_dir), loaded.tokenizer_dir, loaded.config)
    result = family.evaluate(loaded.model, run, EvalRequest(split, batch_size, max_samples))
    return {"split": split, **result, **loaded.info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries' chatter must not corrupt --json
            result = evaluate(args.checkpoint, args.data, args.split, args.batch_size, args.max_samples)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
