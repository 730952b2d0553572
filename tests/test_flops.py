"""Model FLOPs against hand counts, accelerator peaks, and MFU arithmetic (pretrain/runtime/flops.py)."""

from types import SimpleNamespace

import pytest
from transformers import CLIPConfig, GPT2Config

from pretrain.models import get_family
from pretrain.runtime.flops import GPUS, gpu_key, peak_tflops, utilisation


def test_gpt2_small_flops_per_sequence_by_hand():
    # GPT-2 small: 124,439,808 parameters (the published count, vocabulary 50,257), 12 layers of
    # width 768. Per token 6·N = 746,638,848 and the attention scores 12·L·s·h = 12·12·1024·768 =
    # 113,246,208; a 1,024-token sequence is 1,024 times their sum.
    per_token = 6 * 124_439_808 + 12 * 12 * 1024 * 768
    assert per_token == 859_885_056
    got = get_family("gpt").train_flops_per_sample(GPT2Config(), SimpleNamespace(seq_len=1024))
    assert got == pytest.approx(per_token * 1024, rel=1e-12)


def test_clip_vit_b32_flops_per_pair_by_hand():
    # Matmul parameters (everything but the token, position and class lookups) times the tokens
    # each tower sees, 2 FLOPs each: the ViT-B/32 tower has 12 layers of 7,087,872 (q, k, v, o
    # 4·(768²+768); MLP 2·768·3072+3072+768; two norms 4·768) plus the 32x32x3 patch convolution
    # (2,359,296) and its two outer norms (3,072), over 7·7+1 = 50 tokens; the text tower 12 layers
    # of 3,152,384 (width 512) plus the final norm (1,024), over 77 positions.
    vision = 12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 4 * 768) + 3 * 32 * 32 * 768 + 4 * 768
    text = 12 * (4 * (512 * 512 + 512) + 2 * 512 * 2048 + 2048 + 512 + 4 * 512) + 2 * 512
    forward = 2 * (vision * 50 + text * 77)
    assert forward == 14_567_446_528  # 14.6 GFLOPs, twice OpenCLIP's 7.3 GMACs
    assert get_family("clip").train_flops_per_sample(CLIPConfig(), None) == pytest.approx(3 * forward, rel=1e-12)


@pytest.mark.parametrize(
    "name,key",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100-80g"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("Tesla V100-SXM2-32GB", "v100"),
        ("AMD Instinct MI300X", "mi300x"),
        ("NVIDIA A10G", "a10g"),
        ("Tesla T4", "t4"),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_device_names_map_to_the_peak_table(name, key):
    assert gpu_key(name) == key


def test_peaks_are_dense_and_follow_the_runs_precision():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989 == GPUS["h100"].tflops["bf16"]
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 67
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32", tf32=True) == 494.7
    assert peak_tflops(None, "bf16") is None and peak_tflops("a CPU", "fp32") is None


def test_utilisation_is_achieved_flops_per_gpu_over_the_peak():
    tflops, mfu = utilisation(4e15, steps=10, seconds=20.0, world=4, peak=989)
    assert tflops == pytest.approx(4e15 * 10 / 20 / 4 / 1e12) == 500.0
    assert mfu == pytest.approx(500 / 989)
    assert utilisation(4e15, 10, 20.0, 4, None)[1] is None
