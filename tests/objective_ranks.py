"""One optimizer step on fixed rows, for the objective's layout-invariance tests.

    deepspeed --num_gpus 2 tests/objective_ranks.py OUT.pt {text,chat,clip} -- <pretrain/train.py arguments>

Each rank trains on its own share of the rows (two windows of text or chat, four image-text pairs;
rank r on the r-th share); rank 0 writes the gradient the optimizer applied (averaged over the
ranks), the train line and each rank's next random draws to OUT.pt. tests/test_objective.py also
uses the helpers in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # started as a script by a launcher
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from data_pipelines.batch import Batch  # noqa: E402
from data_pipelines.text.packed import packed_batch  # noqa: E402

CHAT_TRAINED = [1, 8]  # tokens trained by the assistant turns of the two chat windows


def windows(seq_len: int, trained: list[int] | None) -> dict[str, torch.Tensor]:
    """Two fixed windows of token ids; with ``trained``, packed chat windows (two conversations
    each, as prepare-text packs them) whose assistant turns train that many tokens."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 900, (2, seq_len + 1), generator=g)
    if trained is None:
        return {"input_ids": ids[:, :-1].clone(), "labels": ids[:, 1:].clone()}
    mask = torch.zeros_like(ids)
    segments = torch.zeros_like(ids)
    segments[:, seq_len // 2 :] = 1
    for row, n in enumerate(trained):
        mask[row, seq_len + 1 - n :] = 1  # the end of the second conversation is the assistant's
    return packed_batch(torch.stack([ids, mask, segments], dim=1))


def image_text_pairs(count: int, eos: int, image_size: int = 32, context: int = 16) -> dict[str, torch.Tensor]:
    """Fixed image-text pairs as the CLIP training stream yields them (uint8 pixels, eos-padded ids)."""
    g = torch.Generator().manual_seed(11)
    pixels = torch.randint(0, 256, (count, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    ids = torch.randint(eos + 1, eos + 200, (count, context), generator=g)
    lengths = torch.randint(4, context, (count,), generator=g)
    mask = (torch.arange(context)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, eos))  # padded with eos, as the loader pads
    ids[torch.arange(count), lengths - 1] = eos  # where CLIP pools the caption
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


def rows_of(kind: str, trainer) -> dict[str, torch.Tensor]:
    if kind == "clip":
        return image_text_pairs(4, trainer.inputs.model_config.text_config.eos_token_id)
    return windows(trainer.inputs.data.seq_len, CHAT_TRAINED if kind == "chat" else None)


class Fixed:
    """Given micro-batches in place of the trainer's stream."""

    def __init__(self, batches: list[Batch]):
        self.batches, self.micro_batches = iter(batches), 0

    def __next__(self) -> Batch:
        self.micro_batches += 1
        return next(self.batches)

    def counts(self) -> tuple[int, dict[str, int]]:
        return self.micro_batches, {}


def one_step(trainer, rows: dict[str, torch.Tensor]):
    """One optimizer step on ``rows``, split into the trainer's micro-batches: (its train line, the
    gradient the optimizer applied, the weights after it)."""
    from deepspeed.utils import safe_get_full_grad

    micro, engine, grads = trainer.micro, trainer.engine, {}
    count = next(iter(rows.values())).shape[0]
    trainer.stream = Fixed([Batch({k: v[i : i + micro] for k, v in rows.items()}) for i in range(0, count, micro)])
    step = engine.step

    def capture():  # the accumulated (and, over ranks, averaged) gradient, just before the update
        if engine.is_gradient_accumulation_boundary():
            grads.update(
                {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters() if p.requires_grad}
            )
        step()

    engine.step = capture
    out = trainer.train_step(log=True)
    return out, grads, {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def main() -> int:
    import deepspeed
    import torch.distributed as dist

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    out_path, kind = args[0], args[1]
    argv = args[args.index("--") + 1 :]
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    args = build_parser().parse_args([*argv, "--no-progress"])
    resolved, inputs, run_dir = prepare(args)
    deepspeed.init_distributed()
    trainer = Trainer(resolved, inputs, run_dir, "none", progress=False)
    trainer.setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    draws: list = [None] * world  # what dropout would draw next on each rank: each replica its own
    dist.all_gather_object(draws, torch.rand(4))
    rows = rows_of(kind, trainer)
    share = next(iter(rows.values())).shape[0] // world
    out, grads, _ = one_step(trainer, {k: v[rank * share : (rank + 1) * share] for k, v in rows.items()})
    if rank == 0:
        torch.save({"out": out, "grads": grads, "draws": draws}, out_path)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
