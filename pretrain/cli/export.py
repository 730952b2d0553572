"""pretrain-export: a DeepSpeed checkpoint (any ZeRO stage) -> a Hugging Face model directory.

The result loads with ``AutoModelForCausalLM.from_pretrained`` (gpt) or ``CLIPModel.from_pretrained``
(clip), and ``AutoTokenizer.from_pretrained``. A LoRA run (model.lora) exports its adapter, for
``PeftModel.from_pretrained(base, DIR)``, or with --merge a plain model with the adapter folded in.
Every export carries a README.md model card.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pretrain.runtime.checkpoint import CheckpointError, add_trust_flags, hf_load, resolve_checkpoint, trusting

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain-export", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ folder, or one checkpoint tag")
    p.add_argument("--output", required=True, help="directory to write (must be empty or absent)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights (default fp32)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="LoRA runs: write a plain Hugging Face model with the adapters merged into its weights instead "
        "of the adapter alone (adapter_config.json + adapter_model.safetensors)",
    )
    p.add_argument(
        "--wise-ft",
        metavar="ALPHA",
        type=float,
        help="WiSE-FT (Wortsman et al. 2022): write (1-ALPHA)*original + ALPHA*fine-tuned weights, the "
        "original being the run's model.init_from (for a classifier run, with its zero-shot head); "
        "compare alphas first with pretrain-eval --image-folder ROOT --wise-ft 0,0.5,1",
    )
    p.add_argument(
        "--wise-ft-from", metavar="DIR", help="--wise-ft: the original weights (default: the run's model.init_from)"
    )
    add_trust_flags(p)
    return p


def export(
    checkpoint: str,
    output: str,
    dtype: str = "fp32",
    merge: bool = False,
    wise_ft: float | None = None,
    wise_ft_from: str | None = None,
) -> Path:
    import shlex

    from pretrain.finetune import adapters
    from pretrain.models import get_family, model_card
    from pretrain.run.build import load_model

    out = Path(output)
    existing = next((p for p in (out, *out.parents) if p.exists()), None)  # out, or the folder it would go in
    if existing is not None and not existing.is_dir():
        raise CheckpointError(f"--output {out}: {existing} is a file, not a directory")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty")
    ref = resolve_checkpoint(checkpoint)
    if ref.kind != "deepspeed":
        raise CheckpointError(f"{ref.path}: already a Hugging Face directory")
    loaded = load_model(checkpoint)
    if wise_ft is not None:
        from pretrain.finetune.wise_ft import init_from_of, interpolated_models

        original = wise_ft_from or init_from_of(loaded)
        _, loaded.model = next(interpolated_models(loaded, [wise_ft], original))
        loaded.info = {**loaded.info, "wise_ft": {"alpha": wise_ft, "original": str(original)}}
    if merge and loaded.adapter is None:
        raise ValueError(f"--merge: {ref.path} has no adapters to merge (its recipe has no model.lora)")
    family = get_family(loaded.family)
    kind = "model" if loaded.adapter is None else "merged" if merge else "adapter"
    if kind == "merged":
        adapters.merge(loaded.adapter)
    model, info = family.to_hf(loaded.model), loaded.info
    if kind == "adapter":
        loaded.adapter.to(DTYPES[dtype])
        adapters.save_adapter(loaded.adapter, out)
    else:
        model.to(DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
    tokenizer = None
    if loaded.tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = hf_load(AutoTokenizer.from_pretrained, loaded.tokenizer_dir)
    family.save_hf_assets(model, tokenizer, out)
    (out / "export-info.json").write_text(json.dumps({**info, "dtype": dtype, "contents": kind}, indent=2))
    command = shlex.join(
        [
            "pretrain-export",
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(output),
            *(["--dtype", dtype] if dtype != "fp32" else []),
            *(["--merge"] if merge else []),
            *(["--wise-ft", str(wise_ft)] if wise_ft is not None else []),
            *(["--wise-ft-from", str(wise_ft_from)] if wise_ft_from else []),
        ]
    )
    adapter = loaded.adapter.peft_config["default"].to_dict() if kind == "adapter" else None
    (out / "README.md").write_text(model_card.render(ref, loaded.family, loaded.config, kind, command, adapter))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with trusting(remote_code=args.trust_remote_code, checkpoint=args.trust_checkpoint):
            out = export(args.checkpoint, args.output, args.dtype, args.merge, args.wise_ft, args.wise_ft_from)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
