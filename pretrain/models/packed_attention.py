"""Attention that keeps packed conversations apart.

A batch of packed conversations (`data_pipelines.text.packed`) carries ``segment_ids`` and
``position_ids`` that restart at 0 in each conversation. For the ``sdpa`` and ``eager``
attention of transformers models the block-diagonal causal mask is built here and passed as a 4D
``attention_mask`` (transformers takes a 4D mask as it is, in 4.x as in 5.x): a token attends to
the earlier tokens of its own conversation only. Other implementations (flash-attention, flex)
take no dense mask; they get the ``position_ids`` alone, from whose restarts transformers 5.x
finds the conversations itself (``masking_utils.find_packed_sequence_indices``, varlen kernels
for flash-attention); it looks only when there is no KV cache, so packed batches always run
with ``use_cache=False``.
"""

from __future__ import annotations

import torch

DENSE_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def _config(model: torch.nn.Module):
    # DeepSpeed's engine wraps the transformers model in .module; peft's wrappers forward .config.
    inner = getattr(model, "module", model)
    return getattr(inner, "config", None), inner


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) bool, True where query i may attend key j: j <= i, same segment."""
    seq = segment_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


def causal_lm_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward for a batch, plain or packed."""
    inputs = {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    segments = batch.get("segment_ids")
    if segments is None:
        return inputs
    inputs["use_cache"] = False
    config, inner = _config(model)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in DENSE_MASK_IMPLEMENTATIONS:
        return inputs
    mask = block_causal_mask(segments)
    if impl == "eager":
        # eager attention adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere
        dtype = inner.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    inputs["attention_mask"] = mask
    return inputs
