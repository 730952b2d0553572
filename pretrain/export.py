"""pretrain-export: a DeepSpeed checkpoint (any ZeRO stage) -> a Hugging Face model directory.

The result loads with ``AutoModelForCausalLM.from_pretrained`` (gpt) or ``CLIPModel.from_pretrained``
(clip), and ``AutoTokenizer.from_pretrained``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pretrain.checkpoint import CheckpointError, resolve_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain-export", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ folder, or one checkpoint tag")
    p.add_argument("--output", required=True, help="directory to write (must be empty or absent)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights (default fp32)")
    return p


def export(checkpoint: str, output: str, dtype: str = "fp32") -> Path:
    from pretrain.evaluate import load_model
    from pretrain.models import get_family

    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty")
    ref = resolve_checkpoint(checkpoint)
    if ref.kind != "deepspeed":
        raise CheckpointError(f"{ref.path}: already a Hugging Face directory")
    loaded = load_model(checkpoint)
    family = get_family(loaded.family)
    model, info = family.to_hf(loaded.model), loaded.info
    model.to(DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
    tokenizer = None
    if loaded.tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(loaded.tokenizer_dir)
    family.save_hf_assets(model, tokenizer, out)
    (out / "export-info.json").write_text(json.dumps({**info, "dtype": dtype}, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export(args.checkpoint, args.output, args.dtype)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
