"""Which value a run uses when the DeepSpeed config and the recipe both hold a setting (README, precedence
table): a recipe value the user wrote must agree with a concrete DeepSpeed value, a recipe default gives way
to it (with a note), and a setting the DeepSpeed config lacks takes the recipe's value."""

import json

import pytest

from pretrain.run.config import RecipeError, parse_recipe
from pretrain.run.ds_config import precision, resolve_ds_config, run_optimization, settled_recipe
from tests.launch import REPO
from tests.launch import world_of_one as launch_world_of_one

TINY = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())


def _resolve(ds: dict, **training):
    recipe = parse_recipe({"training": training})
    out, notes = resolve_ds_config(ds, recipe, 1, 8, "ds.json")
    return recipe, out, notes


# ------------------------------------------------------------------------------------ pure rules


def test_a_concrete_lr_beats_the_default_lr_and_is_the_schedules_peak():
    recipe, ds, notes = _resolve({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}})
    assert "scheduler" not in ds and recipe.training.lr == 3e-4
    assert run_optimization(recipe.training, ds).lr == 1e-4
    assert settled_recipe(recipe, ds).training.lr == 1e-4
    assert any(n.startswith("optimizer.params.lr=0.0001 from the DeepSpeed config is used") for n in notes), notes


def test_a_concrete_lr_that_disagrees_with_a_written_lr_is_refused_naming_both():
    with pytest.raises(RecipeError) as e:
        _resolve({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, lr=6e-4)
    (problem,) = e.value.problems
    assert "optimizer.params.lr 0.0001" in problem and "training.lr 0.0006" in problem and '"auto"' in problem


def test_every_disagreement_is_listed_together():
    ds = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.5, "betas": [0.9, 0.99], "eps": 1e-6}},
        "gradient_clipping": 2.0,
        "bf16": {"enabled": True},
    }
    with pytest.raises(RecipeError) as e:
        _resolve(ds, lr=6e-4, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8, grad_clip=1.0, precision="fp32")
    text = str(e.value)
    assert len(e.value.problems) == 6, text
    for ds_key, recipe_key in (
        ("optimizer.params.lr 0.0001", "training.lr 0.0006"),
        ("optimizer.params.weight_decay 0.5", "training.weight_decay 0.1"),
        ("optimizer.params.betas [0.9, 0.99]", "training.betas [0.9, 0.95]"),
        ("optimizer.params.eps 1e-06", "training.eps 1e-08"),
        ("gradient_clipping 2.0", "training.grad_clip 1.0"),
        ("bf16.enabled true", 'training.precision "fp32"'),
    ):
        assert any(ds_key in p and recipe_key in p for p in e.value.problems), (ds_key, text)


def test_agreeing_values_and_autos_pass_silently():
    ds = {
        "optimizer": {"type": "AdamW", "params": {"lr": 6e-4, "weight_decay": "auto"}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
    }
    recipe, out, notes = _resolve(ds, lr=6e-4, weight_decay=0.2, precision="bf16")
    assert out["optimizer"]["params"]["weight_decay"] == 0.2 and notes == []
    assert settled_recipe(recipe, out) is recipe


def test_bf16_in_the_config_against_a_written_fp32_is_refused_but_beats_a_default():
    with pytest.raises(RecipeError, match=r'bf16.enabled true .* != training.precision "fp32"'):
        _resolve({"bf16": {"enabled": True}}, precision="fp32")
    recipe, ds, notes = _resolve({"fp16": {"enabled": True}})
    assert precision(ds) == "fp16" and settled_recipe(recipe, ds).training.precision == "fp16"
    assert any("the run trains in fp16" in n for n in notes)


def test_auto_or_missing_precision_means_the_recipes():
    recipe, ds, _ = _resolve({"fp16": {"enabled": "auto"}})
    assert precision(ds) == "bf16" == recipe.training.precision and ds["fp16"]["enabled"] is False
    _, ds, _ = _resolve({}, precision="fp32")
    assert precision(ds) == "fp32"
    _, ds, _ = _resolve({"fp16": {"enabled": False}}, precision="bf16")
    assert precision(ds) == "bf16", "another section switched off says nothing about bf16"


def test_missing_gradient_clipping_takes_the_recipes():
    _, ds, _ = _resolve({})
    assert ds["gradient_clipping"] == 1.0
    _, ds, _ = _resolve({}, grad_clip=0.5)
    assert ds["gradient_clipping"] == 0.5


# ------------------------------------------------------------------------------------ a real engine


@pytest.fixture(scope="module")
def engine_run(prepared_stdlib, tmp_path_factory):
    """One engine built the way a run builds it, from a DeepSpeed config with concrete lr and weight decay and
    no gradient_clipping, and a recipe that writes neither lr nor weight_decay, and grad_clip 0.5 (DeepSpeed's
    own default, 1.0, is what an absent gradient_clipping would give)."""
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    tmp = tmp_path_factory.mktemp("precedence")
    ds = json.loads((REPO / "ds_configs/zero0_fp32.json").read_text())
    ds["optimizer"]["params"].update(lr=1e-4, weight_decay=0.5)
    del ds["gradient_clipping"]
    (tmp / "ds.json").write_text(json.dumps(ds))
    r = json.loads(json.dumps(TINY))
    for key in ("lr", "min_lr", "weight_decay"):
        r["training"].pop(key, None)
    r["training"].update(warmup_steps=0, grad_clip=0.5)
    (tmp / "recipe.json").write_text(json.dumps(r))
    args = build_parser().parse_args(
        [
            "--config",
            str(tmp / "recipe.json"),
            "--deepspeed_config",
            str(tmp / "ds.json"),
            "--data",
            str(prepared_stdlib),
            "--output-dir",
            str(tmp / "run"),
            "--max-steps",
            "2",
            "--no-progress",
        ]
    )
    with launch_world_of_one():
        resolved, inputs, run_dir = prepare(args)
        trainer = Trainer(resolved, inputs, run_dir, args.resume, progress=False)
        trainer.setup()
        yield trainer


def test_the_engine_decays_with_the_configs_weight_decay_and_the_log_says_so(engine_run):
    groups = engine_run.engine.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    notes = engine_run.run.notes
    assert any(n.startswith("optimizer.params.weight_decay=0.5 from the DeepSpeed config") for n in notes), notes


def test_the_schedule_peaks_at_the_configs_lr(engine_run):
    assert engine_run.run.optimization.lr == 1e-4
    assert engine_run.engine.get_lr()[0] == pytest.approx(1e-4), "no warmup: step 1 trains at the peak"


def test_the_engine_clips_at_the_recipes_grad_clip_when_the_config_has_none(engine_run):
    assert engine_run.engine.gradient_clipping() == 0.5


def test_resolved_config_holds_what_the_engine_uses(engine_run):
    resolved = json.loads((engine_run.run_dir / "resolved-config.json").read_text())
    engine = resolved["engine"]
    assert [(g["lr"], g["weight_decay"]) for g in engine["param_groups"]] == [
        (pytest.approx(1e-4), 0.5),
        (pytest.approx(1e-4), 0.0),
    ]
    assert engine["gradient_clipping"] == 0.5 and engine["precision"] == "fp32" and engine["zero_stage"] == 0
    assert (engine["micro_batch_size"], engine["gradient_accumulation_steps"], engine["global_batch"]) == (8, 1, 8)
    assert resolved["recipe"]["training"]["weight_decay"] == 0.5 and resolved["optimization"]["lr"] == 1e-4
