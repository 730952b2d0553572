"""Tensor parallelism with DeepSpeed's AutoTP training, configured by the DeepSpeed JSON alone:
``"tensor_parallel": {"autotp_size": N}``.

DeepSpeed shards the model inside ``deepspeed.initialize`` (column-parallel q/k/v and MLP-in,
row-parallel o and MLP-out, embeddings and norms replicated). What the toolkit adds:

- ``check``: the layouts DeepSpeed cannot run, refused before any rank starts (which
  architectures, head counts that do not divide). ZeRO 0, 1, 2 and 3 all combine with it in
  DeepSpeed 0.19.8 (each gives the losses of the same model without TP; checked on this CPU);
- ``deepspeed_mpu``: the TP x DP process groups made before ``deepspeed.initialize``, handed to it
  as ``mpu`` so that DeepSpeed's own batch check is ``micro x gas x DP`` (without one it checks
  against the whole world, which a TP run can never satisfy) and its gradient norm knows the TP group;
- ``merge_shards``: for export and eval, one ordinary state dict from the per-TP-rank files of a
  checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.parallel.layout import ParallelLayout
from pretrain.run.feature import EngineParts, Feature, RunContext

# AutoTP shards nn.Linear layers (by transformers' tp_plan, or by name). Llama's projections are
# nn.Linear and shard. GPT-2's are transformers' Conv1D with a fused q/k/v: DeepSpeed 0.19.8's
# AutoTP lists gpt2 as unsupported (AutoTP.supported: "use kernel injection", an inference-only
# path) and its training path matches nn.Linear only, so a gpt2 run with autotp_size > 1 would
# die in deepspeed.initialize on every rank; it is refused up front instead. CLIP likewise.
SUPPORTED_ARCHS = ("llama",)
NOT_SHARDABLE = {
    "gpt2": "DeepSpeed's AutoTP does not shard GPT-2 (its layers are transformers' Conv1D with a fused q/k/v; "
    "AutoTP lists gpt2 as unsupported)",
    "clip": "DeepSpeed's AutoTP training does not cover CLIP's towers",
}


def check(
    arch: str, layout: ParallelLayout, zero_stage: int, num_heads: int, num_kv_heads: int | None, source: str
) -> list[str]:  # zero_stage: every stage combines with AutoTP in DeepSpeed 0.19.8
    """Why this TP layout cannot run, as "file: key: reason" lines ([] when it can, or TP is off)."""
    if layout.tp == 1:
        return []
    key = f"{source}: tensor_parallel.autotp_size"
    problems = []
    if arch not in SUPPORTED_ARCHS:
        why = NOT_SHARDABLE.get(arch, "")
        problems.append(
            f"{key}: {layout.tp} asks for tensor parallelism, which runs for model.arch "
            f"{' or '.join(repr(a) for a in SUPPORTED_ARCHS)} only, and model.arch is {arch!r}"
            f"{': ' + why if why else ''}; use a llama recipe, or remove the tensor_parallel section "
            "(ZeRO-3 data parallelism also splits a model too large for one GPU)"
        )
    for what, heads in (("model.num_heads", num_heads), ("model.num_kv_heads", num_kv_heads)):
        if heads is not None and heads % layout.tp:
            problems.append(
                f"{key}: {layout.tp} does not divide {what} {heads}, so the attention heads cannot "
                "be split evenly across the TP ranks"
            )
    return problems


def fill(ds: dict, layout: ParallelLayout) -> list[str]:
    """Settle what AutoTP would otherwise decide against the toolkit's loss; returns notes.

    With tied embeddings (the recipes' default) and transformers' ``embedding_rowwise`` plan,
    DeepSpeed makes the LM head vocabulary-parallel and leaves each rank a slice of the logits
    for its own loss; the toolkit computes token losses (training and eval) from whole logits,
    so unless the config says otherwise the head gathers its output."""
    if layout.tp == 1:
        return []
    section = ds["tensor_parallel"]
    if section.get("vocab_parallel_lm_head") is None:
        section["vocab_parallel_lm_head"] = False
        return [
            "tensor_parallel.vocab_parallel_lm_head: set to false (the LM head gathers the whole logits, "
            "which the toolkit's token losses need)"
        ]
    return []


def vocab_parallel_problems(ds: dict, layout: ParallelLayout, source: str) -> list[str]:
    if layout.tp > 1 and (ds.get("tensor_parallel") or {}).get("vocab_parallel_lm_head"):
        return [
            f"{source}: tensor_parallel.vocab_parallel_lm_head: true leaves each rank a slice of the logits, "
            "but the toolkit computes its losses from whole logits; remove it or set it to false"
        ]
    return []


def deepspeed_mpu(layout: ParallelLayout):
    """DeepSpeed's TP x DP groups (collective: every rank calls it), or None without TP."""
    if layout.tp == 1:
        return None
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=layout.tp)
    assert groups.get_data_parallel_world_size() == layout.dp, "DeepSpeed's DP groups differ from the layout's"
    assert groups.get_tensor_model_parallel_rank() == layout.tp_rank
    return groups


def sharded_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, of which in TP-sharded layers), for the log and the tests."""
    from deepspeed.module_inject.layers import TensorParallel_Layer

    total = sum(p.numel() for p in model.parameters())
    sharded = sum(
        p.numel() for m in model.modules() if isinstance(m, TensorParallel_Layer) for p in m.parameters(recurse=False)
    )
    return total, sharded


def merge_shards(shards: list[dict[str, torch.Tensor]], full_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """One state dict from the TP ranks' ones (rank order): a tensor whose shape matches the full
    model's is replicated (rank 0's copy); otherwise it is concatenated along the one dimension
    that differs (output features for column-parallel layers, input features for row-parallel)."""
    merged = {}
    for name, first in shards[0].items():
        full = full_shapes.get(name)
        if full is None:  # keeping rank 0's copy would silently drop the other ranks' shards
            raise ValueError(
                f"{name}: a tensor in the TP shards that the model has no parameter for, so it cannot "
                "be merged (was the checkpoint written by another model or with adapters?)"
            )
        if tuple(first.shape) == tuple(full):
            merged[name] = first
            continue
        dims = [d for d in range(first.dim()) if first.shape[d] != full[d]]
        if len(dims) != 1:
            raise ValueError(
                f"{name}: a TP shard of shape {tuple(first.shape)} does not tile the model's {tuple(full)}"
            )
        merged[name] = torch.cat([s[name] for s in shards], dim=dims[0])
        if tuple(merged[name].shape) != tuple(full):
            raise ValueError(
                f"{name}: {len(shards)} TP shards give {tuple(merged[name].shape)}, the model has {tuple(full)}"
            )
    return merged


class TensorParallel(Feature):
    """The run feature: AutoTP's rules, its DeepSpeed settings, and its groups for the engine."""

    name = "tensor parallelism"

    def problems(self, ctx: RunContext) -> list[str]:
        if ctx.deepspeed is None:
            return []
        return check(
            ctx.arch,
            ctx.layout,
            ctx.zero_stage,
            ctx.num_heads,
            ctx.num_kv_heads,
            ctx.source,
        ) + vocab_parallel_problems(ctx.deepspeed, ctx.layout, ctx.source)

    def configure(self, ds: dict, ctx: RunContext) -> list[str]:
        notes = fill(ds, ctx.layout)
        if ctx.layout.tp_crosses_nodes(ctx.local_world):
            notes.append(
                f"tensor_parallel.autotp_size {ctx.layout.tp} does not divide the {ctx.local_world} ranks per "
                "node, so TP groups span machines and every layer's all-reduce crosses the network; keep TP "
                "inside a node, DP across"
            )
        return notes

    def engine(self, model: torch.nn.Module, ctx: RunContext) -> EngineParts | None:
        if ctx.layout.tp == 1:
            return None
        groups = deepspeed_mpu(ctx.layout)
        # the (data_parallel, tensor_parallel) mesh's DP group: where model replicas meet
        return EngineParts(mpu=groups, dp_group=groups.get_data_parallel_group)

    def started(self, engine, ctx: RunContext) -> list[str]:
        if ctx.layout.tp == 1:
            return []
        held, sharded = sharded_parameters(engine.module)
        return [
            f"{ctx.layout.describe()}; rank {ctx.layout.rank} (TP rank {ctx.layout.tp_rank}) holds {held} "
            f"parameter elements, {sharded} of them in TP-sharded layers"
        ]


def tp_degree(tag_dir: Path) -> int:
    """How many TP ranks wrote the checkpoint (DeepSpeed names their files ``*mp_rank_NN*``)."""
    ranks = {p.name.split("mp_rank_")[1][:2] for p in tag_dir.glob("*mp_rank_*_model_states.pt")}
    return max(1, len(ranks))


def _rank_view(tag_dir: Path, tp_rank: int, into: Path) -> Path:
    """A folder that shows TP rank ``tp_rank``'s files under the names of a TP-free checkpoint
    (``mp_rank_00``), so DeepSpeed's own zero_to_fp32 reads that rank's (partitioned) fp32 weights."""
    view = into / f"tp{tp_rank}"
    view.mkdir(parents=True)
    suffix = f"mp_rank_{tp_rank:02d}_"
    for f in tag_dir.iterdir():
        if suffix in f.name:
            (view / f.name.replace(suffix, "mp_rank_00_")).symlink_to(f.resolve())
    return view


def merged_fp32_state_dict(
    tag_dir: Path, zero_stage: int, full_shapes: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from a checkpoint written by ``tp_degree`` TP ranks: each
    rank's weights as DeepSpeed reads them for a TP-free checkpoint (ZeRO-1/2/3: the fp32 master
    copy gathered from the rank's ZeRO partitions; ZeRO-0: its module state), then the shards
    concatenated along the dimension AutoTP split (`merge_shards`)."""
    import tempfile

    shards = []
    with tempfile.TemporaryDirectory(prefix="tp-merge-") as tmp:
        for r in range(tp_degree(tag_dir)):
            view = _rank_view(tag_dir, r, Path(tmp))
            if zero_stage > 0:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                sd = get_fp32_state_dict_from_zero_checkpoint(str(view.parent), tag=view.name)
            else:
                sd = torch.load(view / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
            shards.append({k: v.float() for k, v in sd.items()})
    return merge_shards(shards, full_shapes)
