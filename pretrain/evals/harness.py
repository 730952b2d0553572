"""EleutherAI's lm-evaluation-harness (``lm_eval`` 0.4.x) on our GPTs, offline.

A task is a YAML file whose data is a local file (``dataset_path: json`` / ``csv`` / ``parquet`` /
``arrow`` / ``text`` with ``dataset_kwargs.data_files``; a relative data file is taken next to the
YAML) or a local dataset directory. Nothing is ever downloaded: a task whose data would come from
the Hugging Face Hub (every built-in harness task) is refused with the file to provide instead.
The model is handed to the harness's ``HFLM`` wrapper as an object, so the same code scores an
export (``pretrain-eval --model DIR --tasks ...``) and the live model during training
(``eval.tasks``, on rank 0).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

LOCAL_LOADERS = ("json", "csv", "parquet", "arrow", "text")
EXAMPLE = "tests/assets/facts_choice.yaml"


class HarnessError(ValueError):
    """A task that cannot run offline here, or a model the harness cannot take; says what to provide."""


def lm_eval_missing() -> str | None:
    if importlib.util.find_spec("lm_eval") is None:
        return "lm-evaluation-harness is not installed (pip install .[lmeval])"
    return None


def task_configs(specs: list[str]) -> list[dict[str, Any]]:
    """The harness config of each task: a YAML path, or the name of a task whose YAML lies in the
    folder of another listed YAML. Local data files are made absolute; anything that would download
    raises HarnessError naming the file to provide."""
    from lm_eval.tasks._yaml_loader import load_yaml

    folders = [Path(s).resolve().parent for s in specs if s.endswith((".yaml", ".yml"))]
    configs = []
    for spec in specs:
        path = Path(spec) if spec.endswith((".yaml", ".yml")) else _find_named(spec, folders)
        if not path.is_file():
            raise HarnessError(f"task {spec}: no such task YAML")
        cfg = load_yaml(path)
        if not isinstance(cfg.get("task"), str):
            raise HarnessError(f"{path}: a task YAML names one task (task: NAME); list a group's task YAMLs instead")
        configs.append(_local_data(cfg, path))
    return configs


def _find_named(name: str, folders: list[Path]) -> Path:
    from lm_eval.tasks._yaml_loader import load_yaml

    for folder in folders:
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            try:
                if load_yaml(path, resolve_func=False).get("task") == name:
                    return path
            except Exception:  # another kind of YAML in the folder
                continue
    raise HarnessError(_builtin_hint(name))


def _builtin_hint(name: str) -> str:
    """What to provide for a task known only by name: the built-in task's dataset, as a local file."""
    where = ""
    try:
        from lm_eval.tasks import TaskManager

        entry = TaskManager().task_index.get(name)
        built = dict(getattr(entry, "cfg", None) or {})
        if built.get("dataset_path"):
            split = built.get("test_split") or built.get("validation_split") or "test"
            source = built["dataset_path"] + (f"/{built['dataset_name']}" if built.get("dataset_name") else "")
            where = (
                f": the harness's built-in {name} reads {source} from the Hugging Face Hub; save its {split} split "
                f"as JSONL and give a copy of {entry.yaml_path} with dataset_path: json and "
                f"dataset_kwargs: {{data_files: {{{split}: FILE.jsonl}}}}"
            )
    except Exception:  # the hint is best effort; the refusal stands without it
        pass
    return (
        f"task {name}: not a task YAML given here, and nothing is downloaded{where or ''} "
        f"(a task YAML with local data: see {EXAMPLE})"
    )


def _local_data(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    cfg = dict(cfg)
    dataset = cfg.get("dataset_path")
    if dataset in LOCAL_LOADERS:
        kwargs = dict(cfg.get("dataset_kwargs") or {})
        files = kwargs.get("data_files")
        if not files:
            raise HarnessError(f"{path}: dataset_path {dataset} needs dataset_kwargs.data_files (the local file)")
        kwargs["data_files"] = _absolute(files, path.parent)
        for f in _flat(kwargs["data_files"]):
            if not Path(f).is_file():
                raise HarnessError(f"{path}: data file {f} is missing: provide it (nothing is downloaded)")
        cfg["dataset_kwargs"] = kwargs
    elif dataset and (path.parent / dataset).is_dir():
        cfg["dataset_path"] = str((path.parent / dataset).resolve())
    elif dataset and not Path(dataset).is_dir():
        split = cfg.get("test_split") or cfg.get("validation_split") or "test"
        raise HarnessError(
            f"{path}: dataset_path {dataset!r} would be downloaded from the Hugging Face Hub; save its {split} "
            f"split as FILE.jsonl and use dataset_path: json, dataset_kwargs: {{data_files: {{{split}: FILE.jsonl}}}}"
        )
    return cfg


def _absolute(files: Any, base: Path) -> Any:
    if isinstance(files, str):
        return files if Path(files).is_absolute() else str((base / files).resolve())
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    return [_absolute(f, base) for f in files]


def _flat(files: Any) -> list[str]:
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in _flat(v)]
    return [f for v in files for f in _flat(v)]


def run_tasks(
    model, tokenizer, configs: list[dict[str, Any]], limit: int | None = None, batch_size: int = 16
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from the harness's simple_evaluate on ``model`` (a transformers causal LM)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model.eval()
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=getattr(model.config, "max_position_embeddings", None),
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=configs,
        limit=limit,
        bootstrap_iters=0,  # standard errors by bootstrap take minutes; the means are what is compared
        log_samples=False,
        task_manager=TaskManager(include_defaults=False),  # no index of the built-in (downloading) tasks
        verbosity="ERROR",
    )
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in ("sample_len", "alias") or "stderr" in metric:  # bookkeeping, not scores
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                results.setdefault(task, {})[metric if filt in ("", "none") else f"{metric}_{filt}"] = float(value)
    return results


def evaluate_export(model_dir: str, specs: list[str], limit: int | None = None, batch_size: int = 16) -> dict[str, Any]:
    """pretrain-eval --model HF_DIR --tasks ...: the export (and its tokenizer) through the harness."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.runtime.checkpoint import hf_load

    missing = lm_eval_missing()
    if missing:
        raise HarnessError(missing)
    configs = task_configs(specs)
    model = hf_load(AutoModelForCausalLM.from_pretrained, model_dir)
    tokenizer = hf_load(AutoTokenizer.from_pretrained, model_dir)
    return {"model": model_dir, "results": run_tasks(model, tokenizer, configs, limit, batch_size)}


# ------------------------------------------------------------------ during training


def task_problems(recipe, zero_stage: int, tp: int, sp: int) -> list[str]:
    """eval.tasks checked before any rank starts: the package, the family, the layout, every task file."""
    tasks = recipe.eval.tasks
    if not tasks:
        return []
    missing = lm_eval_missing()
    if missing:
        return [f"eval.tasks: {missing}"]
    if recipe.family != "gpt":
        return [f"eval.tasks: lm-evaluation-harness tasks score a language model; family is {recipe.family}"]
    if zero_stage == 3 or tp > 1 or sp > 1:
        # the harness runs the whole model in one process (rank 0); ZeRO-3, TP and SP split its parameters
        return [
            "eval.tasks: runs the whole model on rank 0, which ZeRO stage 3, tensor or sequence parallelism "
            "split across ranks: use stage 0-2 without TP/SP, or run pretrain-eval --tasks on an export"
        ]
    try:
        task_configs(tasks)
    except HarnessError as e:
        return [f"eval.tasks: {e}"]
    return []


@functools.lru_cache(maxsize=4)
def _loaded(tokenizer_dir: str, tasks: tuple[str, ...]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir), task_configs(list(tasks))


def during_training(trainer, step: int) -> None:
    """The recipe's eval.tasks on the live model when due: rank 0 scores (the others wait at a
    barrier), one metrics.jsonl line {"split": "eval", TASK: {METRIC: value}} (TensorBoard: eval/TASK/METRIC)."""
    ev, last = trainer.recipe.eval, trainer.recipe.training.max_steps
    if not ev.tasks:
        return
    every = ev.tasks_every or ev.every
    if not ((every and step % every == 0) or step == last):
        return
    import torch.distributed as dist

    if trainer.is_main:
        tokenizer, configs = _loaded(str(trainer.inputs.tokenizer_dir), tuple(ev.tasks))
        model = trainer.engine.module
        results = run_tasks(model, tokenizer, configs, ev.tasks_limit, ev.batch_size or trainer.micro)
        model.train()
        trainer.metrics.log({"step": step, "split": "eval", **results})
    if dist.is_initialized():
        dist.barrier()
