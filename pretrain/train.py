"""Pretraining / fine-tuning entry point.

    deepspeed --num_gpus N pretrain/train.py --config gpt-tiny --deepspeed_config ds_configs/zero2_fp32.json
    torchrun --nproc_per_node N pretrain/train.py --config ...
    pretrain-train --config ...            (one process)

Everything that can be checked is checked before the process group starts, and no file is
written until the whole configuration is known to be valid.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by a launcher: import the repo, not pretrain/ siblings
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from pretrain.run.config import RecipeError, load_json, load_recipe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

EPILOG = """\
loss spikes (recipe training.loss_spike: action, window, threshold, min_steps, lr_factor, lr_steps, max_rewinds):
  a step is a spike when the highest loss of any rank exceeds the median of the last `window` judged steps'
  losses by more than `threshold` robust standard deviations (1.4826 x their median absolute deviation, at
  least 1% of the median); nothing is judged in the first `min_steps` steps. action warn logs it, skip drops the
  step's update (ZeRO 1-3), rewind loads the last sealed checkpoint before it, skips the data read since (the
  steps keep their numbers) and trains lr_steps steps at lr x lr_factor.

exit codes: 0 done, 1 training stopped (bad data, non-finite losses, a failed checkpoint), 2 bad configuration,
  75 preempted by SIGTERM/SIGUSR1 (checkpoint saved: run the same command again), 76 more loss spikes than
  training.loss_spike.max_rewinds
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG
    )
    p.add_argument(
        "--config", required=True, help="recipe JSON path, or a shipped recipe name (gpt-tiny, gpt2-124m, ...)"
    )
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="deepspeed_config",
        help='DeepSpeed JSON (default: the recipe\'s deepspeed_config); "auto" values are filled from the recipe',
    )
    p.add_argument(
        "--data",
        help="the data: a directory written by prepare-text / prepare-image-text, or one source "
        "string: a folder of raw (img2dataset) shards, a glob, a brace pattern /d/{00000..00099}.tar, "
        "a 'pipe:' command, an http(s):// pattern or an s3:// / gs:// URL (overrides data.path and "
        "data.sources)",
    )
    p.add_argument("--output-dir", help="run directory (overrides output_dir; default runs/<name>)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides training.max_steps)")
    p.add_argument(
        "--eval-every", type=int, help="evaluate on val every N steps, 0 = only at the end (overrides eval.every)"
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        help="checkpoint every N steps, 0 = only at the end (overrides checkpoint.every)",
    )
    p.add_argument("--init-from", help="local Hugging Face model directory to fine-tune (overrides model.init_from)")
    p.add_argument(
        "--resume",
        default="auto",
        help="auto: continue from OUTPUT/checkpoints/latest if present; none: start fresh; or a checkpoint path",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run Python code shipped inside the init_from model or tokenizer directory "
        "(off by default: such code runs with your permissions; only this flag enables it, a recipe's "
        "model.trust_remote_code is ignored)",
    )
    p.add_argument(
        "--allow-pipe",
        action="store_true",
        help="let the recipe's data sources be 'pipe:' commands (they run a shell command each; off by "
        "default, so a shared recipe runs nothing; a pipe: given with --data on this command line runs; "
        "WDS_SECURE=1 in the environment refuses every pipe:)",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="resume from a checkpoint whose files only a full unpickling reads (it can run any code they "
        "carry); without it every checkpoint file is read with torch.load(weights_only=True) and one that "
        "needs more is refused",
    )
    p.add_argument(
        "--skip-steps",
        action="append",
        type=_step_range,
        metavar="FIRST:LAST",
        help="read and do not train the batches of steps FIRST..LAST (repeatable; added to training.skip_steps): "
        "the steps keep their numbers, the counter and LR schedule move past them with no update, as Megatron's "
        "--skip-train-iteration-range. For data found bad by hand; a loss-spike rewind records its own ranges",
    )
    p.add_argument("--seed", type=int, help="seed for init, data order and dropout (overrides training.seed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=int(os.environ.get("LOCAL_RANK", 0)),
        help="set by the deepspeed launcher; do not pass by hand",
    )
    p.add_argument(
        "--deepspeed", action="store_true", help="accepted for compatibility with DeepSpeed scripts; ignored"
    )
    return p


def _step_range(text: str) -> list[int]:
    try:
        first, last = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIRST:LAST, two step numbers") from None
    return [first, last]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> str | None:
    """Outside a launcher, be a world of one. Returns a warning when a launcher seems to have been
    asked for several processes but started this one alone (accelerate on a CPU does)."""
    if "RANK" in os.environ:
        return None
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
    )
    if any(k.startswith("ACCELERATE_") for k in os.environ):
        return (
            "accelerate started this process alone (it set no RANK or WORLD_SIZE), so this is a world of one: "
            "`accelerate launch --cpu --num_processes N` runs one process on a CPU. For N processes use "
            "`deepspeed --num_gpus N` or `torchrun --nproc_per_node N`, or `accelerate launch --multi_gpu "
            "--num_processes N` on GPUs"
        )
    return None


def _resolve_path(p: str) -> Path:
    """Relative to the working directory, else to the repository (shipped configs)."""
    q = Path(p)
    return q if q.exists() or q.is_absolute() else (REPO / q if (REPO / q).exists() else q)


def _recipe_pipes(recipe, args: argparse.Namespace) -> list[tuple[str, str]]:
    """(key, url) of every pipe: source the recipe file wrote (not the --data typed on this command line)."""
    d = recipe.data
    found = [] if args.data else [("data.path", d.path or "")]
    for key, sources in (("data.sources", d.sources or []), ("data.eval_sources", d.eval_sources or [])):
        for i, src in enumerate(sources):
            urls = [src.urls] if isinstance(src.urls, str) else list(src.urls)
            found += [(f"{key}[{i}].urls", u) for u in urls]
    return [(key, url) for key, url in found if url.strip().startswith("pipe:")]


def prepare(args: argparse.Namespace):
    """Validate everything and return what the trainer needs; raises RecipeError listing all problems."""
    from transformers import AutoTokenizer

    from pretrain.models import RunData, family_name, get_family
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.run import features
    from pretrain.run.data import open_data
    from pretrain.run.ds_config import resolve_ds_config, run_optimization, settled_recipe
    from pretrain.run.feature import RunContext
    from pretrain.run.resolved import ResolvedRun
    from pretrain.runtime.checkpoint import CheckpointError, hf_load, resume_target

    overrides = {
        "data.path": args.data,
        "data.sources": [] if args.data else None,
        "output_dir": args.output_dir,
        "training.max_steps": args.max_steps,
        "eval.every": args.eval_every,
        "checkpoint.every": args.checkpoint_every,
        "model.init_from": args.init_from,
        "training.seed": args.seed,
        "model.trust_remote_code": True if args.trust_remote_code else None,
    }
    if getattr(args, "skip_steps", None):
        from pretrain.run.config import find_recipe

        written = load_json(find_recipe(args.config), "recipe").get("training", {}).get("skip_steps", [])
        overrides["training.skip_steps"] = [*written, *args.skip_steps]
    recipe, recipe_path = load_recipe(args.config, overrides)
    if recipe.model.trust_remote_code and not args.trust_remote_code and int(os.environ.get("RANK", 0)) == 0:
        # a shared recipe must not run a directory's code on its own: the command line decides
        print(
            f"warning: {recipe_path}: model.trust_remote_code is ignored; code shipped with a model or "
            "tokenizer runs only with --trust-remote-code on the command line",
            file=sys.stderr,
            flush=True,
        )
    recipe.model.trust_remote_code = bool(args.trust_remote_code)
    problems: list[str] = []
    ds_path = args.deepspeed_config or recipe.deepspeed_config
    ds_raw = None
    if not ds_path:
        problems.append("no DeepSpeed config: pass --deepspeed_config or set deepspeed_config in the recipe")
    else:
        ds_raw = load_json(_resolve_path(ds_path), "DeepSpeed config")
    pipes = _recipe_pipes(recipe, args)
    if pipes and not args.allow_pipe:  # refused before anything is expanded, counted or fetched
        raise RecipeError(
            str(recipe_path),
            [
                f"{key}: {url[:80]} is a pipe: command, which runs a shell command; a recipe's runs only with "
                "--allow-pipe on the command line (or give it with --data)"
                for key, url in pipes
            ],
        )
    family = get_family(family_name(recipe))
    data, data_problems, data_notes = open_data(recipe, family)
    problems.extend(data_problems)
    if recipe.data.tokenizer and not Path(recipe.data.tokenizer).is_dir():
        problems.append(f"data.tokenizer: {recipe.data.tokenizer} is not a directory")
        recipe.data.tokenizer = None
    if args.resume not in ("auto", "none"):
        try:
            resume_target(Path(args.resume), args.resume)
        except CheckpointError as e:
            problems.append(str(e))
    if recipe.model.init_from and not Path(recipe.model.init_from, "config.json").is_file():
        problems.append(
            f"model.init_from: {recipe.model.init_from}/config.json not found (a local Hugging Face model directory)"
        )
        recipe.model.init_from = None
    if problems or data is None:
        raise RecipeError(str(recipe_path), problems)

    tokenizer_dir = family.tokenizer_dir(recipe, data)
    if tokenizer_dir is None:
        raise RecipeError(
            str(recipe_path),
            [
                f"data.tokenizer: not set, and {data.root} has no tokenizer of its own; "
                "name a local Hugging Face tokenizer directory"
            ],
        )
    try:
        tokenizer = hf_load(AutoTokenizer.from_pretrained, tokenizer_dir, recipe.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise RecipeError(str(recipe_path), [f"tokenizer {tokenizer_dir}: cannot be loaded ({e})"]) from None
    try:
        model_config = family.model_config(recipe.model, tokenizer)
    except (OSError, ValueError) as e:  # an unknown model_type, a custom one's code refused, a broken config.json
        if not recipe.model.init_from:
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(
            str(recipe_path), [f"model.init_from (--init-from): {recipe.model.init_from}/config.json: {reason}"]
        ) from None
    model_problems = family.check(recipe, data, model_config, tokenizer)
    problems.extend(model_problems)
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        layout = ParallelLayout.from_deepspeed(ds_raw, world)
    except ValueError as e:
        problems.append(f"{ds_path}: {e}")
        layout = ParallelLayout(world)
    problems.extend(f"{ds_path}: {p}" for p in layout.problems())
    ds_config, notes = None, []
    try:
        # every rank of a TP/SP group trains on the same micro-batch: the batch is micro x gas x DP
        ds_config, notes = resolve_ds_config(ds_raw, recipe, layout.dp, family.hidden_size(model_config), str(ds_path))
    except RecipeError as e:
        problems.extend(e.problems)
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE: the ranks on this machine
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    ctx = RunContext(
        recipe, family, model_config, data, layout, ds_config, str(ds_path), local, model_ok=not model_problems
    )
    problems.extend(features.problems(ctx))
    from pretrain.runtime.trackers import tracker_problems  # a tracker not installed: named with its extra

    problems.extend(tracker_problems(recipe.logging.report_to))
    from pretrain.evals.harness import task_problems  # eval.tasks: lm_eval installed, local task files, a layout

    zero_stage = int(((ds_config or ds_raw).get("zero_optimization") or {}).get("stage", 0))
    problems.extend(task_problems(recipe, zero_stage, layout.tp, layout.sp))
    if problems:
        raise RecipeError(str(recipe_path), problems)
    notes.extend(features.configure(ds_config, ctx))
    # where a DeepSpeed value won over a recipe default, the run (and resolved-config.json) uses it
    recipe = settled_recipe(recipe, ds_config)
    resolved = ResolvedRun(
        recipe=recipe,
        deepspeed=ds_config,
        optimization=run_optimization(recipe.training, ds_config),
        world_size=world,
        tokens_per_sample=family.tokens_per_sample(data, model_config),
        flops_per_sample=family.train_flops_per_sample(model_config, data),
        data_path=Path(data.root),
        data_kind=data.KIND,
        notes=[*data_notes, *notes],
        data_sources=data.to_json(),
    )
    run_dir = Path(recipe.output_dir or f"runs/{recipe.name}")
    return resolved, RunData(data, tokenizer_dir, model_config), run_dir


def _remove_shm_buffers() -> None:
    """DeepSpeed's CPU all-reduce leaves a shared-memory buffer per rank in /dev/shm (RAM) named
    after the master address and port; a machine running many jobs fills up with them."""
    import glob

    addr, port, local = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), os.environ.get("LOCAL_RANK", "0")
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{local}"):
        try:
            os.remove(path)
        except OSError:
            pass


_STARTED_DISTRIBUTED = False


def main(argv: list[str] | None = None, hooks=None) -> int:
    """The command line. ``hooks`` (a `pretrain.runtime.hooks.TrainerHooks`) is for tests that watch or
    disturb a run from outside; the command line itself never builds one."""
    try:
        rc = _main(argv, hooks)
    finally:
        _remove_shm_buffers()
        if hooks is not None:
            hooks.close()
    if _STARTED_DISTRIBUTED:
        # After a distributed run, torch's C++ communication threads can abort the interpreter's
        # teardown ("terminate called without an active exception", seen with ZeRO-3 on gloo under
        # load) and turn a finished run into exit -6. Everything is written and closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _main(argv: list[str] | None = None, hooks=None) -> int:
    args = build_parser().parse_args(argv)
    from pretrain.runtime.checkpoint import trusting

    with trusting(remote_code=args.trust_remote_code, checkpoint=args.trust_checkpoint):
        return _run(args, hooks)


def _run(args: argparse.Namespace, hooks=None) -> int:
    alone = single_process_env()
    if alone:
        print(f"warning: {alone}", file=sys.stderr, flush=True)
    rank = int(os.environ.get("RANK", 0))
    try:
        resolved, inputs, run_dir = prepare(args)
    except RecipeError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    import deepspeed
    import torch.distributed as dist

    from pretrain.runtime.checkpoint import CheckpointError
    from pretrain.runtime.trainer import PREEMPTED_EXIT, Trainer, TrainingStopped

    global _STARTED_DISTRIBUTED
    deepspeed.init_distributed()
    _STARTED_DISTRIBUTED = True
    if rank == 0:
        for note in resolved.notes:
            print(f"note: {note}", flush=True)
    trainer = Trainer(resolved, inputs, run_dir, args.resume, progress=not args.no_progress, hooks=hooks)
    try:
        trainer.setup()
        final = trainer.fit()
    except (TrainingStopped, CheckpointError) as e:  # decided collectively, so every rank stops here together
        if rank == 0:
            kind = "training stopped" if isinstance(e, TrainingStopped) else "checkpoint"
            print(f"error: {kind}: {e}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        return getattr(e, "exit_code", 1)  # loss spikes past max_rewinds: 76
    if trainer.preempted:
        if rank == 0:
            print(
                f"preempted at step {trainer.state.step}: checkpoint saved; rerun the same command to continue "
                f"(exit {PREEMPTED_EXIT})",
                flush=True,
            )
        dist.destroy_process_group()
        return PREEMPTED_EXIT
    if rank == 0:
        if final:
            val = f"val loss {final['loss']:.4f}" if final.get("loss") is not None else f"val: {final.get('note')}"
            print(f"done: step {trainer.state.step}, {val}, run dir {run_dir}", flush=True)
        else:
            print(f"done: step {trainer.state.step} (nothing left to train), run dir {run_dir}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
