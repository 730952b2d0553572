"""Model FLOPs and accelerator peaks: one place for the planner (`pretrain-plan`) and the trainer's
MFU in every run.

Conventions:
* Causal LMs: 6·N per token for N parameters (2·N forward, twice that backward; Kaplan et al. 2020
  sec. 2.1), plus the attention scores 12·L·s·h per token (QK^T and AV, forward and backward;
  Chowdhery et al. 2022, "PaLM", Appendix B, without halving for the causal mask). N counts every
  parameter, as the planner always has; the position table (a lookup, no matmul) is under 1% of
  GPT-2 small, an untied token embedding more.
* Models that are not one token stream (CLIP) give forward FLOPs per sample F; training is 3·F.
* MFU = achieved model FLOP/s / the accelerator's DENSE peak for the run's dtype (H100 SXM bf16 is
  989 TFLOPS, not the 1,979 sparsity figure). Recomputation (activation checkpointing) is not
  counted as model FLOPs, so MFU is the fraction of the peak that went into the model's own math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DTYPES = ("bf16", "fp16", "fp32", "tf32")
BYTES_PER_ELEMENT = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4}  # tf32 is stored as fp32


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    tflops: dict[str, float]  # dense peak per dtype; a dtype the chip has no fast path for is absent


# Vendor DENSE peaks (the sparsity figures are 2x these), TFLOPS, and memory per GPU in GB.
# Sources: NVIDIA datasheets (V100 SXM2, A100 SXM, H100 SXM/PCIe, H200 SXM, HGX B200, L40S, A10, T4)
# and AMD Instinct datasheets (MI250X, MI300X). fp32 is the non-tensor (vector) rate, as the
# datasheets list it; tf32 is the tensor-core rate. Notes on the less certain rows:
#   v100: the 32 GB SXM2 part; fp16 is the tensor-core rate; Volta has no bf16 and no tf32.
#   b200: one GPU of an HGX B200 (1000 W), 180 GB usable of the 192 GB of HBM3e.
#   a10g: AWS does not publish a per-dtype table for its A10G; these are the NVIDIA A10 figures,
#         and measured A10G matmul throughput is often well below them.
#   mi250x: fp32 is the 47.9 vector rate (its fp32 matrix rate is 95.7); CDNA2 has no tf32.
#   t4: fp16 is the tensor-core (mixed precision) rate; Turing has no bf16 and no tf32.
GPUS: dict[str, GPU] = {
    "v100": GPU("V100 SXM2 32GB", 32, {"fp16": 125, "fp32": 15.7}),
    "a100": GPU("A100 SXM 40GB", 40, {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    "a100-80g": GPU("A100 SXM 80GB", 80, {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    "h100": GPU("H100 SXM 80GB", 80, {"bf16": 989, "fp16": 989, "tf32": 494.7, "fp32": 67}),
    "h100-pcie": GPU("H100 PCIe 80GB", 80, {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),
    "h200": GPU("H200 SXM 141GB", 141, {"bf16": 989, "fp16": 989, "tf32": 494.7, "fp32": 67}),
    "b200": GPU("B200 (HGX) 180GB", 180, {"bf16": 2250, "fp16": 2250, "tf32": 1100, "fp32": 75}),
    "mi250x": GPU("MI250X 128GB", 128, {"bf16": 383, "fp16": 383, "fp32": 47.9}),
    "mi300x": GPU("MI300X 192GB", 192, {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
    "l40s": GPU("L40S 48GB", 48, {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6}),
    "a10g": GPU("A10G 24GB", 24, {"bf16": 125, "fp16": 125, "tf32": 62.5, "fp32": 31.2}),
    "t4": GPU("T4 16GB", 16, {"fp16": 65, "fp32": 8.1}),
}


def total_flops(
    params: float,
    tokens: float,
    *,
    attention: bool = False,
    num_layers: int | None = None,
    seq_len: int | None = None,
    hidden_size: int | None = None,
) -> float:
    """Training FLOPs of a decoder: 6·N·D (Kaplan et al. 2020 sec. 2.1; Chinchilla Appendix F).

    With ``attention``, add the PaLM (Chowdhery et al. 2022, Appendix B) attention term
    12·n_layers·seq_len·hidden·D: the QK^T and AV matmuls (2·2·L·s·h per token forward, x3 with the
    backward), which 6·N·D leaves out because they involve no parameters.
    """
    flops = 6.0 * params * tokens
    if attention:
        if not (num_layers and seq_len and hidden_size):
            raise ValueError("the attention term needs num_layers, seq_len and hidden_size")
        flops += 12.0 * num_layers * seq_len * hidden_size * tokens
    return flops


def total_flops_from_samples(forward_flops_per_sample: float, samples: float) -> float:
    """Training FLOPs from forward FLOPs per sample F: 3·F·samples (the backward pass costs about
    twice the forward, as in the 6 = 3 x 2 of 6·N·D)."""
    return 3.0 * forward_flops_per_sample * samples


def clip_forward_flops(config: Any) -> float:
    """Forward FLOPs of one image-text pair for a transformers CLIPConfig: each tower costs 2 FLOPs
    per matmul parameter per token it sees (image patches + class token; caption positions), the
    count that 6·N·D rests on; the token and position lookup tables do no matmul. ViT-B/32 comes to
    14.7 GFLOPs per pair, twice the 7.4 G multiply-adds OpenCLIP lists."""
    import torch
    from transformers import CLIPTextModel, CLIPVisionModel

    def matmul_params(model: torch.nn.Module) -> int:
        named = list(model.named_parameters())
        lookups = sum(p.numel() for n, p in named if "embedding" in n and "patch_embedding" not in n)
        return sum(p.numel() for _, p in named) - lookups

    with torch.device("meta"):
        vision = matmul_params(CLIPVisionModel(config.vision_config))
        text = matmul_params(CLIPTextModel(config.text_config))
    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2 + 1
    return 2.0 * (vision * patches + text * t.max_position_embeddings)


# ---------------------------------------------------------------------------------------------
# The accelerator a run is on, and its utilisation.

_NAME_TO_GPU = (  # (substrings all present in torch.cuda.get_device_name(), lower case), table key; first match wins
    (("h200",), "h200"),
    (("h100", "pcie"), "h100-pcie"),
    (("h100",), "h100"),
    (("b200",), "b200"),
    (("a100", "80g"), "a100-80g"),
    (("a100",), "a100"),
    (("v100",), "v100"),
    (("mi300x",), "mi300x"),
    (("mi250x",), "mi250x"),
    (("l40s",), "l40s"),
    (("a10g",), "a10g"),
    (("a10",), "a10g"),
    (("t4",), "t4"),
)


def gpu_key(device_name: str) -> str | None:
    """The table key of a device name as CUDA reports it ("NVIDIA H100 80GB HBM3" -> "h100"), or None."""
    name = device_name.lower()
    return next((key for parts, key in _NAME_TO_GPU if all(p in name for p in parts)), None)


def peak_tflops(device_name: str | None, precision: str, tf32: bool = False) -> float | None:
    """The dense peak of ``device_name`` for the run's precision (fp32 runs use the tf32 rate when
    matmuls may use TF32), or None for a device the table does not know (every CPU)."""
    key = gpu_key(device_name) if device_name else None
    if key is None:
        return None
    dtype = "tf32" if precision == "fp32" and tf32 else precision
    return GPUS[key].tflops.get(dtype, GPUS[key].tflops.get("fp32"))


def this_accelerator() -> tuple[str | None, bool]:
    """(this process's CUDA device name or None, whether fp32 matmuls may use TF32)."""
    import torch

    if not torch.cuda.is_available():
        return None, False
    return torch.cuda.get_device_name(), bool(torch.backends.cuda.matmul.allow_tf32)


def utilisation(
    flops_per_step: float, steps: int, seconds: float, world: int, peak: float | None
) -> tuple[float, float | None]:
    """(achieved TFLOP/s per GPU, MFU or None where no peak is known) over ``steps`` optimizer
    steps that took ``seconds`` on ``world`` ranks."""
    achieved = flops_per_step * steps / max(seconds, 1e-9) / world / 1e12
    return achieved, (achieved / peak if peak else None)
