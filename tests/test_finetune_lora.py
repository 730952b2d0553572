"""Fine-tuning pretrained models: LoRA adapters (peft) on GPT and CLIP, --init-from loaded
partitioned under ZeRO-3, exports of adapters and merged models, and pretrain-eval --model.

One real 2-rank `deepspeed` run (ZeRO-3, LoRA, --init-from a saved model) carries the multi-rank
claims; the rest runs in this process (a gloo world of one, real DeepSpeed engines).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import REPO, deepspeed_cmd, run
from tests.launch import world_of_one as launch_world_of_one

LORA = {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_proj"]}


def _gpt_recipe(tmp: Path, lora=LORA, **training) -> str:
    r = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    if lora is not None:
        r["model"]["lora"] = lora
    r["training"].update(dict(max_steps=3, lr=1e-2, warmup_steps=0, micro_batch_size=4), **training)
    r["eval"].update(every=0, max_samples=64)
    path = tmp / f"recipe-{len(list(tmp.glob('recipe-*')))}.json"
    path.write_text(json.dumps(r))
    return str(path)


@pytest.fixture(scope="module")
def base_gpt(prepared_stdlib, tmp_path_factory) -> Path:
    """A small pretrained GPT-2 as a Hugging Face directory, with the data's tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base") / "gpt"
    config = GPT2Config(
        vocab_size=1024, n_positions=64, n_embd=64, n_layer=2, n_head=4, use_cache=False, bos_token_id=0, eos_token_id=0
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    shutil.copytree(prepared_stdlib / "tokenizer", out, dirs_exist_ok=True)
    return out


@pytest.fixture(scope="module")
def zero3_lora(prepared_stdlib, base_gpt, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-3, LoRA on --init-from; the probe reports how each rank loaded the model."""
    tmp = tmp_path_factory.mktemp("z3lora")
    args = [
        "--config",
        _gpt_recipe(tmp),
        "--data",
        str(prepared_stdlib),
        "--init-from",
        str(base_gpt),
        "--deepspeed_config",
        "ds_configs/zero3_fp32.json",
        "--output-dir",
        str(tmp / "run"),
        "--no-progress",
    ]
    p = run(deepspeed_cmd(2, [str(tmp / "probe"), "--", *args], script=str(REPO / "tests" / "zero3_load_probe.py")))
    assert "parameters: 5,632 trainable of 175,360" in p.stdout
    return tmp


@pytest.mark.slow
def test_zero3_init_from_loads_partitioned_and_equal_to_the_checkpoint(zero3_lora):
    """Each rank held half the elements as soon as the model was built (zero.Init; transformers
    reads the file on rank 0 only), before any adapter or deepspeed.initialize; gathered, every
    weight equals the saved model's."""
    reports = [json.loads((zero3_lora / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world"] == 2 and rep["partitioned"], rep
        assert rep["ds_numel"] == 175_360 - 5_632
        assert 0.45 <= rep["local_numel"] / rep["ds_numel"] <= 0.55, rep
        assert rep["differ"] == [] and rep["missing"] == [], rep


@pytest.mark.slow
def test_lora_under_zero3_trains_only_adapters_and_exports_adapter_and_merged(
    zero3_lora, base_gpt, prepared_stdlib, capsys
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pretrain.cli.evaluate import evaluate
    from pretrain.cli.evaluate import main as eval_main
    from pretrain.cli.export import export
    from pretrain.run.build import fp32_state_dict
    from pretrain.runtime.checkpoint import resolve_checkpoint

    run_dir = zero3_lora / "run"
    # r x (in + out) per adapted layer: c_attn 64->192, attn c_proj 64->64, mlp c_proj 256->64; 2 layers
    assert json.loads((run_dir / "resolved-config.json").read_text())["parameters"] == {
        "trainable": 2 * 4 * ((64 + 192) + (64 + 64) + (256 + 64)),
        "total": 175_360,
    }

    # the checkpoint holds the frozen base bit-identical and the adapters trained
    base = load_file(base_gpt / "model.safetensors")
    state = fp32_state_dict(resolve_checkpoint(run_dir))
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    assert len(lora) == 12 and all(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)
    plain = {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}
    assert plain.keys() - {"lm_head.weight"} == base.keys()
    assert all(torch.equal(plain[k], base[k]) for k in base)

    adapter, merged = zero3_lora / "adapter", zero3_lora / "merged"
    export(str(run_dir), str(adapter))
    export(str(run_dir), str(merged), merge=True)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in adapter.iterdir()}
    assert not (adapter / "model.safetensors").exists() and (merged / "model.safetensors").exists()
    assert "LoRA adapter" in (adapter / "README.md").read_text() and "ZeRO-3" in (merged / "README.md").read_text()

    x = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_gpt), str(adapter))(
            input_ids=x
        ).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged)(input_ids=x).logits
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=1e-5)

    # pretrain-eval: the checkpoint, its exports and the model before fine-tuning, one command each
    def eval_json(*args):
        assert eval_main([*args, "--data", str(prepared_stdlib), "--max-samples", "64", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    capsys.readouterr()
    ckpt = eval_json("--checkpoint", str(run_dir))
    after = eval_json("--model", str(merged))
    assert after["format"] == "hf" and after["loss"] == pytest.approx(ckpt["loss"], rel=1e-6)
    assert evaluate(str(adapter), str(prepared_stdlib), max_samples=64)["loss"] == pytest.approx(ckpt["loss"], rel=1e-6)
    before = eval_json("--model", str(base_gpt))
    assert before["tokens"] == ckpt["tokens"] and before["loss"] > ckpt["loss"], "three adapter steps lowered val loss"
    assert eval_main(["--model", str(run_dir), "--data", str(prepared_stdlib)]) == 2
    assert "--checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- in one process


@pytest.fixture(scope="module")
def world_of_one():
    with launch_world_of_one():
        yield


def _trainer(argv: list[str]):
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    args = build_parser().parse_args([*argv, "--no-progress"])
    trainer = Trainer(*prepare(args), args.resume, progress=False)
    trainer.setup()
    return trainer


def _adapters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if ".lora_" in k}


def test_bad_lora_settings_are_refused_before_training(prepared_stdlib, tmp_path):
    from pretrain.run.config import RecipeError
    from pretrain.train import build_parser, prepare

    recipe = _gpt_recipe(tmp_path, lora={"r": 4, "target_modules": ["c_atn", "attn"]})
    with pytest.raises(RecipeError) as e:
        prepare(
            build_parser().parse_args(
                ["--config", recipe, "--data", str(prepared_stdlib), "--output-dir", str(tmp_path / "out")]
            )
        )
    text = str(e.value)
    assert "model.lora: needs model.init_from" in text
    assert "['c_atn'] match no layer" in text
    assert "'attn' matches GPT2Attention layers" in text and "LoRA cannot adapt" in text
    assert not (tmp_path / "out").exists()


def test_lora_checkpoint_resumes_with_its_adapters(world_of_one, prepared_stdlib, base_gpt, tmp_path):
    recipe = _gpt_recipe(tmp_path)
    argv = [
        "--config",
        recipe,
        "--data",
        str(prepared_stdlib),
        "--init-from",
        str(base_gpt),
        "--output-dir",
        str(tmp_path / "run"),
    ]
    first = _trainer([*argv, "--max-steps", "2"])
    assert first.run.zero_stage == 2
    first.fit()
    saved = _adapters(first.engine.module)
    resumed = _trainer([*argv, "--max-steps", "3"])
    assert resumed.state.step == 2
    now = _adapters(resumed.engine.module)
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)
    resumed.fit()
    assert resumed.state.step == 3
    base = load_file(base_gpt / "model.safetensors")
    for name, p in resumed.engine.module.named_parameters():
        if ".lora_" not in name:
            assert not p.requires_grad and torch.equal(p.detach(), base[name.replace(".base_layer", "")]), name


@pytest.mark.parametrize("stage", [2, 3])
def test_clip_lora_under_zero_trains_adapters_on_both_towers_and_merges(stage, world_of_one, tmp_path):
    """Under ZeRO-3 CLIP is built whole (its 0-dim temperature defeats zero.Init) and partitioned by the engine."""
    import deepspeed
    from peft import PeftModel
    from transformers import AutoTokenizer, CLIPModel

    from data_pipelines.image.synthetic import main as synthetic
    from pretrain.cli.export import export
    from pretrain.models.clip import hf_config
    from pretrain.run.config import load_recipe

    data = tmp_path / "shapes"
    assert synthetic(["--output", str(data), "--count", "160", "--image-size", "32", "--no-progress"]) == 0
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    recipe, _ = load_recipe("clip-tiny")
    torch.manual_seed(0)
    base = tmp_path / "base"
    CLIPModel(hf_config(recipe.model, len(tok), tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)).save_pretrained(
        base
    )
    r = json.loads((REPO / "pretrain/recipes/clip-tiny.json").read_text())
    r["model"]["lora"] = {"r": 4, "alpha": 8}  # default targets for CLIP: q_proj, v_proj of both towers
    r["training"].update(micro_batch_size=16, lr=1e-2, warmup_steps=0, log_every=1)
    r["eval"].update(every=0, max_samples=32)
    (tmp_path / "clip.json").write_text(json.dumps(r))

    trainer = _trainer(
        [
            "--config",
            str(tmp_path / "clip.json"),
            "--data",
            str(data),
            "--init-from",
            str(base),
            "--output-dir",
            str(tmp_path / "run"),
            "--max-steps",
            "3",  # the LR is 0 at step 1
            "--deepspeed_config",
            f"ds_configs/zero{stage}_fp32.json",
        ]
    )
    assert trainer.run.zero_stage == stage
    trained = {k for k, p in trainer.engine.module.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in k for k in trained)
    assert any(k.startswith("clip.vision_model.") for k in trained) and any(
        k.startswith("clip.text_model.") for k in trained
    )
    trainer.fit()
    saved = load_file(base / "model.safetensors")
    params = list(trainer.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        frozen = {
            k.removeprefix("clip.").replace(".base_layer", ""): p.detach().clone()
            for k, p in params
            if ".lora_" not in k
        }
    assert frozen.keys() == saved.keys()
    assert all(torch.equal(frozen[k].reshape(saved[k].shape), saved[k]) for k in saved), "the base is bit-identical"
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    export(str(tmp_path / "run"), str(adapter))
    export(str(tmp_path / "run"), str(merged), merge=True)
    trained_b = {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if ".lora_B." in k}
    assert len(trained_b) == 8 and all(v.abs().sum() > 0 for v in trained_b.values())
    ids = torch.tensor([[5, 9, 12, tok.eos_token_id]])  # CLIP pools at the first eos
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_clip = PeftModel.from_pretrained(CLIPModel.from_pretrained(base), str(adapter))
        plain = CLIPModel.from_pretrained(merged)
        original = CLIPModel.from_pretrained(base)
        for fn in ("get_text_features", "get_image_features"):
            arg = {"input_ids": ids} if fn == "get_text_features" else {"pixel_values": pixels}
            ref = getattr(peft_clip, fn)(**arg)
            ref = getattr(ref, "pooler_output", ref)
            got = getattr(plain, fn)(**arg)
            got = getattr(got, "pooler_output", got)
            orig = getattr(original, fn)(**arg)
            orig = getattr(orig, "pooler_output", orig)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(got, orig, atol=1e-6), f"{fn}: the adapters changed nothing"
