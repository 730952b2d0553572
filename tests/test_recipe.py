"""Recipe validation and DeepSpeed "auto" filling: pure, no processes."""

import json
from pathlib import Path

import pytest

from pretrain.run.config import RECIPES_DIR, RecipeError, load_recipe, parse_recipe
from pretrain.run.ds_config import resolve_ds_config, zero_stage
from pretrain.run.schedules import effective_optimization

REPO = Path(__file__).resolve().parent.parent
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe, _ = load_recipe(str(path))
    assert recipe.name == path.stem
    assert (REPO / recipe.deepspeed_config).is_file()


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_ds_config_resolves(path):
    recipe = parse_recipe({"training": {"micro_batch_size": 4, "gradient_accumulation_steps": 2}})
    ds, _ = resolve_ds_config(json.loads(path.read_text()), recipe, world_size=2, hidden_size=64)
    assert ds["train_batch_size"] == 4 * 2 * 2
    assert '"auto"' not in json.dumps(ds)  # the value, not keys such as autotp_size
    assert zero_stage(ds) == int(path.stem[4])


def test_unknown_keys_wrong_types_and_ranges_are_all_reported_with_did_you_mean():
    bad = {"training": {"lrr": 1e-3, "micro_batch_size": "eight", "max_steps": 0}, "modle": {}, "eval": {"every": -1}}
    with pytest.raises(RecipeError) as e:
        parse_recipe(bad, "r.json")
    text = str(e.value)
    assert "r.json" in text
    assert "training.lrr: unknown key (did you mean 'lr'?)" in text
    assert "modle: unknown key (did you mean 'model'?)" in text
    assert "training.micro_batch_size" in text and "training.max_steps" in text and "eval.every" in text
    assert len(e.value.problems) == 5


def test_heads_must_divide_hidden():
    with pytest.raises(RecipeError, match="not divisible by num_heads"):
        parse_recipe({"model": {"hidden_size": 100, "num_heads": 3}})


def test_overrides_apply_before_validation():
    recipe, _ = load_recipe("gpt-tiny", {"training.max_steps": 7, "data.path": "/x", "eval.every": None})
    assert recipe.training.max_steps == 7 and recipe.data.path == "/x"
    assert recipe.eval.every == 50, "a None override leaves the recipe value"


def test_hf_docs_style_config_is_filled_like_the_hf_integration():
    ds = {
        "fp16": {"enabled": "auto"},
        "bf16": {"enabled": "auto"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": "auto",
                "warmup_max_lr": "auto",
                "warmup_num_steps": "auto",
                "total_num_steps": "auto",
            },
        },
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
    recipe = parse_recipe(
        {
            "training": {
                "lr": 1e-3,
                "warmup_steps": 5,
                "max_steps": 50,
                "precision": "bf16",
                "micro_batch_size": 3,
                "gradient_accumulation_steps": 4,
                "grad_clip": 0.5,
            }
        }
    )
    out, notes = resolve_ds_config(ds, recipe, world_size=8, hidden_size=100)
    assert out["train_batch_size"] == 96 and out["gradient_clipping"] == 0.5
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False
    assert out["optimizer"]["params"]["lr"] == 1e-3 and out["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert out["scheduler"]["params"] == {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 1e-3,
        "warmup_num_steps": 5,
        "total_num_steps": 50,
    }
    assert out["zero_optimization"]["reduce_bucket_size"] == 10000
    assert out["zero_optimization"]["stage3_param_persistence_threshold"] == 1000
    assert ds["train_batch_size"] == "auto", "the user's dict is not modified"
    # filled silently but for what changes the training: bf16 accumulation in fp32, DeepSpeed's warmup
    assert out["data_types"]["grad_accum_dtype"] == "fp32"
    assert [n.split(":")[0] for n in notes] == ["scheduler", "data_types.grad_accum_dtype"], notes


def test_concrete_batch_values_agree_with_a_written_recipe_win_over_a_default_and_bad_arithmetic_is_refused():
    """Issue 22 item 2's rule for the batch: a DeepSpeed value that differs from a micro-batch or accumulation
    the recipe wrote is refused; over a recipe default it is used, with a note."""
    written = parse_recipe({"training": {"micro_batch_size": 8, "gradient_accumulation_steps": 2}})
    with pytest.raises(RecipeError, match=r"train_micro_batch_size_per_gpu 2 in the DeepSpeed config != "):
        resolve_ds_config({"train_micro_batch_size_per_gpu": 2}, written, world_size=2, hidden_size=8)
    # a global batch that makes another accumulation than the recipe's is the same conflict
    with pytest.raises(RecipeError, match=r"train_batch_size 64 \(so gradient_accumulation_steps\) 4 in the"):
        resolve_ds_config({"train_batch_size": 64}, written, world_size=2, hidden_size=8)
    out, _ = resolve_ds_config({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8}, written, 2, 8)
    assert out["gradient_accumulation_steps"] == 2, "agreeing values pass"
    default = parse_recipe({})
    out, notes = resolve_ds_config({"train_micro_batch_size_per_gpu": 2}, default, world_size=2, hidden_size=8)
    assert out["train_batch_size"] == 4 and any("the recipe does not set training.micro_batch_size" in n for n in notes)
    out, _ = resolve_ds_config({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, default, 2, 8)
    assert out["gradient_accumulation_steps"] == 4
    with pytest.raises(RecipeError, match=r"train_batch_size 30 != .*\(= 32\)"):
        resolve_ds_config(
            {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4},
            default,
            2,
            8,
            "ds.json",
        )


def test_unfillable_auto_and_conflicting_precision_are_listed_together():
    recipe = parse_recipe({})
    with pytest.raises(RecipeError) as e:
        resolve_ds_config(
            {
                "optimizer": {"type": "Lamb", "params": {"max_coeff": "auto"}},
                "fp16": {"enabled": True},
                "bf16": {"enabled": True},
            },
            recipe,
            1,
            8,
            "ds.json",
        )
    assert "optimizer.params.max_coeff" in str(e.value) and "both true" in str(e.value)


def test_lr_scaling_rewrites_lr_and_warmup_and_says_so():
    recipe = parse_recipe(
        {
            "training": {
                "lr": 1e-3,
                "min_lr": 1e-4,
                "warmup_steps": 100,
                "micro_batch_size": 8,
                "reference_batch_size": 4,
                "lr_scaling": "sqrt",
                "scale_warmup": True,
            }
        }
    )
    ds, notes = resolve_ds_config(
        {
            "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
            "scheduler": {"type": "StepLR", "params": {"step_size": 10, "warmup_num_steps": "auto"}},
        },
        recipe,
        world_size=2,
        hidden_size=8,
    )
    assert ds["train_batch_size"] == 16
    derived = effective_optimization(recipe.training, ds["train_batch_size"])
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(2e-3) and derived.min_lr == pytest.approx(2e-4)
    assert derived.warmup_steps == 25 and recipe.training.lr == 1e-3, "derived values stay out of the recipe"
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 25
    assert any("sqrt scaling" in n and "0.001 -> 0.002" in n for n in notes)


def test_toolkit_scheduler_is_kept_in_the_config_but_not_given_to_deepspeed():
    from pretrain.run.ds_config import for_deepspeed

    recipe = parse_recipe({})
    ds, _ = resolve_ds_config(
        {"scheduler": {"type": "CyclicLR", "params": {"base_lr": "auto", "max_lr": "auto"}}}, recipe, 1, 8
    )
    assert ds["scheduler"]["params"]["max_lr"] == recipe.training.lr and "scheduler" not in for_deepspeed(ds)
    with pytest.raises(RecipeError, match="scheduler.type: unknown 'Cosine'"):
        resolve_ds_config({"scheduler": {"type": "Cosine"}}, recipe, 1, 8)


def test_deepspeeds_deprecated_forms_are_read_as_deepspeed_reads_them():
    recipe = parse_recipe({})
    ds, notes = resolve_ds_config({"zero_optimization": True, "bfloat16": {"enabled": True}}, recipe, 1, 8)
    assert ds["zero_optimization"] == {"stage": 1, "allgather_bucket_size": 500_000_000} and zero_stage(ds) == 1
    assert ds["bf16"] == {"enabled": True} and "bfloat16" not in ds
    assert any("deprecated form" in n for n in notes) and any("bfloat16" in n for n in notes)
    ds, _ = resolve_ds_config({"zero_optimization": False}, recipe, 1, 8)
    assert zero_stage(ds) == 0
    with pytest.raises(RecipeError, match="zero_optimization: must be an object"):
        resolve_ds_config({"zero_optimization": "stage2"}, recipe, 1, 8)
