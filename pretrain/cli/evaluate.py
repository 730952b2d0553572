"""pretrain-eval: a checkpoint's or a Hugging Face model's metrics on a data split (one process,
no DeepSpeed engine), the same metrics either way, so a model before fine-tuning, a run and its
export compare with one command each.

gpt: loss and perplexity. clip: contrastive loss, zero-shot top-1/top-5 with prompt-template
ensembling (when the data has classes.json) and image->text / text->image recall@1/5/10.

The test split is read only here, and only when asked for by name.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from pretrain.run.build import Loaded, load_model
from pretrain.runtime.checkpoint import CheckpointError, add_trust_flags, hf_load, trusting
from pretrain.runtime.metrics import dumps

DEFAULT_BATCH = 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain-eval", description=__doc__)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--checkpoint",
        help="run directory, its checkpoints/ folder, one checkpoint tag, or an exported Hugging Face directory",
    )
    which.add_argument(
        "--model",
        metavar="HF_DIR",
        help="a local Hugging Face model directory (a pretrained model before fine-tuning, a "
        "pretrain-export output) or a peft adapter directory (its base model with the adapter merged)",
    )
    p.add_argument(
        "--data",
        help="prepared data directory (holds manifest.json), or one source string as train's "
        "--data takes (raw shards: val is the run's held-out keys); or give --image-folder",
    )
    p.add_argument(
        "--image-folder",
        metavar="ROOT",
        help="a labelled image folder (ROOT/<class>/*.jpg or ROOT/{train,val}/<class>/*.jpg) instead of "
        "--data: a CLIP's top-1/top-5 on it, zero-shot with prompt templates, or with its own head when "
        "it was fine-tuned on these classes (task classify)",
    )
    p.add_argument(
        "--classnames",
        metavar="FILE",
        help="--image-folder: class-name file (text: a name per line in sorted-folder order or 'FOLDER "
        "NAME' lines; JSON: list, {folder: name} or {classnames, templates}); default ROOT/classnames.*",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        help="--image-folder without train/ and val/ subfolders: the fraction held out as val by a hash "
        "of each path (default: a classifier run's data.val_fraction, else 0.1)",
    )
    p.add_argument(
        "--wise-ft",
        metavar="A,B,...",
        type=_alphas,
        help="--image-folder, a classifier run: also evaluate WiSE-FT weights (1-alpha)*original + "
        "alpha*fine-tuned at these alphas, and report before (alpha 0) and after (alpha 1)",
    )
    p.add_argument(
        "--wise-ft-from", metavar="DIR", help="--wise-ft: the original weights (default: the run's model.init_from)"
    )
    p.add_argument(
        "--split",
        default="val",
        choices=["train", "val", "test", "all"],
        help="split to evaluate (default val; all: every image of an --image-folder)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences (or image-text pairs) per forward pass, and the batch a CLIP's contrastive "
        f"loss is over (default {DEFAULT_BATCH}; a run's CLIP checkpoint: the loss is over the run's "
        "own eval batch, eval.batch_size or the micro-batch, times its data-parallel size)",
    )
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N samples of the split")
    p.add_argument(
        "--tasks",
        metavar="NAMES_OR_YAML",
        help="with --model: run EleutherAI lm-evaluation-harness tasks on the model instead of --data, offline: "
        "comma-separated task YAML files whose data_files are local (JSONL/parquet/CSV, relative to the YAML), "
        "or names of tasks in the folders of listed YAMLs; a task that would download its data is refused, "
        "naming the file to provide (needs pip install .[lmeval]; e.g. tests/assets/facts_choice.yaml)",
    )
    p.add_argument(
        "--limit", type=int, metavar="N", default=None, help="--tasks: score only the first N documents of each task"
    )
    p.add_argument(
        "--benchmark",
        metavar="DIR",
        help="with --model or --checkpoint of a CLIP: zero-shot classification (acc1, acc5, mean per-class "
        "recall) and image/text retrieval recall@1/5/10 on a local WebDataset set in clip_benchmark's layout: "
        "DIR/test/*.tar (an image and a cls per sample), DIR/classnames.txt, "
        "DIR/zeroshot_classification_templates.txt (make-synthetic-image-text --benchmark DIR writes one)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_trust_flags(p)
    return p


def evaluate(
    checkpoint: str, data_dir: str, split: str = "val", batch_size: int | None = None, max_samples: int | None = None
) -> dict:
    """The family's metrics on a split: loss and perplexity for gpt; contrastive loss, zero-shot
    top-1/top-5 and retrieval recall@1/5/10 for clip.

    A contrastive loss depends on how many pairs are scored together: without ``batch_size`` a
    run's CLIP checkpoint is scored over the run's own eval batch (`run_eval_batch`), so the value
    is the one its training logged; ``loss_batch_size`` in the result says which batch it was."""
    from pretrain.models import EvalRequest, RunData, get_family
    from pretrain.run.data import open_eval_data

    loaded = load_model(checkpoint)
    family = get_family(loaded.family)
    data = open_eval_data(family, data_dir, checkpoint)
    tokenizer_dir = loaded.tokenizer_dir
    if loaded.info["format"] != "deepspeed":
        tokenizer_dir = _outside_tokenizer(family, loaded, data)
    run = RunData(data, tokenizer_dir, loaded.config)
    if loaded.family != "clip":  # a mean over tokens or samples: the batch changes nothing but memory
        result = family.evaluate(loaded.model, run, EvalRequest(split, batch_size or DEFAULT_BATCH, max_samples))
        return {"split": split, **result, **loaded.info}
    run_batch = run_eval_batch(checkpoint) if loaded.info["format"] == "deepspeed" else None
    loss_batch = batch_size or run_batch or DEFAULT_BATCH
    # the forward batch only bounds memory (a run's eval batch is summed over all its ranks)
    request = EvalRequest(split, batch_size or min(DEFAULT_BATCH, loss_batch), max_samples, loss_batch=loss_batch)
    result = family.evaluate(loaded.model, run, request)
    return {"split": split, **result, "loss_batch_size": loss_batch, **loaded.info}


def run_eval_batch(checkpoint: str) -> int | None:
    """The batch a run's in-training evaluation computed its loss over, from its resolved-config.json
    (as `Trainer.evaluate` picks it): eval.batch_size on each data-parallel rank times the
    data-parallel size, else the training step's batch (the contrastive batch training scored each
    pair against). None when the checkpoint has no run directory."""
    import json

    from pretrain.runtime.checkpoint import RESOLVED, resolve_checkpoint

    ref = resolve_checkpoint(checkpoint)
    if ref.run_dir is None or not (ref.run_dir / RESOLVED).is_file():
        return None
    resolved = json.loads((ref.run_dir / RESOLVED).read_text())
    from pretrain.run.resolved import eval_loss_batch

    per_rank = resolved.get("recipe", {}).get("eval", {}).get("batch_size")
    dp = resolved.get("parallel", {}).get("dp") or resolved.get("world_size") or 1
    step = resolved.get("batch", {}).get("global_batch") or resolved.get("deepspeed", {}).get("train_batch_size")
    if not isinstance(per_rank, int) and not isinstance(step, int):
        return None
    return eval_loss_batch(per_rank if isinstance(per_rank, int) else None, int(dp), int(step or 0))


def _outside_tokenizer(family, loaded: Loaded, data) -> Path | None:
    """For a model that did not come from a run: the tokenizer the family would fine-tune it with
    (gpt: the data's own, whose ids the shards hold; clip: the model directory's, else the data's),
    refusing a model too small for it (too few embedding rows or positions)."""
    from transformers import AutoTokenizer

    from pretrain.run.config import ModelConfig, Recipe

    model_dir = loaded.info["checkpoint"]
    recipe = Recipe(
        family=loaded.family, model=ModelConfig(arch="clip" if loaded.family == "clip" else "gpt2", init_from=model_dir)
    )
    tokenizer_dir = family.tokenizer_dir(recipe, data)
    if tokenizer_dir is None:
        raise ValueError(f"{model_dir}: no tokenizer in the model directory nor with the data {data.root}")
    tokenizer = hf_load(AutoTokenizer.from_pretrained, tokenizer_dir)
    # only the model's own limits; the data's splits are checked when read
    problems = [p for p in family.check(recipe, data, loaded.config, tokenizer) if p.startswith("model")]
    if problems:
        raise ValueError(f"{model_dir} cannot be evaluated on {data.root}: " + "; ".join(problems))
    return tokenizer_dir


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is not None and not _is_model_dir(args.model):
        print(
            f"error: --model {args.model}: not a Hugging Face model directory (config.json and weights) or a peft "
            "adapter directory (adapter_config.json); for a run directory or checkpoint use --checkpoint",
            file=sys.stderr,
        )
        return 2
    if args.tasks is not None or args.benchmark is not None:
        return _benchmarks(args)
    if (args.data is None) == (args.image_folder is None):
        print(
            "error: give one of --data DIR (prepared shards) and --image-folder ROOT (a labelled image folder)",
            file=sys.stderr,
        )
        return 2
    trust = trusting(remote_code=args.trust_remote_code, checkpoint=args.trust_checkpoint)
    try:
        with trust, contextlib.redirect_stdout(sys.stderr):  # libraries' chatter must not corrupt --json
            if args.image_folder is not None:
                from pretrain.finetune.classify import evaluate_folder

                result = evaluate_folder(
                    args.checkpoint or args.model,
                    args.image_folder,
                    args.classnames,
                    args.split,
                    args.batch_size or DEFAULT_BATCH,
                    args.max_samples,
                    args.wise_ft,
                    args.wise_ft_from,
                    args.val_fraction,
                )
            else:
                result = evaluate(
                    args.checkpoint or args.model, args.data, args.split, args.batch_size, args.max_samples
                )
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(dumps(result))  # null, never a bare NaN (an empty split)
    elif args.image_folder is not None:
        from pretrain.finetune.classify import describe

        print(describe(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
    return 0


def _benchmarks(args: argparse.Namespace) -> int:
    """--tasks (lm-evaluation-harness on a GPT) and --benchmark (clip_benchmark's layout for a CLIP)."""
    if args.data is not None or args.image_folder is not None or (args.tasks and args.benchmark):
        print("error: --tasks and --benchmark each take the model alone (no --data or --image-folder)", file=sys.stderr)
        return 2
    if args.tasks is not None and args.model is None:
        print("error: --tasks needs --model HF_DIR (pretrain-export a run first)", file=sys.stderr)
        return 2
    trust = trusting(remote_code=args.trust_remote_code, checkpoint=args.trust_checkpoint)
    try:
        with trust, contextlib.redirect_stdout(sys.stderr):  # the harness's and datasets' chatter
            if args.tasks is not None:
                from pretrain.evals.harness import evaluate_export

                specs = [t.strip() for t in args.tasks.split(",") if t.strip()]
                result = evaluate_export(args.model, specs, args.limit, args.batch_size or DEFAULT_BATCH)
            else:
                from pretrain.evals.clip_bench import evaluate_benchmark

                result = evaluate_benchmark(
                    args.checkpoint or args.model, args.benchmark, args.batch_size or DEFAULT_BATCH, args.max_samples
                )
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(dumps(result))
        return 0
    for group, metrics in result["results"].items():
        for k, v in metrics.items():
            print(f"{group + '/' + k:>40}: {v:.4f}")
    return 0


def _alphas(text: str) -> list[float]:
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None


def _is_model_dir(path: str) -> bool:
    from pretrain.finetune.adapters import is_adapter_dir
    from pretrain.runtime.checkpoint import _is_hf_dir

    return is_adapter_dir(path) or _is_hf_dir(Path(path))


if __name__ == "__main__":
    sys.exit(main())
