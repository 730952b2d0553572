"""pretrain-plan: the formulas at hand-computed points, recipe parameter counts, and the command line."""

from __future__ import annotations

import json

import pytest

from pretrain.cli import plan as P
from pretrain.cli.plan import (
    activation_bytes,
    gpu_days,
    main,
    min_gpus,
    parse_count,
    total_flops,
    total_flops_from_samples,
    zero_model_states_bytes,
)


def run_json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "text, value",
    [
        ("124e6", 124_000_000),
        ("1.3B", 1_300_000_000),
        ("350M", 350_000_000),
        ("7b", 7_000_000_000),
        ("300B", 300_000_000_000),
        ("2.5T", 2_500_000_000_000),
        ("10k", 10_000),
        ("1_000", 1000),
        ("42", 42),
        (" 6.7G ", 6_700_000_000),
    ],
)
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1.3X", "B", "-5M", "0", "1e", "nan"])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError):
        parse_count(text)


@pytest.mark.parametrize("stage, gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure1(stage, gb):
    # Rajbhandari et al. 2020, Figure 1: Psi = 7.5B, Nd = 64, K = 12.
    assert round(zero_model_states_bytes(7.5e9, stage, 64, "bf16") / 1e9, 1) == gb


def test_zero_exact_and_fp32():
    psi = 7.5e9
    assert zero_model_states_bytes(psi, 1, 64) == pytest.approx(4 * psi + 12 * psi / 64)
    assert zero_model_states_bytes(psi, 2, 64) == pytest.approx(2 * psi + 14 * psi / 64)
    # fp32: weights 4 + grads 4 + Adam K=8 = 16 bytes, stage 1 on 4 ranks: 8 + 8/4 = 10 bytes/param.
    assert zero_model_states_bytes(1e9, 0, 4, "fp32") == pytest.approx(16e9)
    assert zero_model_states_bytes(1e9, 1, 4, "fp32") == pytest.approx(10e9)
    assert zero_model_states_bytes(1e9, 3, 4, "tf32") == pytest.approx(4e9)


def test_gpt3_flops_and_gpu_days():
    flops = total_flops(175e9, 300e9)
    assert flops == pytest.approx(3.15e23)
    # One A100 at 312 TFLOPS x 0.5 = 1.56e14 FLOP/s: 3.15e23 / 1.56e14 = 2.0192e9 s = 23370.7 days.
    assert gpu_days(flops, 312, 0.5) == pytest.approx(23370.73, rel=1e-6)
    assert gpu_days(flops, 312, 0.5, num_gpus=1024) == pytest.approx(23370.73 / 1024, rel=1e-6)


def test_attention_flops_and_per_sample():
    # 12 · L · s · h · D = 12 · 2 · 8 · 4 · 10 = 7680, on top of 6 · 100 · 10 = 6000.
    assert total_flops(100, 10, attention=True, num_layers=2, seq_len=8, hidden_size=4) == 13680
    with pytest.raises(ValueError):
        total_flops(100, 10, attention=True)
    assert total_flops_from_samples(4.4e9, 1000) == pytest.approx(1.32e13)


def test_activation_formula_hand_point():
    # s=1024, b=16, h=768, a=12, L=12 (GPT-2 small): s·b·h = 12,582,912; 34 + 5·12·1024/768 = 114.
    per_layer = 12_582_912 * 114
    assert activation_bytes(1024, 16, 768, 12, 12) == 12 * per_layer == 17_213_423_616
    assert activation_bytes(1024, 16, 768, 12, 12, checkpointing=True) == 2 * 12_582_912 * 12 + per_layer
    assert activation_bytes(1024, 16, 768, 12, None, flash_attention=True) == 34 * 12_582_912 * 12
    assert activation_bytes(1024, 16, 768, 12, 12, dtype="fp32") == 2 * 12 * per_layer


def test_min_gpus_hand_computed():
    usable = 78e9  # a100-80g less the 2 GB reserve
    assert min_gpus(7.5e9, 0, usable) is None  # 120 GB, sharding nothing
    assert min_gpus(7.5e9, 1, usable) == 2  # 30 + 90/Nd <= 78  ->  Nd >= 1.875
    assert min_gpus(7.5e9, 2, usable) == 2  # 15 + 105/Nd <= 78 ->  Nd >= 1.67
    assert min_gpus(7.5e9, 3, usable) == 2  # 120/Nd <= 78      ->  Nd >= 1.54
    assert min_gpus(7.5e9, 3, usable, other_bytes=70e9) == 15  # 120/Nd <= 8 -> Nd >= 15
    assert min_gpus(7.5e9, 1, usable, other_bytes=50e9) is None  # 30 + 50 > 78 whatever Nd
    assert min_gpus(1e6, 0, usable) == 1


def test_recipe_params():
    gpt2 = P.recipe_shape("gpt2-124m")  # vocab 50304 (GPT-2's 50257 padded to 64)
    assert abs(gpt2.params - 124e6) / 124e6 < 0.01
    assert (gpt2.seq_len, gpt2.hidden_size, gpt2.num_layers, gpt2.num_heads, gpt2.micro_batch) == (
        1024,
        768,
        12,
        12,
        16,
    )

    from pretrain.run.config import load_recipe

    recipe, _ = load_recipe("gpt2-124m", {"model.vocab_size": 50257})
    assert P.gpt_shape(recipe, 0).params == 124_439_808  # the published GPT-2 small count

    llama = P.recipe_shape("llama-1b")
    assert 1.0e9 < llama.params < 1.2e9
    assert (llama.seq_len, llama.hidden_size, llama.num_layers, llama.num_heads) == (2048, 2048, 16, 32)


def test_cli_json_recipe(capsys):
    r = run_json(capsys, "--recipe", "gpt2-124m", "--tokens", "10B", "--gpu", "a100", "--num-gpus", "8")
    for key in (
        "params",
        "tokens",
        "total_flops",
        "gpu_days",
        "wall_days",
        "gpu_hours",
        "weights_gb",
        "zero",
        "cheapest_stage",
        "gpu",
        "dtype",
        "peak_tflops",
        "mfu",
        "num_gpus",
    ):
        assert key in r
    assert r["tokens"] == 10**10 and r["dtype"] == "bf16" and r["peak_tflops"] == 312 and r["mfu"] == 0.4
    assert r["total_flops"] == pytest.approx(6 * r["params"] * 1e10)
    assert r["gpu_hours"] == pytest.approx(24 * r["gpu_days"])
    assert r["wall_days"] == pytest.approx(r["gpu_days"] / 8)
    assert r["weights_gb"] == pytest.approx(r["params"] * 2 / 1e9)
    assert set(r["zero"]) == {"zero0", "zero1", "zero2", "zero3"}
    z0 = r["zero"]["zero0"]
    assert z0["activations_gb_per_gpu"] == pytest.approx(17.213423616)
    assert z0["memory_gb_per_gpu"] == pytest.approx(z0["model_states_gb_per_gpu"] + z0["activations_gb_per_gpu"])
    assert r["cheapest_stage"] == 0 and z0["fits"] and z0["min_gpus"] == 1

    ckpt = run_json(
        capsys,
        "--recipe",
        "gpt2-124m",
        "--tokens",
        "10B",
        "--gpu",
        "a100",
        "--num-gpus",
        "8",
        "--activation-checkpointing",
    )["zero"]["zero0"]
    assert ckpt["memory_gb_per_gpu"] == pytest.approx(
        z0["model_states_gb_per_gpu"] + z0["activations_checkpointed_gb_per_gpu"]
    )


def test_cli_cheapest_stage_moves_up_on_smaller_gpus(capsys):
    base = ["--params", "7.5B", "--tokens", "1B", "--num-gpus", "64", "--dtype", "fp16"]
    stages = {gpu: run_json(capsys, *base, "--gpu", gpu)["cheapest_stage"] for gpu in ("a100-80g", "v100", "t4")}
    # usable 78 GB: ZeRO-1 (31.4) fits; 30 GB: only ZeRO-2 (16.6); 14 GB: only ZeRO-3 (1.9).
    assert stages == {"a100-80g": 1, "v100": 2, "t4": 3}
    assert (
        run_json(capsys, "--params", "1T", "--tokens", "1B", "--gpu", "t4", "--dtype", "fp16")["cheapest_stage"] is None
    )


def test_cli_samples_seq_len_attention_and_flops_per_sample(capsys):
    r = run_json(capsys, "--params", "1B", "--samples", "1M", "--seq-len", "2048", "--gpu", "h100")
    assert r["tokens"] == 2048 * 10**6 and r["total_flops"] == pytest.approx(6e9 * 2.048e9)
    assert r["zero"]["zero0"]["activations_gb_per_gpu"] is None  # no sizes given: model states only

    r = run_json(
        capsys,
        "--params",
        "1B",
        "--tokens",
        "1B",
        "--seq-len",
        "2048",
        "--hidden-size",
        "2048",
        "--num-layers",
        "16",
        "--num-heads",
        "16",
        "--attention-flops",
    )
    assert r["total_flops"] == pytest.approx(6e18 + 12 * 16 * 2048 * 2048 * 1e9)
    assert r["zero"]["zero0"]["activations_gb_per_gpu"] > 0

    r = run_json(capsys, "--params", "150M", "--flops-per-sample", "4.4e9", "--samples", "400M", "--gpu", "a100")
    assert r["total_flops"] == pytest.approx(3 * 4.4e9 * 4e8) and r["tokens"] is None


def test_family_plugs_in_its_own_flops_per_sample(capsys, monkeypatch):
    # A family (e.g. CLIP) that is not a token stream reports forward FLOPs per sample.
    monkeypatch.setitem(
        P.FAMILY_SHAPES, "gpt", lambda recipe, vocab: P.ModelShape(params=1000, forward_flops_per_sample=7.0)
    )
    r = run_json(capsys, "--recipe", "gpt-tiny", "--samples", "100")
    assert r["params"] == 1000 and r["total_flops"] == 3 * 7.0 * 100


def test_cli_table(capsys):
    assert main(["--params", "350M", "--tokens", "300B", "--gpu", "l40s", "--num-gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-0" in out and "ZeRO-3" in out and "GPU-days" in out and "cheapest stage" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--params", "1B", "--tokens", "1B", "--gpu", "tpu-v5"],  # unknown GPU
        ["--params", "1.3X", "--tokens", "1B"],  # bad suffix
        ["--tokens", "1B"],  # no params
        ["--params", "1B"],  # no tokens
        ["--params", "1B", "--samples", "1M"],  # samples without seq-len
        ["--params", "1B", "--tokens", "1B", "--gpu", "v100"],  # no bf16 on Volta
        ["--params", "1B", "--tokens", "1B", "--mfu", "1.5"],
        ["--recipe", "no-such-recipe", "--tokens", "1B"],
        ["--params", "1B", "--recipe", "gpt-tiny", "--tokens", "1B"],  # both sources
    ],
)
def test_cli_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_gpu_table_is_sane():
    for name, gpu in P.GPUS.items():
        assert gpu.memory_gb > 0 and gpu.tflops["fp32"] > 0, name
        assert set(gpu.tflops) <= set(P.DTYPES), name
        assert gpu.tflops.get("fp16", 0) >= gpu.tflops["fp32"], name


def test_tensor_and_sequence_parallel_divide_states_and_activations():
    s, b, h, L, a = 2048, 2, 1024, 24, 16
    one = activation_bytes(s, b, h, L, a)
    assert one == pytest.approx(s * b * h * (34 + 5 * a * s / h) * L)
    # Korthikanti et al. Table 2 without Megatron sequence parallelism: 10 + 24/t + 5as/(ht)
    assert activation_bytes(s, b, h, L, a, tp=4) == pytest.approx(s * b * h * (10 + 24 / 4 + 5 * a * s / (h * 4)) * L)
    assert activation_bytes(s, b, h, L, a, tp=4, sp=2) == pytest.approx(activation_bytes(s, b, h, L, a, tp=4) / 2)
    assert P.layout_states_bytes(1e9, 0, 2, tp=2) == pytest.approx(zero_model_states_bytes(1e9, 0, 1) / 2)
    # ZeRO shards over the SP x DP ranks holding the same TP slice
    assert P.layout_states_bytes(1e9, 3, 16, tp=4, sp=2) == pytest.approx(zero_model_states_bytes(0.25e9, 3, 4))


def test_layouts_that_do_not_divide_are_refused(capsys):
    with pytest.raises(ValueError, match="not a multiple of tp x sp = 4"):
        P.plan(params=10**9, gpu="h100", tokens=10**9, num_gpus=6, tp=2, sp=2)
    with pytest.raises(ValueError, match="12 attention heads do not divide among tp x sp = 8"):
        P.plan(params=10**9, gpu="h100", tokens=10**9, num_gpus=8, tp=8, num_heads=12)
    with pytest.raises(ValueError, match="seq_len 1000 does not divide among sp = 16"):
        P.plan(params=10**9, gpu="h100", tokens=10**9, num_gpus=16, sp=16, seq_len=1000)


def test_the_smallest_layout_for_a_70b_llama_at_8k_fits_and_nothing_smaller_does(capsys):
    args = [
        "--params",
        "70B",
        "--tokens",
        "1T",
        "--gpu",
        "h100",
        "--seq-len",
        "8192",
        "--hidden-size",
        "8192",
        "--num-layers",
        "80",
        "--num-heads",
        "64",
        "--flash-attention",
        "--num-gpus",
        "64",
        "--tp",
        "8",
    ]
    r = run_json(capsys, *args)
    assert (r["tp"], r["sp"], r["dp"]) == (8, 1, 8)
    best = r["smallest_layout"]
    usable = (80 - 2) * 1e9
    assert best["memory_gb_per_gpu"] * 1e9 <= usable and best["num_gpus"] == best["tp"] * best["sp"] * best["dp"]
    # brute force over the same space: nothing fits on fewer GPUs
    for tp in P.LAYOUT_DEGREES:
        for sp in P.LAYOUT_DEGREES:
            act = activation_bytes(8192, 1, 8192, 80, 64, flash_attention=True, tp=tp, sp=sp)
            for stage in range(4):
                if not P.layout_runs(tp, sp, stage):  # refused by the trainer, so never proposed
                    continue
                for gpus in range(tp * sp, best["num_gpus"], tp * sp):
                    assert P.layout_states_bytes(70e9, stage, gpus, tp, sp) + act > usable, (tp, sp, stage, gpus)
    assert "smallest layout that fits: TP" in P.format_plan(r)


def test_a_clip_plan_counts_the_step_wide_contrastive_batch(capsys):
    """CLIP's contrastive batch is micro x accumulation x DP pairs: their cached embeddings and one
    micro-batch's logits are in the memory per GPU, and grow with accumulation and ranks."""

    def run(*extra, model=("--recipe", "clip-vit-b32", "--samples", "1B")):
        argv = [*model, "--gpu", "a100-80g", "--json", *extra]
        assert P.main(argv) == 0
        return json.loads(capsys.readouterr().out)

    one = run("--num-gpus", "8", "--micro-batch", "256")
    c = one["contrastive"]
    # 2 x N x D embeddings + 2 N logsumexps (fp32), 3 (micro, N) blocks a direction
    n, d = 256 * 8, 512
    assert c["pairs_per_step"] == n and c["gb_per_gpu"] == pytest.approx((4 * (2 * n * d + 2 * n) + 24 * 256 * n) / 1e9)
    more = run("--num-gpus", "8", "--micro-batch", "256", "--accumulation", "4")["contrastive"]
    assert more["pairs_per_step"] == 4 * n and more["gb_per_gpu"] == pytest.approx(4 * c["gb_per_gpu"])
    z = one["zero"]["zero0"]
    assert z["memory_gb_per_gpu"] == pytest.approx(
        z["model_states_gb_per_gpu"] + (z["activations_gb_per_gpu"] or 0) + c["gb_per_gpu"]
    )
    assert any("contrastive batch" in n for n in one["notes"])
    gpt = run("--num-gpus", "8", model=("--recipe", "gpt2-124m", "--tokens", "1B"))
    assert gpt["contrastive"] is None
