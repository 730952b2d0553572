"""pretrain-eval: loss and perplexity of a checkpoint on a data split (one process, no DeepSpeed engine).

The test split is read only here, and only when asked for by name.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

from pretrain.checkpoint import CheckpointError, fp32_state_dict, load_weights, resolve_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain-eval", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its checkpoints/ folder, one checkpoint tag, or an exported Hugging Face directory")
    p.add_argument("--data", required=True, help="prepared data directory (holds manifest.json)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split to evaluate (default val)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N sequences of the split")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def load_model(checkpoint: str) -> tuple[torch.nn.Module, dict]:
    """The model in fp32 on the CPU, and facts about where it came from."""
    from transformers import AutoConfig

    from pretrain.checkpoint import run_metadata
    from pretrain.models import get_family

    ref = resolve_checkpoint(checkpoint)
    if ref.kind == "hf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32)
        return model.eval(), {"checkpoint": str(ref.path), "format": "hf"}
    meta = run_metadata(ref)
    family = get_family(meta["recipe"]["family"])
    model = family.model_from_config(AutoConfig.from_pretrained(ref.run_dir / "model"))
    load_weights(model, fp32_state_dict(ref))
    return model.eval(), {"checkpoint": str(ref.path), "format": "deepspeed", "tag": ref.tag,
                          "family": meta["recipe"]["family"]}


def evaluate(checkpoint: str, data_dir: str, split: str = "val", batch_size: int = 16,
             max_samples: int | None = None) -> dict:
    from data_pipelines.loader import TextShards, eval_batches
    from pretrain.models import gpt

    model, info = load_model(checkpoint)
    data = TextShards(data_dir)
    sums = gpt.evaluate_sums(model, eval_batches(data, split, batch_size, max_samples=max_samples))
    return {"split": split, **gpt.metrics_from_sums(sums), **info}


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
            print(f"{k:>12}: {v:.4f}" if isinstance(v, float) else f"{k:>12}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
